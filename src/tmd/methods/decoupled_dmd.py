"""Decoupled DMD (Liu et al., Tongyi-MAI 2025, arXiv 2511.22677): DMD with guidance split into two terms.

The CFG-guided DMD direction ``x0_real^w - x0_fake`` is the sum of distribution matching
``DM = x0_real^c - x0_fake`` and CFG augmentation ``CA = (w - 1)(x0_real^c - x0_real^u)``. CA is the
engine that bakes guidance in, DM the regulariser; each gets its own weight and its own re-noising:
CA at ``tau ~ U(0, t)`` below the generator's input time t, DM at the usual distribution.

Ambiguities and choices:
- Normalisation: each term is divided per sample by ``mean|x_hat - x0_real^w|`` at its own re-noised
  point (DMD's normaliser), so with equal times and weights 1 the sum is exactly the DMD step.
- ``dm_schedule = "shifted"`` draws ``tau_DM`` as DMD2 does (``shift_{tau_shift}(U)``), ``"uniform"``
  as the paper's hybrid schedule (``U(0.001, 0.999)``).
- The GAN term, when on, sees the DM re-noised sample (the DM term is the regulariser it complements).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tmd import flow
from tmd.methods import register
from tmd.methods.common import dmd_loss, x0_of
from tmd.methods.dmd2 import DMD2, DMD2Config

DM_SCHEDULES = ("shifted", "uniform")


@dataclass
class DecoupledDMDConfig(DMD2Config):
    ca_weight: float = 1.0  # 0: DM-only ablation (plain DMD with an unguided real score)
    dm_weight: float = 1.0  # 0: CA-only ablation
    dm_schedule: str = "shifted"
    student_input: str = "backward"  # its CA schedule is tied to the simulated input time
    multistep: str = "renoise"
    fake_score_target: str = "velocity"

    def __post_init__(self):
        super().__post_init__()
        if self.ca_weight < 0 or self.dm_weight < 0 or self.ca_weight + self.dm_weight == 0:
            raise ValueError(f"ca_weight and dm_weight must be >= 0 and not both 0, got {self.ca_weight}, {self.dm_weight}")
        if self.dm_schedule not in DM_SCHEDULES:
            raise ValueError(f"dm_schedule must be one of {DM_SCHEDULES}, got {self.dm_schedule!r}")


@register("decoupled_dmd")
class DecoupledDMD(DMD2):
    """DMD2's generator and backward simulation; only the generator loss differs."""

    Config = DecoupledDMDConfig

    def generate(self, batch, noise, step_index):
        # the CA schedule depends on the generator's input time, which generator_loss does not receive
        self._input_time = float(self.outer_grid(noise.device)[step_index])
        return super().generate(batch, noise, step_index)

    def _real_x0(self, x_tau, tau, batch):
        """Conditional, unconditional and guided teacher x0 in one batched forward."""
        cond, neg = batch["cond"], batch["neg_cond"]
        v_c, v_u = self.teacher.velocity(torch.cat([x_tau, x_tau]), tau.repeat(2), torch.cat([cond, neg])).chunk(2)
        x0_c, x0_u = flow.x0_from_velocity(x_tau, v_c, tau), flow.x0_from_velocity(x_tau, v_u, tau)
        return x0_c, x0_u, x0_u + self.cfg.guidance * (x0_c - x0_u)

    def _renoise_at(self, x, tau):
        return flow.interpolate(x, self._randn(x.shape, x.device), tau)

    def generator_loss(self, x_hat, batch):
        cfg, n, device = self.cfg, x_hat.shape[0], x_hat.device
        terms = {}
        if cfg.ca_weight > 0:
            tau = self._input_time * (0.001 + 0.998 * self.generator.rand(n, device))
            with torch.no_grad():
                x0_c, _, x0_w = self._real_x0(self._renoise_at(x_hat, tau), tau, batch)
            # gradient (x0_c - x0_w) / |x - x0_w| = -(w - 1)(x0_c - x0_u) / |x - x0_w|: the CA direction
            terms["ca"] = cfg.ca_weight * dmd_loss(x_hat, x0_c, x0_w)
        if cfg.dm_weight > 0:
            gamma = cfg.tau_shift if cfg.dm_schedule == "shifted" else 1.0
            tau = flow.sample_shifted_uniform(n, gamma, self.generator, device)
            x_tau = self._renoise_at(x_hat, tau)
            with torch.no_grad():
                x0_c, _, x0_w = self._real_x0(x_tau, tau, batch)
                fake = x0_of(self.fake_score, x_tau, tau, batch["cond"])
            # dmd_loss normalises by its third argument; shift the pair so that it is x0_w and the step fake - x0_c
            terms["dm"] = cfg.dm_weight * dmd_loss(x_hat, fake - x0_c + x0_w, x0_w)
            if self.discriminator is not None:
                terms["gan"] = cfg.gan_weight * F.softplus(-self._logits(x_tau, tau, batch["cond"])).mean()
        return sum(terms.values()), terms
