"""Sliced Wasserstein distance: a sample-based distance between distributions that is cheap and
unbiased enough in low dimensions to tell whether a rng moves towards the data."""

from __future__ import annotations

import torch
from torch import Tensor


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 128, rng: torch.Generator | None = None) -> float:
    """``sqrt(mean over random unit directions of W2^2 of the 1D projections)`` of samples (N, D).

    Equal sample counts make each 1D W2 an exact sorted-to-sorted matching.
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"need two sample sets of the same shape (N, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    directions = torch.randn(a.shape[1], projections, generator=rng, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa = (a.detach().cpu().double() @ directions).sort(dim=0).values
    pb = (b.detach().cpu().double() @ directions).sort(dim=0).values
    return ((pa - pb) ** 2).mean().sqrt().item()
