"""The rectified-flow conventions every part of tmd uses, in one place.

t = 1 is noise, t = 0 is data: ``x_t = (1 - t) x + t x1``, velocity ``v = x1 - x``,
x0-prediction ``x_t - t v``. Only the Wan wrapper converts to diffusers' ``timestep = 1000 t``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tmd.rng import Random, as_batch_random

T_MAX = 0.999
"""The first time of every grid: t = 1 exactly makes x0 = x_t - v ill-conditioned for some solvers."""

OUTER_SHIFT = 10.0
INNER_SHIFT = 10.0


def expand_time(t: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a per-sample time (B,) or a scalar against a batch tensor (B, ...)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"time must be a scalar or of shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """``x_t = (1 - t) x + t noise``."""
    t = expand_time(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: Tensor, noise: Tensor) -> Tensor:
    return noise - x


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    return x_t - expand_time(t, x_t) * v


def noise_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    return x_t + (1 - expand_time(t, x_t)) * v


def velocity_from_x0(x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    """Inverse of :func:`x0_from_velocity`; undefined at t = 0, so callers keep t > 0."""
    return (x_t - x0) / expand_time(t, x_t)


def cfg(v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``v_u + w (v_c - v_u)``; w = 1 is the plain conditional model."""
    return v_uncond + scale * (v_cond - v_uncond)


def shift(t: Tensor | float, gamma: float) -> Tensor | float:
    """Time shift ``gamma t / ((gamma - 1) t + 1)``: gamma > 1 spends more steps near noise."""
    if gamma <= 0:
        raise ValueError(f"shift factor must be > 0, got {gamma}")
    return gamma * t / ((gamma - 1) * t + 1)


def time_grid(steps: int, gamma: float, t_max: float = T_MAX, dtype=torch.float64) -> Tensor:
    """``steps + 1`` decreasing times: uniform on [1 .. 0], shifted, then the first set to ``t_max``.

    The TMD paper's footnote 2: the grid is defined on [0, 1] and its end at noise becomes 0.999 *after*
    the shift (2 steps with gamma = 10: 0.999, 0.909, 0). Computed in float64 so that the same grid
    comes out on every device and dtype.
    """
    check_steps(steps)
    if not 0 < t_max <= 1:
        raise ValueError(f"t_max must be in (0, 1], got {t_max}")
    grid = shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), gamma)
    grid[0] = t_max
    return grid.to(dtype)


def outer_grid(steps: int, gamma: float = OUTER_SHIFT) -> Tensor:
    """Student outer grid ``t_M = 0.999 > ... > t_0 = 0`` (2 steps: 0.999, 0.909, 0)."""
    return time_grid(steps, gamma)


def inner_grid(steps: int, gamma: float = INNER_SHIFT) -> Tensor:
    """Flow-head inner grid ``s_N = 0.999 > ... > s_0 = 0``, built like the outer one."""
    return time_grid(steps, gamma)


def sample_shifted_uniform(
    n: int, gamma: float, rng: Random = None, device=None, low: float = 0.001, high: float = 0.999
) -> Tensor:
    """Training times ``shift_gamma(U[low, high])``, the distribution DMD-style losses re-noise at."""
    u = as_batch_random(rng).rand(n, device)
    return shift(low + (high - low) * u, gamma)


def tmd_effective_nfe(outer_steps: int, inner_steps: int, head_blocks: int, num_blocks: int) -> float:
    """``M (1 + (N - 1) H / L)``: one full forward per outer step plus the extra head passes."""
    if not 0 < head_blocks < num_blocks:
        raise ValueError(f"head blocks must be in [1, {num_blocks - 1}], got {head_blocks}")
    check_steps(outer_steps, "outer steps")
    check_steps(inner_steps, "inner steps")
    return outer_steps * (1 + (inner_steps - 1) * head_blocks / num_blocks)


def teacher_effective_nfe(steps: int, guidance: float | None) -> float:
    """``2K`` with classifier-free guidance (two branches per step), ``K`` without."""
    check_steps(steps)
    return float(steps * (2 if guidance is not None and guidance != 1.0 else 1))


INNER_VELOCITIES = ("noise", "implied")
"""How a flow head's output ``head ~ y`` becomes the average velocity ``u`` of its inner flow map:
``noise`` is the paper's Eq. 14, ``u = y1 - head`` with ``y1`` the inner noise the rollout started from;
``implied`` infers the noise from the current state instead, ``u = (y_s - head) / s``."""


def check_inner_velocity(kind: str) -> None:
    if kind not in INNER_VELOCITIES:
        raise ValueError(f"inner_velocity must be one of {list(INNER_VELOCITIES)}, got {kind!r}")


def average_velocity(head: Tensor, y_s: Tensor, y1: Tensor, s: Tensor | float, kind: str = "noise") -> Tensor:
    """The average velocity ``u(y_s, s, r)`` a head output stands for (see :data:`INNER_VELOCITIES`)."""
    if kind == "noise":
        return y1 - head
    check_inner_velocity(kind)
    return (y_s - head) / expand_time(s, y_s)


TRANSITION_TARGETS = ("difference", "sample")
"""What the flow head estimates: ``difference`` is DTM's ``y = x1 - x`` (Eq. 3, the paper's); ``sample`` is
``y = x`` (B.4, Table 10), read from the head as the x0 estimate ``x_t - t head`` so that the head starts as
the teacher's velocity either way."""


def check_transition_target(kind: str) -> None:
    if kind not in TRANSITION_TARGETS:
        raise ValueError(f"transition_target must be one of {list(TRANSITION_TARGETS)}, got {kind!r}")


def head_estimate(head: Tensor, x_t: Tensor, t: Tensor | float, target: str = "difference") -> Tensor:
    """The estimate of ``y`` a head output stands for, given the outer state ``x_t`` at time ``t``."""
    if target == "difference":
        return head
    check_transition_target(target)
    return x_t - expand_time(t, x_t) * head


def outer_step(x_t: Tensor, y: Tensor, t: Tensor | float, t_next: Tensor | float, target: str = "difference") -> Tensor:
    """One outer transition given the sampled ``y``: DTM's ``x_t - (t - t') y`` (Eq. 4), or for ``y = x`` the
    deterministic step of Eq. 18."""
    if target == "difference":
        return x_t - (expand_time(t, x_t) - expand_time(t_next, x_t)) * y
    check_transition_target(target)
    return deterministic_step(x_t, y, t, t_next)


def inner_flow_step(y_s: Tensor, u: Tensor, s: Tensor | float, r: Tensor | float) -> Tensor:
    """The flow map ``y_r = y_s - (s - r) u`` (Eq. 13 with Eq. 8's sign: ``u`` approximates ``dy/ds``)."""
    return y_s - (expand_time(s, y_s) - expand_time(r, y_s)) * u


def deterministic_step(x_t: Tensor, x0: Tensor, t: Tensor | float, t_next: Tensor | float) -> Tensor:
    """Eq. 18: ``x_{t'} = (1 - t'/t) x0 + (t'/t) x_t``, the noise inferred from ``(x_t, x0)``; with
    ``x0 = x_t - t v`` it is the Euler step ``x_t - (t - t') v``."""
    ratio = expand_time(t_next, x_t) / expand_time(t, x_t)
    return (1 - ratio) * x0 + ratio * x_t


def check_steps(steps: int, name: str = "steps", maximum: int = 1000) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= maximum:
        raise ValueError(f"{name} must be an integer in [1, {maximum}], got {steps!r}")


def check_guidance(scale: float) -> None:
    if not (isinstance(scale, (int, float)) and 0.0 <= scale <= 100.0):
        raise ValueError(f"guidance scale must be a number in [0, 100] (1 = no guidance), got {scale!r}")
