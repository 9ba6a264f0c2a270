"""What a generation writes and how it samples, for Wan models (``tmd.programs.generate``) and the world's
(``tmd.world.generate``) alike: one mp4 per prompt named by its index and a slug of the prompt, and
``generation.json``; the step counts both default to, and the sampler options resolved and the student sampled
by what the model is. The file helpers themselves (``slug``, ``write_mp4``) live in ``tmd.files``, where
training's sample videos (``tmd.train.samples``, a layer below) reach them too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tmd import flow
from tmd.methods import sample_few_step_student
from tmd.methods.anyflow import AnyFlow
from tmd.sampling import sample_tmd

DEFAULT_TEACHER_STEPS = 50
DEFAULT_STUDENT_STEPS = 2
DEFAULT_INNER_STEPS = 4
MANIFEST_FILE = "generation.json"


@dataclass
class Sampling:
    """A generation's sampler options, defaults filled in and checked against what the model is."""

    kind: str
    steps: int
    inner_steps: int | None
    """TMD students only."""
    guidance: float | None
    """The teacher only: students are distilled with guidance baked in."""
    shift: float
    requested_shift: float | None
    """``--shift`` as given: a few-step student's method keeps its own shift where it is None."""

    def effective_nfe(self, model) -> float:
        if self.kind == "teacher":
            return flow.teacher_effective_nfe(self.steps, self.guidance)
        if self.kind == "tmd_student":
            return flow.tmd_effective_nfe(self.steps, self.inner_steps, model.head_blocks, model.num_blocks)
        flow.check_steps(self.steps)
        return float(self.steps)

    def sample_student(self, model, method: dict[str, Any] | None, noise: Tensor, cond: Tensor, seed: int) -> Tensor:
        """A student's sample from ``noise``; ``seed`` seeds the inner (TMD) or re-noising (rCM) noise."""
        if self.kind == "tmd_student":
            rng = torch.Generator(noise.device).manual_seed(seed)
            return sample_tmd(model, noise, cond, self.steps, self.inner_steps, rng, outer_shift=self.shift)
        if self.kind == "anyflow":
            return AnyFlow.sample(model, noise, cond, self.steps, outer_shift=self.shift)
        return sample_few_step_student(model, method, noise, cond, self.steps, seed, self.requested_shift)


def resolve_sampling(
    kind: str,
    source: str | Path,
    steps: int | None,
    inner_steps: int | None,
    guidance: float | None,
    shift: float | None,
    teacher_guidance: float,
    teacher_shift: Callable[[], float],
) -> Sampling:
    """``tmd generate``'s options for a model of ``kind`` read from ``source``: refused where they do not apply
    (one line), else defaulted (the teacher: ``teacher_guidance`` and ``teacher_shift()``, its scheduler's)."""
    teacher = kind == "teacher"
    if not teacher and guidance is not None:
        raise ValueError("students are sampled without CFG (distillation bakes guidance in); drop --guidance")
    if kind != "tmd_student" and inner_steps is not None:
        raise ValueError(f"--inner-steps applies to TMD students only; {source} is a {kind}")
    if steps is None:
        steps = DEFAULT_TEACHER_STEPS if teacher else DEFAULT_STUDENT_STEPS
    if shift is not None:
        resolved_shift = shift
    elif teacher:
        resolved_shift = teacher_shift()
    else:
        resolved_shift = AnyFlow.Config.outer_shift if kind == "anyflow" else flow.OUTER_SHIFT
    return Sampling(
        kind,
        steps,
        (DEFAULT_INNER_STEPS if inner_steps is None else inner_steps) if kind == "tmd_student" else None,
        (teacher_guidance if guidance is None else guidance) if teacher else None,
        resolved_shift,
        shift,
    )
