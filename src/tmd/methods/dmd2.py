"""DMD2 (Yin et al. 2024): a plain few-step generator with backward simulation, the baseline TMD must beat."""

from __future__ import annotations

import torch

from tmd.methods import register
from tmd.methods.distribution_matching import DistributionMatching, DistributionMatchingConfig
from tmd.sampling import few_step_transition


@register("dmd2")
class DMD2(DistributionMatching):
    Config = DistributionMatchingConfig

    def generate(self, batch, noise, step_index):
        cond = batch["cond"]
        grid = self.outer_grid(noise.device)
        x = noise
        with torch.no_grad():
            for i in range(step_index):
                x = few_step_transition(self.student, x, grid[i], grid[i + 1], cond, self.generator)
        return few_step_transition(self.student, x, grid[step_index], 0.0, cond, self.generator)
