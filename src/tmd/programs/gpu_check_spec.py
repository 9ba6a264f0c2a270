"""What the GPU check runs on: the model and shapes (Wan2.1 1.3B, or tiny for a CPU rehearsal), built on the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tmd.config import find_config
from tmd.models.wan import (
    TINY_CONFIG,
    WAN_1_3B_CONFIG,
    WAN_1_3B_LATENT,
    WAN_TEXT_LEN,
    WanTeacher,
    build_transformer,
    cast_transformer,
)

STAGE2_CONFIG = find_config("wan1.3b_tmd_stage2.yaml")


@dataclass
class Spec:
    name: str
    config: dict[str, Any]
    latent: tuple[int, int, int, int]
    text_len: int
    head_blocks: int
    teacher_steps: int
    device: str
    compile_backend: str
    repeats: int


def make_spec(tiny: bool, device: str) -> Spec:
    if tiny:
        return Spec("tiny", dict(TINY_CONFIG), (4, 2, 8, 8), 8, 1, 50, device, "aot_eager", 2)
    return Spec("wan1.3b", dict(WAN_1_3B_CONFIG), WAN_1_3B_LATENT, WAN_TEXT_LEN, 5, 50, device, "inductor", 3)


def build_teacher(spec: Spec, dtype: torch.dtype):
    """Random weights built on the device itself (1.3B parameters initialise in seconds there)."""
    with torch.device(spec.device):
        transformer = build_transformer(spec.config)
    return WanTeacher(cast_transformer(transformer, dtype)).eval()


def inputs(spec: Spec, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(spec.device).manual_seed(0)
    noise = torch.randn(batch, *spec.latent, generator=g, device=spec.device)
    cond = torch.randn(batch, spec.text_len, spec.config["text_dim"], generator=g, device=spec.device)
    return noise, cond, torch.randn(cond.shape, generator=g, device=spec.device)
