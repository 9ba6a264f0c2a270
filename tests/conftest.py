import pytest
import torch

from tmd.models.wan import load_teacher


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
