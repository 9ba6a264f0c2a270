"""How a trained generator of any registered method samples the world, and what that costs in effective NFE.

One place for ``tmd study`` and evaluation during training (``tmd.train.hooks``) to turn (method, config,
module, M, N) into a ``sample_fn(noise, cond, neg_cond)``, and ``evaluate_sampler`` to score one on the world's benchmark; the
teacher is the method ``teacher``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tmd import flow
from tmd.methods import get_method
from tmd.methods.base import SampleFn
from tmd.sampling import sample_teacher
from tmd.world.benchmark import BenchmarkResult, score_videos
from tmd.world.data import WorldAssets, eval_prompts
from tmd.world.spec import WorldConfig, sample_videos

EVAL_BATCH = 72


def sampler(
    method_name: str, method_cfg: Any, module: nn.Module, outer: int, inner: int | None, seed: int, guidance: float, shift: float
) -> SampleFn:
    """``module`` (the world teacher for ``teacher``, else a run's EMA generator) sampled as its method samples
    (``Method.sampler``). ``guidance`` and ``shift`` serve what samples like the teacher (it, LinVideo)."""
    if method_name == "teacher":
        if inner is not None:
            raise ValueError(f"the teacher has no inner steps; score it as [{outer}, null]")
        return lambda noise, cond, neg: sample_teacher(module, noise, cond, neg, outer, guidance, shift)
    return get_method(method_name).sampler(method_cfg, module, outer, inner, seed, guidance, shift)


def effective_nfe(method_name: str, method_cfg: Any, outer: int, inner: int | None, num_blocks: int, guidance: float) -> float:
    if method_name == "teacher":
        return flow.teacher_effective_nfe(outer, guidance)
    return get_method(method_name).effective_nfe(method_cfg, outer, inner, num_blocks, guidance)


def run_steps(method_name: str, method_cfg: Any) -> tuple[int, int | None]:
    """The (M, N) a run trains for (``Method.run_steps``)."""
    return get_method(method_name).run_steps(method_cfg)


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
