"""Decoupled DMD (Liu et al., Tongyi-MAI 2025, arXiv 2511.22677): DMD with guidance split into two terms.

The CFG-guided DMD direction ``x0_real^w - x0_fake`` is the sum of distribution matching
``DM = x0_real^c - x0_fake`` and CFG augmentation ``CA = (w - 1)(x0_real^c - x0_real^u)`` (Eq. 6). CA
is the engine that bakes guidance in, DM the regulariser, and they get decoupled re-noising times
(Eq. 8, the "hybrid" schedule of Alg. 1): CA between the generator input's time and data (the paper's
``tau_CA > t`` in its reversed time), DM over the whole range ``tau_DM ~ U(0, 1)``. The generator
minimises one proxy loss ``||G - sg(G + lambda (DM + CA))||^2`` (Alg. 1, step 6); the fake score
regresses the generator's x0 at ``tau' ~ U(0, 1)`` (Alg. 1, step 7). No GAN in the main method.

Ambiguities and choices:
- lambda: the paper's constant, here the term weights ``dm_weight`` and ``ca_weight``.
  ``dmd_normaliser: true`` divides the whole step per sample by DMD2's normaliser instead, measured
  against ``x0_real^c(tau_DM) + CA(tau_CA)``, the guided real x0 the step points to (with equal times
  exactly DMD2's ``mean|x_hat - x0_real^w|``). Measured on the closed-form mixture: with uniform
  ``tau_DM`` the normaliser inflates the many small-``tau`` steps and the DM-only ablation diverges
  (SW 1.34 -> 1.65), where the constant lambda learns (-> 0.95).
- Multi-step: backward simulation with deterministic Euler steps (``multistep``), the sampler of
  Z-Image-Turbo, the model the paper's method distilled; DMD2's re-noising is ``multistep: renoise``.
  ``student_input: data`` noises data to the outer grid instead; CA then spans each sample's own time.
- ``ca_weight`` / ``dm_weight`` scale the two terms (0: the paper's CA-only and DM-only ablations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tmd import flow
from tmd.methods import register
from tmd.methods.common import proxy_loss, x0_of
from tmd.methods.dmd2 import DMD2, DMD2Config


@dataclass
class DecoupledDMDConfig(DMD2Config):
    ca_weight: float = 1.0  # 0: DM-only ablation (plain DMD with an unguided real score)
    dm_weight: float = 1.0  # 0: CA-only ablation (diverges: DM is the regulariser)
    tau_shift: float = 1.0  # tau_DM and the fake score's tau' ~ U(0, 1) (Alg. 1)
    gan_weight: float = 0.0
    student_input: str = "backward"  # Alg. 1: the input z_t by backward simulation (data-free)
    dmd_normaliser: bool = False  # true: the step divided per sample by DMD2's mean|x_hat - x0_real^w|

    def __post_init__(self):
        super().__post_init__()
        if self.ca_weight < 0 or self.dm_weight < 0 or self.ca_weight + self.dm_weight == 0:
            raise ValueError(f"ca_weight and dm_weight must be >= 0 and not both 0, got {self.ca_weight}, {self.dm_weight}")


@register("decoupled_dmd")
class DecoupledDMD(DMD2):
    """DMD2's generator, backward simulation and fake score; only the generator loss differs."""

    Config = DecoupledDMDConfig
    trains_on_two_experts = False  # its CFG is formed from two teacher calls with one scale

    # generator_loss needs the generator input's time, which it does not receive
    def x0_from_noised(self, x_t, t, noise, cond):
        self._input_time = t
        return super().x0_from_noised(x_t, t, noise, cond)

    def x0_from_noise(self, batch, noise, step_index):
        self._input_time = self.outer_grid(noise.device)[step_index]
        return super().x0_from_noise(batch, noise, step_index)

    def generator_loss(self, x_hat, batch):
        cfg, cond, n, device = self.cfg, batch["cond"], x_hat.shape[0], x_hat.device
        tau_ca = self._input_time * flow.sample_shifted_uniform(n, 1.0, self.rng, device)
        x_ca = flow.interpolate(x_hat, self._randn(x_hat.shape, device), tau_ca)
        tau_dm, _, x_dm = self._noised(x_hat)
        with torch.no_grad():
            v_c, v_u = self.teacher.velocity(
                torch.cat([x_ca, x_ca]), tau_ca.repeat(2), torch.cat([cond, batch["neg_cond"]])
            ).chunk(2)
            ca = (cfg.guidance - 1) * (flow.x0_from_velocity(x_ca, v_c, tau_ca) - flow.x0_from_velocity(x_ca, v_u, tau_ca))
            real_dm = x0_of(self.teacher, x_dm, tau_dm, cond)
            dm = real_dm - x0_of(self.fake_score, x_dm, tau_dm, cond)
        reference = real_dm + ca if cfg.dmd_normaliser else None
        terms = {"d_dmd": proxy_loss(x_hat, cfg.dm_weight * dm + cfg.ca_weight * ca, reference)}
        if self.discriminator is not None:
            terms["gan"] = cfg.gan_weight * F.softplus(-self._logits(x_dm, tau_dm, cond)).mean()
        return sum(terms.values()), terms
