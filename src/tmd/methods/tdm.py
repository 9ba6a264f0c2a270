"""TDM, trajectory distribution matching (Luo et al. 2025, arXiv 2503.06674), sampling-steps-aware.

The K-step student samples deterministically (Euler steps of its own velocity, i.e. DDIM with its
x0 and noise predictions; :func:`sample_deterministic`). Each iteration rolls it out without gradients
to a random stage i, takes stage i's step with gradients to ``x_{t_{i+1}}`` and matches that point's
distribution to the teacher's marginal only inside the stage's own interval: ``tau ~ U(t_{i+1}, t_i)``,
``x_tau = a x_{t_{i+1}} + b eps`` (the sampling-steps-aware objective: each stage is responsible for its
interval alone). The generator step is DMD's normalised ``sg(x + x0_real^w - x0_fake)`` regression
(``x0_real^w - x0_fake = DM + CA``), 1:1 with the fake-score step.

Ambiguities and choices:
- The fake score learns the student's trajectory marginal at tau from the noisy ``x_{t_{i+1}}`` with the
  unbiased within-interval target shared with Phased DMD (:func:`tmd.methods.phased_dmd.interval_target`).
  Its importance weight ``K (t_i - t_{i+1})`` turns "stage uniform, then tau uniform in the stage" into
  tau uniform on (0, t_0): with a shifted grid the stages' intervals differ by 10x and would otherwise
  be learnt with equal effort.
- The DMD step is applied to ``x_{t_{i+1}}`` itself (through both the student's x0 and noise
  predictions); at the last stage that is the x0 regression of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tmd import flow
from tmd.methods import register
from tmd.methods.phased_dmd import IntervalMatching, IntervalMatchingConfig


@dataclass
class TDMConfig(IntervalMatchingConfig):
    generator_every: int = 1  # TDM updates generator and fake score 1:1
    critics_on_generator_steps: bool = True
    tau_shift: float = 1.0  # tau uniform in the stage's interval


def euler_step(model: nn.Module, x: Tensor, t: Tensor, t_next: Tensor, cond: Tensor) -> Tensor:
    return x + (t_next - t) * model.velocity(x, t, cond)


@register("tdm")
class TDM(IntervalMatching):
    Config = TDMConfig

    @staticmethod
    def sample(generator_module, noise, cond, steps, rng=None):
        return sample_deterministic(generator_module, noise, cond, steps)

    def generate(self, batch, noise, step_index):
        cond, grid = batch["cond"], self.outer_grid(noise.device)
        x = noise
        with torch.no_grad():
            for i in range(step_index):
                x = euler_step(self.student, x, grid[i], grid[i + 1], cond)
        n, lo, hi = noise.shape[0], grid[step_index + 1], grid[step_index]
        self._interval = (lo.expand(n), hi.expand(n), float(self.cfg.outer_steps * (hi - lo)))
        return euler_step(self.student, x, hi, lo, cond)


@torch.no_grad()
def sample_deterministic(model: nn.Module, noise: Tensor, cond: Tensor, steps: int = 2, shift: float = flow.OUTER_SHIFT) -> Tensor:
    """The TDM student's sampler: Euler steps on the outer grid, no fresh noise, no CFG."""
    grid = flow.outer_grid(steps, shift).to(device=noise.device, dtype=torch.float32)
    x = noise.float()
    for i in range(steps):
        x = euler_step(model, x, grid[i], grid[i + 1], cond)
    return x
