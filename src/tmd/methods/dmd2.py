"""DMD2-v (TMD paper, Sec. 3.2 and A.3): a plain few-step generator ``g(x_t, t) = x_t - t v`` (Eq. 17),
trained from noised data at its outer-grid times and sampled deterministically (Eq. 18). DMD2's
original recipe (backward simulation, fresh-noise re-noising) is ``student_input: backward`` with
``multistep: renoise``. One student per step count, as the paper's Table 1."""

from __future__ import annotations

import torch

from tmd import flow
from tmd.methods import register
from tmd.methods.distribution_matching import DistributionMatching, DistributionMatchingConfig
from tmd.sampling import few_step_transition


@register("dmd2")
class DMD2(DistributionMatching):
    Config = DistributionMatchingConfig

    def denoise(self, x_t, t, noise, cond):
        return flow.x0_from_velocity(x_t, self.student.velocity(x_t, t, cond), t)

    def generate(self, batch, noise, step_index):
        cond, multistep = batch["cond"], self.cfg.multistep
        grid = self.outer_grid(noise.device)
        x = noise
        with torch.no_grad():
            for i in range(step_index):
                x = few_step_transition(self.student, x, grid[i], grid[i + 1], cond, self.generator, multistep)
        return few_step_transition(self.student, x, grid[step_index], 0.0, cond, self.generator, multistep)
