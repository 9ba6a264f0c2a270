"""Analytic FLOPs of the Wan transformer, the TMD backbone and the TMD flow head.

Effective NFE prices a head step at ``H / L`` of a full forward. The FLOP model says what a pass
really costs (the head also runs the inner-state block, the fusion and the output projection, and
attention grows with the square of the token count), so a benchmark can tell "the sampler is slow"
apart from "the cost model is optimistic". Counted as 2 FLOPs per multiply-add over matmuls and
convolutions only (what ``torch.utils.flop_counter`` counts), per sample; norms, activations and
rotary embeddings are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Config = Mapping[str, Any]
"""A ``WanTransformer3DModel`` config: a plain dict or the model's own ``config``."""


def _dim(config: Config) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


def _patch_volume(config: Config) -> int:
    return math.prod(config["patch_size"])


def tokens(config: Config, latent: Sequence[int]) -> int:
    """Tokens of one latent (C, F, H, W) after patchifying."""
    return math.prod(size // patch for size, patch in zip(latent[1:], config["patch_size"]))


def block_flops(config: Config, n: int, text_len: int) -> float:
    """One transformer block on ``n`` tokens with ``text_len`` text tokens.

    Self-attention: Q, K, V, O projections (8 n D^2) and the two attention matmuls (4 n^2 D).
    Cross-attention: Q, O on the video tokens (4 n D^2), K, V on the text (4 L D^2, recomputed by
    every call: a head step pays it again), attention (4 n L D). FFN: 4 n D F.
    """
    d, ffn = _dim(config), config["ffn_dim"]
    self_attention = 8 * n * d * d + 4 * n * n * d
    cross_attention = 4 * n * d * d + 4 * text_len * d * d + 4 * n * text_len * d
    return float(self_attention + cross_attention + 4 * n * d * ffn)


def _time_embedding_flops(config: Config) -> float:
    d = _dim(config)
    return 2.0 * (config["freq_dim"] * d + d * d)


def embed_flops(config: Config, n: int, text_len: int) -> float:
    """Patch embedding, text projection (two layers), time embedding and the per-block modulation."""
    d = _dim(config)
    patch = 2 * n * config["in_channels"] * _patch_volume(config) * d
    text = 2 * text_len * (config["text_dim"] * d + d * d)
    return float(patch + text + _time_embedding_flops(config) + 2 * d * 6 * d)


def out_flops(config: Config, n: int) -> float:
    return 2.0 * n * _dim(config) * config["out_channels"] * _patch_volume(config)


def forward_flops(config: Config, latent: Sequence[int], text_len: int) -> float:
    """One full teacher forward of one sample: the unit of effective NFE."""
    n = tokens(config, latent)
    return embed_flops(config, n, text_len) + config["num_layers"] * block_flops(config, n, text_len) + out_flops(config, n)


def backbone_flops(config: Config, latent: Sequence[int], text_len: int, head_blocks: int) -> float:
    """Embeddings and blocks ``0 .. L-H-1``: once per outer step."""
    n = tokens(config, latent)
    return embed_flops(config, n, text_len) + (config["num_layers"] - head_blocks) * block_flops(config, n, text_len)


def head_flops(config: Config, latent: Sequence[int], text_len: int, head_blocks: int, fusion: str = "gated") -> float:
    """One flow-head step: embeddings of ``s`` and ``s - r``, the inner-state block and fusion, H blocks,
    the output projection. Everything beyond the H blocks is what effective NFE does not price."""
    n, d = tokens(config, latent), _dim(config)
    times = 3 * _time_embedding_flops(config) + 2 * d * 6 * d  # s, and s - r next to 0 in one batch of 2
    inner = 2 * n * config["in_channels"] * _patch_volume(config) * d + 2 * d * 3 * d + 4 * n * d * d  # MLP D -> D -> D
    fuse = (4 if fusion == "concat" else 2) * n * d * d
    return times + inner + fuse + head_blocks * block_flops(config, n, text_len) + out_flops(config, n)


def tmd_sample_flops(
    config: Config, latent: Sequence[int], text_len: int, head_blocks: int, outer_steps: int, inner_steps: int
) -> float:
    return outer_steps * (
        backbone_flops(config, latent, text_len, head_blocks) + inner_steps * head_flops(config, latent, text_len, head_blocks)
    )
