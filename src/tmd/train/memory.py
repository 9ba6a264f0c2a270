"""What a run will hold in memory before its first activation: printed at start so a run that cannot fit
fails in minutes, not after loading three copies of a 14B model.

``python -m tmd.train.memory --config wan14b_tmd_stage2.yaml --model wan14b [key=value ...]``
prints the same estimate for a Wan-sized run without any weights: the teacher and the method are built
on the meta device (``train.lora.rank=64`` for the LoRA figure, ``--world-size 8`` for FSDP's shards).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from torch import nn

from tmd.config import RunConfig, find_config, load_config
from tmd.methods import get_method
from tmd.models.experts import DualExpertTeacher
from tmd.models.lora import add_lora
from tmd.models.wan import WAN22_5B_CONFIG, WAN22_BOUNDARY, WAN_1_3B_CONFIG, WAN_14B_CONFIG, WanTeacher, build_transformer

GIB = 1024**3
TRAINABLE_BYTES = 16  # fp32 master weight + fp32 grad + two fp32 AdamW moments
EMA_BYTES = 4


def _unique(params) -> list[nn.Parameter]:
    return list({id(p): p for p in params}.values())


def estimate_state_memory(method, teacher: nn.Module, world_size: int = 1) -> dict[str, float]:
    """GiB per process for the frozen teacher (at its dtype), the trainable parameters with grads and AdamW
    state, the frozen parameters of the trained modules (a LoRA run's base weights, at their dtype) and
    the EMA copies of the trainable ones; divided by ``world_size`` as FSDP would shard them.
    Activations are extra."""
    trainable = _unique(p for params in method.parameter_groups().values() for p in params if p.requires_grad)
    trained_modules = _unique(p for module in method.state_modules().values() for p in module.parameters())
    frozen = [p for p in trained_modules if not p.requires_grad]
    ema = _unique(p for module in method.ema_modules().values() for p in module.parameters() if p.requires_grad)
    parts = {
        "teacher": sum(p.numel() * p.element_size() for p in teacher.parameters()) / GIB,
        "trainable": sum(p.numel() for p in trainable) * TRAINABLE_BYTES / GIB,
        "frozen": sum(p.numel() * p.element_size() for p in frozen) / GIB,
        "ema": sum(p.numel() for p in ema) * EMA_BYTES / GIB,
    }
    parts = {name: gib / world_size for name, gib in parts.items()}
    parts["total"] = sum(parts.values())
    parts["trainable_parameters"] = float(sum(p.numel() for p in trainable))
    return parts


def describe(estimate: dict[str, float]) -> str:
    return (
        f"memory estimate per process: {estimate['total']:.2f} GiB of weights and optimizer state "
        f"(frozen teacher {estimate['teacher']:.2f}, trainable + grads + AdamW {estimate['trainable']:.2f}, "
        f"frozen trained-module weights {estimate['frozen']:.2f}, EMA {estimate['ema']:.2f}; "
        f"{estimate['trainable_parameters'] / 1e6:,.1f}M trainable parameters); activations come on top"
    )


MODELS = {"wan1.3b": WAN_1_3B_CONFIG, "wan14b": WAN_14B_CONFIG, "wan2.2-5b": WAN22_5B_CONFIG, "wan2.2-a14b": WAN_14B_CONFIG}
"""Architectures an estimate can be built for; ``wan2.2-a14b`` is two experts of the 14B shape."""
STAGE2_CONFIGS = {
    "wan1.3b": "wan1.3b_tmd_stage2.yaml",
    "wan14b": "wan14b_tmd_stage2.yaml",
    "wan2.2-5b": "wan2.2_ti2v5b_tmd_stage2.yaml",
    "wan2.2-a14b": "wan2.2_a14b_tmd_stage2.yaml",
}


def model_config(name: str) -> dict[str, Any]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return dict(MODELS[name])


def build_teacher(name: str) -> nn.Module:
    """The teacher of ``name`` with random weights (on the current default device: meta for estimates)."""
    if name == "wan2.2-a14b":
        return DualExpertTeacher(*(WanTeacher(build_transformer(model_config(name))) for _ in range(2)), WAN22_BOUNDARY)
    return WanTeacher(build_transformer(model_config(name)))


def estimate_for_config(config: str | Path, model: str, overrides: list[str] = (), world_size: int = 1) -> dict[str, float]:
    """The estimate a ``tmd train --config config`` run of ``model`` would print, built on the meta device.

    The config's data and ``method.init_from`` are not read (nothing is loaded), so neither needs to exist.
    """
    import torch
    import yaml

    config = find_config(config)
    raw = yaml.safe_load(config.read_text()) or {}
    placeholders = []
    if "init_from" in (raw.get("method") or {}):
        placeholders.append("method.init_from=null")
    if raw.get("data_kind") == "prepared":
        placeholders.append("data.path=.")
    cfg = load_config(RunConfig, config, [*placeholders, *overrides])
    with torch.device("meta"):
        teacher = build_teacher(model)
        method = get_method(cfg.method_name).from_teacher(cfg.method, teacher, cfg.train.activation_checkpointing)
        if cfg.train.lora.enabled:
            add_lora(method.state_modules(), cfg.train.lora)
    return estimate_state_memory(method, teacher, world_size)


def stage2_memory_table(
    models: tuple[str, ...] = tuple(STAGE2_CONFIGS), processes: tuple[int, ...] = (8, 16)
) -> list[dict[str, Any]]:
    """Per-process GiB of the shipped TMD stage-2 config of each of ``models`` (weights and optimizer state,
    FSDP-sharded; activations extra) at ``processes``: what ``tmd bench`` prints as its memory table."""
    rows = []
    for model in models:
        config = STAGE2_CONFIGS[model]
        whole = estimate_for_config(config, model)
        for n in processes:
            rows.append(
                {
                    "model": model,
                    "config": config,
                    "processes": n,
                    **{f"{part}_gib": round(whole[part] / n, 2) for part in ("teacher", "trainable", "frozen", "ema", "total")},
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tmd.train.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="a run config, e.g. wan1.3b_tmd_stage2.yaml")
    parser.add_argument("--model", required=True, help=f"the teacher's architecture, one of {sorted(MODELS)}")
    parser.add_argument("--world-size", type=int, default=1, help="processes FSDP shards over")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lora.rank=64")
    args = parser.parse_args(argv)
    try:
        estimate = estimate_for_config(args.config, args.model, args.overrides, args.world_size)
    except (ValueError, FileNotFoundError) as error:
        print(f"python -m tmd.train.memory: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.config} on {args.model}, {args.world_size} process(es) {' '.join(args.overrides)}".rstrip())
    print(describe(estimate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
