import os

import pytest
import torch

from tmd.models.wan import load_teacher
from tmd.programs.cli import main

WORLD_TEACHER = "world_teacher.yaml"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny models: on a loaded 2-core machine one thread is several times faster than two.
    ``TMD_TEST_THREADS=2`` runs the suite at two, as it must pass there too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TMD_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_teacher():
    return load_teacher("tiny", seed=0)


@pytest.fixture
def tiny_inputs():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 2, 8, 8, generator=g)
    text = torch.randn(2, 5, 32, generator=g)
    negative = torch.randn(2, 5, 32, generator=g)
    return latents, text, negative


@pytest.fixture(scope="session")
def tiny_world():
    """`tmd train-teacher` overrides that build world assets in seconds."""
    return [
        "train.steps=2",
        "train.batch_size=2",
        "train.progress=false",
        "autoencoder.steps=1",
        "autoencoder.batch_size=2",
        "autoencoder.base_channels=8",
        "text.dim=16",
        "text.ff=32",
        "model.num_layers=3",
        "model.num_attention_heads=1",
        "model.attention_head_dim=8",
        "model.ffn_dim=16",
        "model.freq_dim=16",
        "sampling.guidance=3.0",
    ]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory, tiny_world):
    """World assets for the tests that train and evaluate on them; they only read them, so one build serves all."""
    root = tmp_path_factory.mktemp("world")
    args = [f"data.assets={root / 'assets'}", f"train.out_dir={root / 'run'}", *tiny_world, "autoencoder.decoder_steps=0"]
    assert main(["train-teacher", "--config", WORLD_TEACHER, *args]) == 0
    return root / "assets"
