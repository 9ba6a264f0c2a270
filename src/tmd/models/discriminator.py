"""GAN discriminator of DMD2-v / TMD stage 2: one small Conv3D head per frozen-teacher feature depth.

The teacher already knows what a plausible noisy video looks like at every depth; the heads only
learn to read that off. The paper (A.3) reads unpatchified teacher features at blocks (15, 22, 29) of
Wan2.1 1.3B's 30 and (19, 29, 39) of 14B's 40, and averages the GAN losses over the heads, so the
discriminator returns one logit per head and the losses average them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

PAPER_FEATURE_BLOCKS = {30: (15, 22, 29), 40: (19, 29, 39)}
"""Table 7's discriminator feature layers (0-based block indices) for the two Wan2.1 depths."""


class FeatureHead(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        groups = 8 if hidden % 8 == 0 else 1
        self.net = nn.Sequential(
            nn.Conv3d(channels, hidden, kernel_size=3, padding=1),
            nn.GroupNorm(groups, hidden),
            nn.SiLU(),
            nn.Conv3d(hidden, hidden, kernel_size=3, stride=(1, 2, 2), padding=1),
            nn.SiLU(),
            nn.Conv3d(hidden, 1, kernel_size=1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).mean(dim=(1, 2, 3, 4))


class Discriminator(nn.Module):
    """Logits (B, heads) from a list of (B, channels, F, H, W) teacher feature grids, one per depth."""

    def __init__(self, channels: int, num_features: int = 3, hidden: int = 64):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"the discriminator needs at least one feature depth, got {num_features}")
        self.heads = nn.ModuleList(FeatureHead(channels, hidden) for _ in range(num_features))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"discriminator has {len(self.heads)} heads but got {len(features)} feature grids")
        return torch.stack([head(f.float()) for head, f in zip(self.heads, features)], dim=1)


def default_feature_blocks(num_blocks: int) -> tuple[int, ...]:
    """The paper's layers for 30 and 40 blocks; other depths take 1.3B's fractions 15/29, 22/29, 29/29 of
    the last block index (the world's 6 blocks: 3, 4, 5)."""
    if num_blocks in PAPER_FEATURE_BLOCKS:
        return PAPER_FEATURE_BLOCKS[num_blocks]
    last = num_blocks - 1
    return tuple(sorted({round(last * index / 29) for index in PAPER_FEATURE_BLOCKS[30]}))
