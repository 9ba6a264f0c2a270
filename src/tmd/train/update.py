"""One optimizer step of one parameter group, as the trainer takes it, for everything that runs a method's
``training_step(batch, step, update)``: the trainer, the bench, the GPU check and the tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tmd.errors import NonFiniteLossError


class EMA:
    """Exponential moving average of a module's state, kept in fp32 outside the module.

    Floating entries (trainable parameters and float buffers) are averaged; others (counters) are
    copied. Parameters the method has frozen (``requires_grad=False``: a LoRA run's base weights, a
    finished Phased DMD expert that later phases train against) are used as they are, so their EMA is
    the part itself, read from the module instead of being held twice.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.module = module
        self.decay = decay
        frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
        self.shadow = {
            k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
            for k, v in module.state_dict().items()
            if k not in frozen
        }

    def full_state(self) -> dict[str, Tensor]:
        """The averaged state with the frozen entries filled in: loadable into the module."""
        return {**self.module.state_dict(), **self.shadow}

    @torch.no_grad()
    def update(self) -> None:
        current = self.module.state_dict()
        frozen = {name for name, p in self.module.named_parameters() if not p.requires_grad}
        floats = [k for k, v in self.shadow.items() if v.is_floating_point() and k not in frozen]
        if floats:
            torch._foreach_lerp_([self.shadow[k] for k in floats], [current[k].float() for k in floats], 1.0 - self.decay)
        for k, v in self.shadow.items():
            if k in frozen or not v.is_floating_point():
                v.copy_(current[k])


def optimizer_settings(
    method, groups, lr: float, betas: tuple[float, float], lr_groups: dict[str, float] | None = None
) -> dict[str, dict[str, Any]]:
    """Each group's ``lr`` and ``betas``: ``lr_groups[name]`` if given, else ``lr`` times the method's own
    ``lr_scale`` for the group (``optimizer_overrides()``), and the method's ``betas`` in place of ``betas``."""
    overrides = getattr(method, "optimizer_overrides", dict)()
    if set(overrides) - set(groups):
        raise ValueError(f"optimizer_overrides names unknown groups {sorted(set(overrides) - set(groups))}")
    lr_groups = lr_groups or {}
    return {
        name: {
            "lr": lr_groups.get(name, lr * overrides.get(name, {}).get("lr_scale", 1.0)),
            "betas": overrides.get(name, {}).get("betas", betas),
        }
        for name in groups
    }


class UpdateStep:
    """``update(group, loss, terms=None)`` for a method's ``training_step``: zero every group's gradients,
    back-propagate ``loss`` outside autocast, clip the group's gradient norm to ``grad_clip`` (None: measure
    only), step its optimizer and update the EMAs of the modules it trains. The trainer splits the same step
    into :meth:`backward` per micro-batch and :meth:`step` after the last (gradient accumulation).
    A non-finite gradient norm raises ``NonFiniteLossError`` before anything is updated."""

    def __init__(
        self,
        optimizers: Mapping[str, torch.optim.Optimizer],
        groups: Mapping[str, list[nn.Parameter]],
        grad_clip: float | None = None,
        emas: Mapping[str, EMA] | None = None,
        stop_on_nonfinite: bool = True,
    ):
        self.optimizers, self.groups, self.grad_clip = optimizers, groups, grad_clip
        self.stop_on_nonfinite = stop_on_nonfinite
        """False only where a timing, not the weights, is the point (the GPU check's CPU rehearsal in bf16)."""
        self.emas = dict(emas or {})
        self.ema_owner = {name: self._owner_group(name, ema.module) for name, ema in self.emas.items()}
        self.grad_norms: dict[str, float] = {}
        """The last gradient norm of each group (before clipping)."""

    def _owner_group(self, ema_name: str, module: nn.Module) -> str:
        group_of = {id(p): group for group, params in self.groups.items() for p in params}
        owners = {group_of.get(id(p)) for p in module.parameters() if p.requires_grad}
        if len(owners) != 1 or None in owners:
            raise ValueError(
                f"EMA module {ema_name!r}: its trainable parameters must all belong to exactly one group, "
                f"found {sorted(str(o) for o in owners)} (None: in no group)"
            )
        return owners.pop()

    def __call__(self, group: str, loss: Tensor, terms: Mapping[str, Tensor] | None = None) -> None:
        with torch.autocast(loss.device.type, enabled=False):
            self.backward(loss)
            self.step(group)

    def zero_grad(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        self.zero_grad()
        loss.backward()

    def step(self, group: str) -> float:
        """Clip, check, step the group's optimizer and its EMAs; returns the gradient norm."""
        max_norm = self.grad_clip if self.grad_clip is not None else float("inf")
        grad_norm = float(_full(torch.nn.utils.clip_grad_norm_(self.groups[group], max_norm)))
        if not np.isfinite(grad_norm) and self.stop_on_nonfinite:
            raise NonFiniteLossError(f"non-finite gradient norm in group {group!r}; stopped before updating")
        self.optimizers[group].step()
        for name, ema in self.emas.items():
            if self.ema_owner[name] == group:
                ema.update()
        self.grad_norms[group] = grad_norm
        return grad_norm


def _full(value: Tensor) -> Tensor:
    """A gradient norm over sharded parameters is a DTensor; its value is the same on every rank."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value
