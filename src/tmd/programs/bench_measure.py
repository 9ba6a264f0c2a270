"""What ``tmd bench`` measures, table by table: linear-attention scaling, the sampling fast path, one
training step per method and TMD's generator step against DMD2-v's."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tmd.config import load_config
from tmd.methods import get_method
from tmd.models.fastpath import attention_kernel, compile_blocks
from tmd.models.linear_attention import linearise, round_selection
from tmd.models.split import TMDStudent
from tmd.models.wan import (
    WAN22_5B_CONFIG,
    WAN22_5B_LATENT,
    WAN_1_3B_CONFIG,
    WAN_1_3B_LATENT,
    WAN_TEXT_LEN,
    WanTeacher,
    cast_transformer,
)
from tmd.programs.timing import time_round_robin
from tmd.rng import BatchRandom
from tmd.sampling import sample_tmd
from tmd.train.update import UpdateStep
from tmd.world.autoencoder import AutoencoderConfig
from tmd.world.data import DEFAULT_ASSETS, TEACHER_DIR
from tmd.world.spec import WorldConfig
from tmd.world.teacher import WorldTeacherConfig, transformer_config

TEACHER_STEPS = 50
TEACHER_GUIDANCE = 5.0
TEACHER_SHIFT = 5.0
WORLD_CONFIG_FILE = "world_teacher.yaml"


@dataclass
class BenchModel:
    """A teacher to benchmark with the shapes it is used at."""

    name: str
    config: dict[str, Any] | None  # None: read from ``path`` when the teacher is loaded
    latent: tuple[int, int, int, int] | None
    text_len: int | None  # None: Wan's 512 for a 4096-wide text encoder (UMT5), else 8
    head_blocks: int | None
    weights: str
    path: str | None = None  # what ``load_teacher`` loads; None builds ``config`` with random weights


def world_model() -> BenchModel:
    """The synthetic world's teacher: the shipped one's config if built, else the shipped ``world_teacher.yaml``."""
    cfg = load_config(WorldTeacherConfig, WORLD_CONFIG_FILE)
    shipped = DEFAULT_ASSETS / TEACHER_DIR / "config.json"
    if shipped.is_file():
        config, source = json.loads(shipped.read_text()), str(shipped.parent)
    else:
        config, source = transformer_config(cfg, cfg.autoencoder.latent_channels, cfg.text.dim), WORLD_CONFIG_FILE
    down = AutoencoderConfig()
    _, frames, height, width = WorldConfig().video_shape
    latent = (config["in_channels"], frames // down.temporal_down, height // down.spatial_down, width // down.spatial_down)
    return BenchModel("world", config, latent, cfg.text.max_length, 2, f"random (architecture of {source})")


def resolve_model(spec: str) -> BenchModel:
    """``world``, ``wan1.3b``, ``wan2.2-5b``, or anything ``load_teacher`` takes (a diffusers folder, a config file, ``tiny``)."""
    if spec == "world":
        return world_model()
    if spec == "wan1.3b":
        return BenchModel("wan1.3b", dict(WAN_1_3B_CONFIG), WAN_1_3B_LATENT, WAN_TEXT_LEN, 5, "random (Wan2.1 1.3B architecture)")
    if spec == "wan2.2-5b":
        return BenchModel(
            "wan2.2-5b", dict(WAN22_5B_CONFIG), WAN22_5B_LATENT, WAN_TEXT_LEN, 5, "random (Wan2.2 TI2V-5B architecture)"
        )
    weights = f"loaded from {spec}" if Path(spec).is_dir() else "random"
    return BenchModel(spec, None, None, None, None, weights, path=spec)


# --------------------------------------------------------------------------------------------- linear attention

ATTENTION_TOKENS = (256, 1024, 4096)
"""Sequence lengths of the softmax-vs-linear attention table; a GPU run adds ``ATTENTION_TOKENS_GPU``."""
ATTENTION_TOKENS_GPU = (16384, 32768)


def token_grid(tokens: int) -> tuple[int, int, int]:
    """A near-cubic (frames, height, width) grid of ``tokens`` post-patch cells (a power of 2)."""
    if tokens < 1 or tokens & (tokens - 1):
        raise ValueError(f"token counts must be powers of 2, got {tokens}")
    bits = tokens.bit_length() - 1
    return 2 ** (bits // 3), 2 ** ((bits + 1) // 3), 2 ** ((bits + 2) // 3)


def attention_scaling(
    teacher, tokens: tuple[int, ...], repeats: int, warmup: int, device: torch.device, text_len: int = 8
) -> list[dict[str, Any]]:
    """Latency of one transformer block per pass (batch 1) with softmax self-attention and with LinVideo's
    linear attention, at growing sequence lengths: softmax grows as n^2, linear as n."""
    linear = linearise(teacher, copy_model=True)
    round_selection(linear, 0)
    blocks = {"softmax": teacher.transformer.blocks[0], "linear": linear.transformer.blocks[0]}
    config = teacher.config
    dim = config.num_attention_heads * config.attention_head_dim
    g = torch.Generator(device).manual_seed(0)
    rows = []
    for n in tokens:
        grid = token_grid(n)
        if max(grid) > config.rope_max_seq_len:
            raise ValueError(f"{n} tokens need a {grid} grid, beyond the model's rope_max_seq_len {config.rope_max_seq_len}")
        latent = torch.zeros(
            1, config.in_channels, *(size * patch for size, patch in zip(grid, config.patch_size)), device=device
        )
        rotary = teacher.transformer.rope(latent)
        hidden = torch.randn(1, n, dim, generator=g, device=device, dtype=teacher.dtype)
        text = torch.randn(1, text_len, dim, generator=g, device=device, dtype=teacher.dtype)
        temb = 0.1 * torch.randn(1, 6, dim, generator=g, device=device, dtype=teacher.dtype)
        with torch.no_grad():
            s = time_round_robin(
                {name: lambda b=block: b(hidden, text, temb, rotary) for name, block in blocks.items()}, repeats, warmup, device
            )
        rows.append(
            {
                "tokens": n,
                "softmax_block_ms": 1000 * s["softmax"],
                "linear_block_ms": 1000 * s["linear"],
                "linear_speedup": s["softmax"] / s["linear"],
            }
        )
    for row in rows:
        row["softmax_growth"] = row["softmax_block_ms"] / rows[0]["softmax_block_ms"]
        row["linear_growth"] = row["linear_block_ms"] / rows[0]["linear_block_ms"]
    return rows


# --------------------------------------------------------------------------------------------- benchmark


FAST_PATH_KERNELS = {"cpu": ("math",), "cuda": ("math", "efficient", "flash", "cudnn")}
"""Attention kernels timed against PyTorch's own choice (``sdpa``); ``math`` is the unfused reference."""


def fast_path_table(
    teacher,
    head_blocks: int,
    noise: Tensor,
    cond: Tensor,
    t: Tensor,
    repeats: int,
    warmup: int,
    device: torch.device,
    compile: bool,
) -> list[dict[str, Any]]:
    """The same two calls under each fast-path switch, timed round-robin in one run: SDPA's own kernel
    choice against forced kernels, bf16 weights (when the bench runs fp32), and compiled blocks."""
    import copy

    def variant(model, kernel: str = "sdpa"):
        student = TMDStudent.from_teacher(model, head_blocks=head_blocks).eval()

        def forward():
            with attention_kernel(kernel):
                return model.velocity(noise, t, cond)

        def tmd():
            with attention_kernel(kernel):
                return sample_tmd(student, noise, cond, 2, 4, torch.Generator(device).manual_seed(0))

        return forward, tmd

    dtype = str(teacher.dtype).removeprefix("torch.")
    variants = {f"{dtype} eager, sdpa (PyTorch's choice)": variant(teacher)}
    for kernel in FAST_PATH_KERNELS[device.type]:
        variants[f"{dtype} eager, {kernel} kernel"] = variant(teacher, kernel)
    if teacher.dtype == torch.float32:
        bf16 = WanTeacher(cast_transformer(copy.deepcopy(teacher.transformer), torch.bfloat16)).eval()
        variants["bfloat16 eager, sdpa"] = variant(bf16)
    if compile:
        variants[f"{dtype} compiled blocks, sdpa"] = variant(compile_blocks(copy.deepcopy(teacher)))
    fns, unsupported = {}, {}
    with torch.no_grad():
        for name, (forward, tmd) in variants.items():
            try:  # a kernel may not take this dtype or shape (flash needs half precision)
                forward()
            except RuntimeError as error:
                unsupported[name] = str(error).splitlines()[0][:80]
                continue
            fns[f"{name}|forward"], fns[f"{name}|tmd"] = forward, tmd
        seconds = time_round_robin(fns, repeats, max(warmup, 1), device)
    rows, base = [], None
    for name in variants:
        if name in unsupported:
            rows.append(
                {
                    "variant": name,
                    "forward_ms": float("nan"),
                    "tmd2x4_ms": float("nan"),
                    "forward_speedup": float("nan"),
                    "tmd2x4_speedup": float("nan"),
                    "note": unsupported[name],
                }
            )
            continue
        forward_s, tmd_s = seconds[f"{name}|forward"], seconds[f"{name}|tmd"]
        base = base or (forward_s, tmd_s)
        rows.append(
            {
                "variant": name,
                "forward_ms": 1000 * forward_s,
                "tmd2x4_ms": 1000 * tmd_s,
                "forward_speedup": base[0] / forward_s,
                "tmd2x4_speedup": base[1] / tmd_s,
                "note": "",
            }
        )
    return rows


def training_steps(method_cls, cfg, teacher, batch: dict, turns: dict[str, int]) -> dict[str, Callable[[], Any]]:
    """``training_step`` of a fresh method built from ``teacher``, backward + AdamW per update, at each
    given step index (TTUR: step 0 is the generator's turn, step 1 the critics')."""
    device = batch["x"].device
    method = method_cls.from_teacher(cfg, teacher).to(device)
    method.rng = BatchRandom(torch.Generator(device).manual_seed(0))
    groups = method.parameter_groups()
    update = UpdateStep({group: torch.optim.AdamW(params, lr=1e-5) for group, params in groups.items()}, groups)

    return {name: lambda step=step: method.training_step(batch, step, update) for name, step in turns.items()}


def generator_step_ratio(teacher, batch: dict, repeats: int, warmup: int, inner_steps: int = 2) -> dict[str, Any]:
    """The TMD stage-2 generator step against the DMD2-v generator step, timed round-robin in one run, at the
    paper's settings: N = 2 inner steps, a head of H = L / 6 blocks (rounded), 2 outer steps, GAN 0.03.
    Both steps hold everything that differs (student sample with gradients) and everything that does not
    (real and fake scores, the GAN's teacher features, backward, AdamW)."""
    head_blocks = max(1, round(teacher.num_blocks / 6))
    shared = {"outer_steps": 2, "gan_weight": 0.03}
    steps = {
        "tmd": training_steps(
            get_method("tmd"),
            get_method("tmd").Config(head_blocks=head_blocks, inner_steps=inner_steps, **shared),
            teacher,
            batch,
            {"generator": 0},
        )["generator"],
        "dmd2": training_steps(get_method("dmd2"), get_method("dmd2").Config(**shared), teacher, batch, {"generator": 0})[
            "generator"
        ],
    }
    seconds = time_round_robin(steps, repeats, max(warmup, 1), batch["x"].device)
    ratio = seconds["tmd"] / seconds["dmd2"]
    return {
        "head_blocks": f"{head_blocks}/{teacher.num_blocks}",
        "inner_steps": inner_steps,
        "tmd_ms": 1000 * seconds["tmd"],
        "dmd2_ms": 1000 * seconds["dmd2"],
        "ratio": ratio,
        "extra_%": 100 * (ratio - 1),
    }
