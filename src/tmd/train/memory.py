"""What a run will hold in memory before its first activation: printed at start so a run that cannot fit
fails in minutes, not after loading three copies of a 14B model."""

from __future__ import annotations

from torch import nn

GIB = 1024**3
TRAINABLE_BYTES = 16  # fp32 master weight + fp32 grad + two fp32 AdamW moments
EMA_BYTES = 4


def _numel(modules) -> int:
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def estimate_state_memory(method, teacher: nn.Module, world_size: int = 1) -> dict[str, float]:
    """GiB per process for the frozen teacher (at its dtype), the trainable parameters with grads and AdamW
    state, and the EMA copies; divided by ``world_size`` as FSDP would shard them. Activations are extra."""
    trainable = sum(p.numel() for params in method.parameter_groups().values() for p in params)
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    parts = {
        "teacher": teacher_bytes / GIB,
        "trainable": trainable * TRAINABLE_BYTES / GIB,
        "ema": _numel(method.ema_modules().values()) * EMA_BYTES / GIB,
    }
    parts = {name: gib / world_size for name, gib in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def describe(estimate: dict[str, float]) -> str:
    return (f"memory estimate per process: {estimate['total']:.2f} GiB of weights and optimizer state "
            f"(frozen teacher {estimate['teacher']:.2f}, trainable + grads + AdamW {estimate['trainable']:.2f}, "
            f"EMA {estimate['ema']:.2f}); activations come on top")
