import json

import pytest
import torch

from tmd.config import ConfigError, load_config
from tmd.eval.samplers import evaluate_sampler
from tmd.programs.cli import main
from tmd.sampling import sample_teacher
from tmd.world.autoencoder import AutoencoderConfig, VideoAutoencoder
from tmd.world.data import DEFAULT_ASSETS, PromptEmbeddings, WorldAssets, world_data_source
from tmd.world.spec import all_prompts, world_vocabulary
from tmd.world.teacher import WorldTeacherConfig
from tmd.world.text import build_tiny_text_encoder

CONFIG = "world_teacher.yaml"


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    autoencoder = VideoAutoencoder(AutoencoderConfig(base_channels=8)).eval()
    text = build_tiny_text_encoder(world_vocabulary(), dim=16, layers=1, heads=2, ff=32, max_length=8)
    return autoencoder, text


def test_data_source_batches_are_latents_with_cached_embeddings(tiny_models):
    autoencoder, text = tiny_models
    source = world_data_source(autoencoder, text, batch_size=3, seed=5)
    batch = source.next_batch()
    assert batch["x"].shape == (3, 8, 4, 8, 8)
    assert batch["cond"].shape == batch["neg_cond"].shape == (3, 8, 16)
    assert torch.allclose(batch["cond"], text.encode(batch["prompts"]))
    assert torch.allclose(batch["neg_cond"][0], text.encode([""])[0])
    # batch i depends on (seed, i) only: a fresh source resumed at index 0 repeats it
    again = world_data_source(autoencoder, text, batch_size=3, seed=5).next_batch()
    assert again["prompts"] == batch["prompts"] and torch.equal(again["x"], batch["x"])
    with pytest.raises(ValueError, match="not one of the world's 72 prompts"):
        PromptEmbeddings(text)(["a purple circle moving left"])


def test_missing_assets_name_the_folder_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="tmd train-teacher"):
        WorldAssets(tmp_path / "nowhere")


def test_config_rejects_bad_keys_and_wrong_method():
    with pytest.raises(ConfigError, match="did you mean 'model.num_layers'"):
        load_config(WorldTeacherConfig, CONFIG, ["model.num_layer=3"])
    with pytest.raises(ConfigError, match="flow_matching"):
        load_config(WorldTeacherConfig, CONFIG, ["method_name=dmd2", "method={}"])


def test_train_teacher_end_to_end_builds_loadable_assets(tmp_path, capsys, tiny_world):
    out = tmp_path / "assets"
    overrides = [f"data.assets={out}", f"train.out_dir={tmp_path / 'run'}", *tiny_world]
    assert main(["train-teacher", "--config", CONFIG, *overrides]) == 0
    metadata = json.loads((out / "world.json").read_text())
    assert metadata["guidance"] == 3.0 and metadata["command"].startswith("tmd train-teacher")
    assert (out / "teacher" / "training_config.yaml").is_file()

    assets = WorldAssets(out)
    assert assets.guidance == 3.0
    prompts = all_prompts()[:2]
    score = evaluate_sampler(
        assets,
        lambda noise, cond, neg: sample_teacher(assets.teacher, noise, cond, neg, 1, assets.guidance, assets.shift),
        prompts=prompts,
    )
    assert 0 <= score.result.total <= 1 and score.seconds_per_video > 0

    # the run dir holds checkpoints now: a second run without --resume is refused with a clear message
    assert main(["train-teacher", "--config", CONFIG, "--stage", "teacher", *overrides]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.skipif(not (DEFAULT_ASSETS / "teacher").exists(), reason="shipped world assets not built")
def test_shipped_assets_sample_and_decode():
    assets = WorldAssets()
    prompts = all_prompts()[:2]
    cond, neg = assets.encode_prompts(prompts)
    noise = torch.randn(2, *assets.latent_shape(), generator=torch.Generator().manual_seed(0))
    videos = assets.decode(sample_teacher(assets.teacher, noise, cond, neg, 2, assets.guidance, assets.shift))
    assert videos.shape == (2, 3, 8, 32, 32)
    assert videos.min() >= -1 and videos.max() <= 1
