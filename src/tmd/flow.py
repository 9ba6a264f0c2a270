"""The rectified-flow conventions every part of tmd uses, in one place.

t = 1 is noise, t = 0 is data: ``x_t = (1 - t) x + t x1``, velocity ``v = x1 - x``,
x0-prediction ``x_t - t v``. Only the Wan wrapper converts to diffusers' ``timestep = 1000 t``.
"""

from __future__ import annotations

import torch
from tmd.rng import Random, as_batch_random
from torch import Tensor

T_MAX = 0.999
"""The first time of every grid: t = 1 exactly makes x0 = x_t - v ill-conditioned for some solvers."""

OUTER_SHIFT = 10.0
INNER_SHIFT = 10.0


def _expand(t: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a per-sample time (B,) or a scalar against a batch tensor (B, ...)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"time must be a scalar or of shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """``x_t = (1 - t) x + t noise``."""
    t = _expand(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: Tensor, noise: Tensor) -> Tensor:
    return noise - x


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    return x_t - _expand(t, x_t) * v


def noise_from_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    return x_t + (1 - _expand(t, x_t)) * v


def velocity_from_x0(x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    """Inverse of :func:`x0_from_velocity`; undefined at t = 0, so callers keep t > 0."""
    return (x_t - x0) / _expand(t, x_t)


def cfg(v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``v_u + w (v_c - v_u)``; w = 1 is the plain conditional model."""
    return v_uncond + scale * (v_cond - v_uncond)


def shift(t: Tensor | float, gamma: float) -> Tensor | float:
    """Time shift ``gamma t / ((gamma - 1) t + 1)``: gamma > 1 spends more steps near noise."""
    if gamma <= 0:
        raise ValueError(f"shift factor must be > 0, got {gamma}")
    return gamma * t / ((gamma - 1) * t + 1)


def time_grid(steps: int, gamma: float, t_max: float = T_MAX, dtype=torch.float64) -> Tensor:
    """``steps + 1`` decreasing times: uniform on (t_max .. 0], then shifted. First is shift(t_max), last 0.

    The grid is computed in float64 so that the same grid comes out on every device and dtype.
    """
    check_steps(steps)
    if not 0 < t_max <= 1:
        raise ValueError(f"t_max must be in (0, 1], got {t_max}")
    uniform = torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64)
    return shift(uniform, gamma).to(dtype)


def outer_grid(steps: int, gamma: float = OUTER_SHIFT) -> Tensor:
    """Student outer grid of DESIGN.md section 2 (2 steps: 0.999, 0.909, 0 before shift -> shifted)."""
    return time_grid(steps, gamma)


def inner_grid(steps: int, gamma: float = INNER_SHIFT) -> Tensor:
    return time_grid(steps, gamma)


def sample_shifted_uniform(
    n: int, gamma: float, generator: Random = None, device=None, low: float = 0.001, high: float = 0.999
) -> Tensor:
    """Training times ``shift_gamma(U[low, high])``, the distribution DMD-style losses re-noise at."""
    u = as_batch_random(generator).rand(n, device)
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


def inner_flow_step(y_s: Tensor, y_hat: Tensor, s: Tensor | float, r: Tensor | float) -> Tensor:
    """One inner flow-map step ``f(y_s, s, r) = y_s - (s - r) u`` with ``u = (y_s - y_hat) / s``.

    From s to r = 0 it returns ``y_hat`` exactly, so a one-step head is the teacher-initialised estimate.
    """
    s = _expand(s, y_s)
    r = _expand(r, y_s)
    return y_s - (s - r) * (y_s - y_hat) / s


def check_steps(steps: int, name: str = "steps", maximum: int = 1000) -> None:
    if not isinstance(steps, int) or not 1 <= steps <= maximum:
        raise ValueError(f"{name} must be an integer in [1, {maximum}], got {steps!r}")


def check_guidance(scale: float) -> None:
    if not (isinstance(scale, (int, float)) and 0.0 <= scale <= 100.0):
        raise ValueError(f"guidance scale must be a number in [0, 100] (1 = no guidance), got {scale!r}")
