"""DMD2-v (TMD paper, Sec. 3.2 and A.3): a plain few-step generator ``g(x_t, t) = x_t - t v`` (Eq. 17),
trained from noised data at its outer-grid times and sampled deterministically (Eq. 18). DMD2's
original recipe (backward simulation, fresh-noise re-noising) is ``student_input: backward`` with
``multistep: renoise``. One student per step count, as the paper's Table 1. ``kd_warmup_steps`` first
regresses the student's one-step output on the teacher's samples from the same noise (Table 4's KD
warm-up, which the paper applies to one-step students only), the stored pairs of a ``tmd synthesize
--keep-noise`` folder where the data has them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tmd import flow
from tmd.methods import register
from tmd.methods.common import latent_shape
from tmd.methods.distribution_matching import DistributionMatching, DistributionMatchingConfig
from tmd.sampling import few_step_transition, sample_teacher


@dataclass
class DMD2Config(DistributionMatchingConfig):
    kd_warmup_steps: int = 0  # iterations of KD warm-up before distribution matching (Table 4: one-step students)
    kd_teacher_steps: int = 50  # the teacher's Euler steps (with CFG `guidance`) for each KD target
    kd_teacher_shift: float = 5.0  # the teacher sampler's time shift

    def __post_init__(self):
        super().__post_init__()
        if self.kd_warmup_steps < 0:
            raise ValueError(f"kd_warmup_steps must be >= 0, got {self.kd_warmup_steps}")
        flow.check_steps(self.kd_teacher_steps, "kd_teacher_steps")


@register("dmd2")
class DMD2(DistributionMatching):
    Config = DMD2Config
    trains_on_two_experts = True

    def x0_from_noised(self, x_t, t, noise, cond):
        return flow.x0_from_velocity(x_t, self.student.velocity(x_t, t, cond), t)

    def x0_from_noise(self, batch, noise, step_index):
        cond, multistep = batch["cond"], self.cfg.multistep
        grid = self.outer_grid(noise.device)
        x = noise
        with torch.no_grad():
            for i in range(step_index):
                x = few_step_transition(self.student, x, grid[i], grid[i + 1], cond, self.rng, multistep)
        return few_step_transition(self.student, x, grid[step_index], 0.0, cond, self.rng, multistep)

    def kd_loss(self, batch: dict) -> torch.Tensor:
        """Knowledge distillation: the one-step output from pure noise regresses the teacher's multi-step CFG
        sample from the same noise. Data that stores its noise (``tmd synthesize --keep-noise``) is a fixed set
        of the teacher's noise-data pairs, as the paper's 10k (Table 4): ``x`` is the teacher's sample from
        ``noise``. Otherwise the pairs are drawn afresh each step with tmd's Euler sampler."""
        if "noise" in batch and "x" in batch:
            noise, target = batch["noise"], batch["x"]
        else:
            noise = self._randn(latent_shape(batch), batch["cond"].device)
            cfg = self.cfg
            target = sample_teacher(
                self.teacher, noise, batch["cond"], batch["neg_cond"], cfg.kd_teacher_steps, cfg.guidance, cfg.kd_teacher_shift
            )
        t = self.outer_grid(noise.device)[0]
        return (self.x0_from_noised(noise, t.expand(noise.shape[0]), noise, batch["cond"]).float() - target.float()).pow(2).mean()

    def training_step(self, batch, step, update):
        if step < self.cfg.kd_warmup_steps:
            loss = self.kd_loss(batch)
            update("generator", loss, {"kd": loss})
            return {}
        return super().training_step(batch, step, update)
