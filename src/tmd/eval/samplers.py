"""How a trained generator of any registered method samples the world, and what that costs in effective NFE.

One place for ``tmd study`` and evaluation during training (``tmd.train.hooks``) to turn (method, config,
module, M, N) into a ``sample_fn(noise, cond, neg_cond)`` for ``WorldAssets.evaluate_sampler``; the
teacher is the method ``teacher``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tmd import flow
from tmd.data.world_data import SampleFn
from tmd.methods import get_method
from tmd.sampling import sample_teacher, sample_tmd

TRANSITION_METHODS = ("tm", "tmd")
"""Methods whose generator is a TMD student, sampled with M outer x N inner steps."""


def _options(fn: Callable, method_cfg: Any, given: set[str]) -> dict[str, Any]:
    """The sampler's keyword options that the method config holds under the same name (outer_shift, ...):
    a recipe key that changes how its students sample reaches the sampler without a change here."""
    return {
        name: getattr(method_cfg, name)
        for name in inspect.signature(fn).parameters
        if name not in given and hasattr(method_cfg, name)
    }


def sampler(
    method_name: str, method_cfg: Any, module: nn.Module, outer: int, inner: int | None, seed: int, guidance: float, shift: float
) -> SampleFn:
    """``module`` (the world teacher for ``teacher``, else a run's EMA generator) sampled as its method samples.
    Fresh noise inside the sampler (TMD's inner noise, DMD2's re-noising) comes from a generator seeded with
    ``seed`` on every call. ``guidance`` and ``shift`` serve what samples like the teacher (it, LinVideo)."""
    if method_name == "teacher":
        return lambda noise, cond, neg: sample_teacher(module, noise, cond, neg, outer, guidance, shift)
    if method_name in TRANSITION_METHODS:
        if inner is None:
            raise ValueError(f"{method_name} students sample with outer x inner steps; inner steps missing for M = {outer}")
        options = _options(sample_tmd, method_cfg, {"student", "noise", "cond", "outer_steps", "inner_steps", "generator"})
        return lambda noise, cond, neg: sample_tmd(
            module, noise, cond, outer, inner, torch.Generator().manual_seed(seed), **options
        )
    if inner is not None:
        raise ValueError(f"{method_name} has no inner steps; score it as [{outer}, null]")
    method = get_method(method_name)
    if hasattr(method, "sample_guided"):  # a multi-step velocity model: CFG like the teacher
        return lambda noise, cond, neg: method.sample_guided(module, noise, cond, neg, outer, guidance, shift)
    options = _options(method.sample, method_cfg, {"generator_module", "student", "noise", "cond", "steps", "rng"})
    return lambda noise, cond, neg: method.sample(module, noise, cond, outer, torch.Generator().manual_seed(seed), **options)


def effective_nfe(method_name: str, method_cfg: Any, outer: int, inner: int | None, num_blocks: int, guidance: float) -> float:
    if method_name in TRANSITION_METHODS:
        return flow.tmd_effective_nfe(outer, inner, method_cfg.head_blocks, num_blocks)
    if method_name == "teacher" or hasattr(get_method(method_name), "sample_guided"):
        return flow.teacher_effective_nfe(outer, guidance)
    return float(outer)


def run_steps(method_name: str, method_cfg: Any) -> tuple[int, int | None]:
    """The (M, N) a run trains for: its config's ``outer_steps`` / ``inner_steps``, else the method's first
    ``sample_steps``."""
    outer = getattr(method_cfg, "outer_steps", None)
    if outer is None:
        outer = get_method(method_name).sample_steps[0]
    return outer, method_cfg.inner_steps if method_name in TRANSITION_METHODS else None
