"""Samplers: the teacher's Euler sampler with CFG (or any diffusers scheduler), the TMD sampler (Alg. 1) and a
plain few-step sampler (Eq. 18).

All work on any model implementing the protocols in ``tmd.models.protocol`` and return the final
x0 estimate in float32. Students are sampled without CFG: distillation bakes guidance in.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor
from tqdm.auto import tqdm

from tmd import flow
from tmd.models.protocol import TransitionModel, VelocityModel
from tmd.models.wan import time_of_timestep
from tmd.rng import Random, as_batch_random


def teacher_grid(steps: int, shift: float) -> Tensor:
    """The sigmas diffusers' ``FlowMatchEulerDiscreteScheduler(shift=...)`` uses, terminal 0 included.

    Taken from the scheduler itself so that our teacher samples match ``WanPipeline``'s.
    """
    flow.check_steps(steps)
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.to(torch.float32)


def guided_velocity(
    model: VelocityModel, x_t: Tensor, t: Tensor | float, cond: Tensor, neg_cond: Tensor | None, guidance: float
) -> Tensor:
    """CFG velocity with both branches in one batched forward (one pass of twice the batch). A model with
    ``guidance_at`` (Wan2.2 A14B, ``tmd.models.experts``) sets the scale per sample, one per expert."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
    if hasattr(model, "guidance_at"):
        guidance = model.guidance_at(t.expand(x_t.shape[0]), guidance)
    if neg_cond is None or (not isinstance(guidance, Tensor) and guidance == 1.0):
        return model.velocity(x_t, t, cond)
    t2 = t.repeat(2) if t.ndim == 1 else t
    v_cond, v_uncond = model.velocity(torch.cat([x_t, x_t]), t2, torch.cat([cond, neg_cond])).chunk(2)
    return flow.cfg(v_uncond, v_cond, guidance)


def _broadcast_negative(neg_cond: Tensor | None, cond: Tensor) -> Tensor | None:
    if neg_cond is None:
        return None
    if neg_cond.shape[0] == 1 and cond.shape[0] > 1:
        neg_cond = neg_cond.expand(cond.shape[0], *neg_cond.shape[1:])
    if neg_cond.shape != cond.shape:
        raise ValueError(f"negative condition of shape {tuple(neg_cond.shape)} does not match {tuple(cond.shape)}")
    return neg_cond


@torch.no_grad()
def sample_teacher(
    model: VelocityModel,
    noise: Tensor,
    cond: Tensor,
    neg_cond: Tensor | None = None,
    steps: int = 50,
    guidance: float = 5.0,
    shift: float = 5.0,
    progress: bool = False,
) -> Tensor:
    """Euler sampling of the teacher from ``noise`` (t = 1) to data, with CFG against ``neg_cond``."""
    flow.check_guidance(guidance)
    if guidance != 1.0 and neg_cond is None:
        raise ValueError(f"guidance {guidance} needs a negative condition (neg_cond); pass guidance=1 for none")
    neg_cond = _broadcast_negative(neg_cond, cond)
    sigmas = teacher_grid(steps, shift).to(noise.device)
    x = noise.float()
    for i in tqdm(range(steps), desc="teacher", disable=not progress, leave=False):
        v = guided_velocity(model, x, sigmas[i], cond, neg_cond, guidance)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


@torch.no_grad()
def sample_with_scheduler(
    model: VelocityModel,
    noise: Tensor,
    cond: Tensor,
    neg_cond: Tensor | None,
    scheduler,
    steps: int = 50,
    guidance: float = 5.0,
    progress: bool = False,
) -> Tensor:
    """The teacher through a diffusers scheduler's ``step`` API, as ``WanPipeline`` runs it (UniPC for the
    published Wan2.1 pipelines): the scheduler picks the timesteps and combines the CFG velocities.

    diffusers' Wan predicts the flow ``noise - x0`` at ``timestep = 1000 t``, which is our velocity at ``t``,
    so the velocity goes to ``scheduler.step`` unchanged. ``scheduler`` is reset by ``set_timesteps``.
    """
    flow.check_steps(steps)
    flow.check_guidance(guidance)
    if guidance != 1.0 and neg_cond is None:
        raise ValueError(f"guidance {guidance} needs a negative condition (neg_cond); pass guidance=1 for none")
    neg_cond = _broadcast_negative(neg_cond, cond)
    scheduler.set_timesteps(steps, device=noise.device)
    scheduler.set_begin_index(0)
    x = noise.float()
    for timestep in tqdm(scheduler.timesteps, desc="teacher", disable=not progress, leave=False):
        v = guided_velocity(model, x, time_of_timestep(timestep), cond, neg_cond, guidance)
        x = scheduler.step(v, timestep, x, return_dict=False)[0].float()
    return x


ROLLOUT_GRADIENTS = ("all", "last")
"""Stage 2 back-propagates through every inner step (``all``, the paper) or only the last (``last``,
the earlier steps run without gradients: the Fig. 7 ablation)."""

MULTISTEP = ("deterministic", "renoise")
"""How a plain few-step generator moves between outer times: ``deterministic`` is the paper's Eq. 18
(the noise inferred from the current state, an Euler step); ``renoise`` is DMD2's Eq. 19 (fresh noise)."""


def head_rollout(
    student: TransitionModel, x_t: Tensor, t: Tensor | float, y1: Tensor, features, grid: Tensor, gradients: str = "all"
) -> Tensor:
    """The inner flow (Alg. 1's ``InnerFlow``) of the outer state ``x_t``: from the inner noise ``y1`` at
    ``s_N`` through the grid to 0.

    Each step is the flow map ``y_r = y_s - (s - r) u`` with ``u`` from the head as the student's
    ``inner_velocity`` and ``transition_target`` say (Eq. 14: ``u = y1 - head``). Not wrapped in no_grad:
    stage 2 back-propagates through the rollout (every step, or only the last with ``gradients="last"``).
    """
    if gradients not in ROLLOUT_GRADIENTS:
        raise ValueError(f"rollout gradients must be one of {list(ROLLOUT_GRADIENTS)}, got {gradients!r}")
    y, last = y1, len(grid) - 2
    grad_enabled = torch.is_grad_enabled()
    for j in range(len(grid) - 1):
        with torch.set_grad_enabled(grad_enabled and (gradients == "all" or j == last)):
            head = flow.head_estimate(student.head(y, grid[j], grid[j + 1], features), x_t, t, student.transition_target)
            u = flow.average_velocity(head, y, y1, grid[j], student.inner_velocity)
            y = flow.inner_flow_step(y, u, grid[j], grid[j + 1])
    return y


def _randn_like(x: Tensor, rng: Random) -> Tensor:
    return as_batch_random(rng).randn(x.shape, x.device)


def tmd_transition(
    student: TransitionModel,
    x: Tensor,
    t: Tensor,
    t_next: Tensor | float,
    cond: Tensor,
    inner: Tensor,
    rng,
    gradients: str = "all",
) -> Tensor:
    """One outer TMD step (Alg. 1): backbone once, the head rolled out from fresh inner noise, then the
    deterministic step to t_next (Eq. 4's DTM step ``x - (t - t_next) y``). Gradients flow when enabled."""
    features = student.backbone(x, t, cond)
    y = head_rollout(student, x, t, _randn_like(x, rng), features, inner, gradients)
    return flow.outer_step(x, y, t, t_next, student.transition_target)


def check_multistep(multistep: str) -> None:
    if multistep not in MULTISTEP:
        raise ValueError(f"multistep must be one of {list(MULTISTEP)}, got {multistep!r}")


def few_step_transition(
    model: VelocityModel, x: Tensor, t: Tensor, t_next: Tensor | float, cond: Tensor, rng, multistep: str = "deterministic"
) -> Tensor:
    """One step of a plain few-step generator ``g(x_t, t) = x_t - t v`` (Eq. 17) from t to t_next: Eq. 18's
    deterministic step, or with ``multistep="renoise"`` DMD2's fresh-noise re-noising (Eq. 19)."""
    check_multistep(multistep)
    x0 = flow.x0_from_velocity(x, model.velocity(x, t, cond), t)
    if float(torch.as_tensor(t_next).max()) == 0:
        return x0
    if multistep == "deterministic":
        return flow.deterministic_step(x, x0, t, t_next)
    return flow.interpolate(x0, _randn_like(x, rng), t_next)


@torch.no_grad()
def sample_tmd(
    student: TransitionModel,
    noise: Tensor,
    cond: Tensor,
    outer_steps: int = 2,
    inner_steps: int = 4,
    rng: torch.Generator | None = None,
    outer_shift: float = flow.OUTER_SHIFT,
    inner_shift: float = flow.INNER_SHIFT,
) -> Tensor:
    """M outer transitions, each: backbone once, N head steps from fresh inner noise, one DTM step."""
    outer = flow.outer_grid(outer_steps, outer_shift).to(device=noise.device, dtype=torch.float32)
    inner = flow.inner_grid(inner_steps, inner_shift).to(device=noise.device, dtype=torch.float32)
    x = noise.float()
    for i in range(outer_steps):
        x = tmd_transition(student, x, outer[i], outer[i + 1], cond, inner, rng)
    return x


@torch.no_grad()
def sample_few_step(
    model: VelocityModel,
    noise: Tensor,
    cond: Tensor,
    steps: int = 2,
    rng: torch.Generator | None = None,
    shift: float = flow.OUTER_SHIFT,
    multistep: str = "deterministic",
) -> Tensor:
    """A plain few-step generator on the outer grid: deterministic Eq. 18 steps (DMD2-v), or DMD2's
    re-noising with ``multistep="renoise"`` (the only use of ``rng``)."""
    grid = flow.outer_grid(steps, shift).to(device=noise.device, dtype=torch.float32)
    x = noise.float()
    for i in range(steps):
        x = few_step_transition(model, x, grid[i], grid[i + 1], cond, rng, multistep)
    return x
