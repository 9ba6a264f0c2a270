"""How a trained generator of any registered method samples the world, and what that costs in effective NFE.

One place for ``tmd study`` and evaluation during training (``tmd.train.hooks``) to turn (method, config,
module, M, N) into a ``sample_fn(noise, cond, neg_cond)``, and ``evaluate_sampler`` to score one on the world's benchmark; the
teacher is the method ``teacher``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tmd import flow
from tmd.methods import get_method
from tmd.sampling import sample_teacher, sample_tmd
from tmd.world.benchmark import BenchmarkResult, score_videos
from tmd.world.data import WorldAssets, eval_prompts
from tmd.world.spec import WorldConfig, sample_videos

EVAL_BATCH = 72

SampleFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``sample_fn(noise, cond, neg_cond) -> latents``; all (B, ...) tensors, latents like ``noise``."""

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


@dataclass
class SamplerScore:
    result: BenchmarkResult
    seconds_per_video: float
    """Sampling wall-clock (decoding excluded) divided by the number of videos, at ``EVAL_BATCH``."""


def reconstruction_score(assets: WorldAssets, prompts: list[str] | None = None, seed: int = 0) -> BenchmarkResult:
    """The benchmark on videos of the world autoencoded by ``assets``: the ceiling any latent-space generator can reach."""
    prompts = eval_prompts() if prompts is None else prompts
    videos = sample_videos(prompts, WorldConfig(), torch.Generator().manual_seed(seed)).videos
    with torch.no_grad():
        recon = assets.decode(assets.autoencoder.encode(videos.to(assets.device)))
    return score_videos(recon.cpu(), prompts)


def evaluate_sampler(
    assets: WorldAssets, sample_fn: SampleFn, prompts: list[str] | None = None, seed: int = 0, batch_size: int = EVAL_BATCH
) -> SamplerScore:
    """Sample with ``sample_fn`` one video per prompt (default: the fixed ``eval_prompts()`` set) from noise seeded by
    ``seed``, decode and score it; the same seed gives every sampler the same noise."""
    prompts = eval_prompts() if prompts is None else prompts
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), *assets.latent_shape(), generator=generator)
    videos, seconds = [], 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        cond, neg_cond = assets.encode_prompts(chunk)
        began = time.perf_counter()
        with torch.no_grad():
            latents = sample_fn(noise[start : start + len(chunk)].to(assets.device), cond, neg_cond)
        seconds += time.perf_counter() - began
        videos.append(assets.decode(latents).cpu())
    return SamplerScore(score_videos(torch.cat(videos), prompts), seconds / len(prompts))
