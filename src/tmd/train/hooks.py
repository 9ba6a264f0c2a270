"""Evaluation during training: the trainer's ``eval_fn`` for ``train.eval_every`` on the world.

Before the first step, every ``eval_every`` steps and after the last, the EMA generator is copied into a
private module and scored on a fixed small benchmark set: ``train.eval_videos`` prompts spread over the
world's 72, one noise seed, the same videos at every point, so the curve moves only with the weights. It
draws no training randomness (its noise has its own generators): a run's weights do not depend on it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping

from torch import Tensor, nn

from tmd.config import ConfigError, RunConfig
from tmd.eval.samplers import evaluate_sampler, run_steps, sampler
from tmd.world.data import WorldAssets, eval_prompts

EVAL_NOISE_SEED = 0
CURVE_KEYS = ("total", "quality", "semantic", "frechet", "diversity", "detect_rate")


def curve_prompts(videos: int) -> list[str]:
    """``videos`` of the 72 prompts, evenly spaced in the colour-shape-direction order."""
    prompts = eval_prompts(1)
    return [prompts[i * len(prompts) // videos] for i in range(videos)]


class WorldEvalHook:
    """Logs ``eval/total`` ... and ``eval/train_seconds`` (wall-clock since the hook was built, minus its
    own evaluations: the x-axis of a curve against training time) with ``eval/seconds`` (its own cost)."""

    def __init__(self, cfg: RunConfig, exported: tuple[str, nn.Module], assets: WorldAssets):
        self.name, module = exported  # the method's generator (``Method.exported``), scored with its EMA weights
        # the EMA lives outside the module, and the trained module must not see the EMA weights
        self.model = copy.deepcopy(module).requires_grad_(False).eval().to(assets.device)
        outer, inner = run_steps(cfg.method_name, cfg.method)
        self.sample = sampler(
            cfg.method_name, cfg.method, self.model, outer, inner, EVAL_NOISE_SEED, assets.guidance, assets.shift
        )
        self.assets, self.prompts = assets, curve_prompts(cfg.train.eval_videos)
        self.start, self.eval_seconds = time.perf_counter(), 0.0

    def __call__(self, step: int, ema: Mapping[str, dict[str, Tensor]]) -> dict[str, float]:
        began = time.perf_counter()
        self.model.load_state_dict(ema[self.name])
        result = evaluate_sampler(self.assets, self.sample, self.prompts, seed=EVAL_NOISE_SEED).result.as_dict()
        seconds = time.perf_counter() - began
        train_seconds = began - self.start - self.eval_seconds
        self.eval_seconds += seconds
        return {**{k: result[k] for k in CURVE_KEYS}, "train_seconds": train_seconds, "seconds": seconds}


def eval_hook(
    cfg: RunConfig, exported: tuple[str, nn.Module], assets: WorldAssets | None, distributed: bool
) -> WorldEvalHook | None:
    """The run's ``eval_fn``: None unless ``train.eval_every`` is set."""
    if not cfg.train.eval_every:
        return None
    if assets is None:
        raise ConfigError(
            "train.eval_every scores on the synthetic world's benchmark: it needs data_kind 'world' or data made by "
            f"`tmd synthesize --model world`; this run's data_kind is {cfg.data_kind!r} with a Wan teacher"
        )
    if distributed:
        raise ConfigError("train.eval_every runs in one process only; unset it under torchrun")
    return WorldEvalHook(cfg, exported, assets)
