import pytest
import torch

from tmd.models.wan import load_teacher


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny models: on a loaded 2-core machine one thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
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
