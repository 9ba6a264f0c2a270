"""GAN discriminator of DMD2/TMD stage 2: small Conv3D heads on frozen-teacher features.

The teacher already knows what a plausible noisy video looks like at every depth; the heads only
learn to read that off. One head per feature depth, logits summed (the non-saturating loss then
treats them as one classifier).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class FeatureHead(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        groups = 8 if hidden % 8 == 0 else 1
        self.net = nn.Sequential(
            nn.Conv3d(dim, hidden, kernel_size=3, padding=1),
            nn.GroupNorm(groups, hidden),
            nn.SiLU(),
            nn.Conv3d(hidden, hidden, kernel_size=3, stride=(1, 2, 2), padding=1),
            nn.SiLU(),
            nn.Conv3d(hidden, 1, kernel_size=1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).mean(dim=(1, 2, 3, 4))


class Discriminator(nn.Module):
    """Logits (B,) from a list of (B, dim, F', H', W') teacher feature grids, one per depth."""

    def __init__(self, dim: int, num_features: int = 3, hidden: int = 64):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"the discriminator needs at least one feature depth, got {num_features}")
        self.heads = nn.ModuleList(FeatureHead(dim, hidden) for _ in range(num_features))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"discriminator has {len(self.heads)} heads but got {len(features)} feature grids")
        return torch.stack([head(f.float()) for head, f in zip(self.heads, features)]).sum(0)


def default_feature_blocks(num_blocks: int, count: int = 3) -> tuple[int, ...]:
    """Evenly spaced depths (e.g. 30 blocks -> 7, 15, 22): early, middle and late features."""
    return tuple(sorted({max(0, round(num_blocks * (i + 1) / (count + 1)) - 1) for i in range(count)}))
