"""TDM, trajectory distribution matching (Luo et al. 2025, arXiv 2503.06674; official code
Luo-Yihong/TDM ``train_tdm_demo.py`` as its README runs it: ``--use_huber --use_separate``).

The K-step student samples deterministically (Euler steps of its own velocity, DDIM with its own x0
and noise; ``sample``). Each iteration rolls it out from noise without gradients and draws a stage i
*per sample*; the student's step from that stage's input ``x_{t_i}`` gives its x0 (with gradients) and
its own next point ``x_{t_{i+1}}``, which is diffused to ``tau ~ U(t_{i+1}, t_i)``, inside the stage's
own interval (the sampling-steps-aware objective). There:
- generator: loss on the student's **x0** towards ``x0 + (x0_real^c - x0_fake) + (w - 1)(x0_real^c -
  x0_real^u)``, per sample divided by ``mean|x0 - x0_real^w|``, with the pseudo-Huber metric
  ``sqrt(d^2 + c^2) - c`` (``huber_c``, the code's 1e-3; 0: squared error);
- fake score: regresses the student's x0 at ``tau``, weighted by ``min(SNR(tau), 5)`` and the code's
  importance weight ``exp(-mean(m^2)/2) / exp(-mean(eps^2)/2)``, where ``m`` is the total noise of
  ``x_tau`` about that x0 (part of it the student's own noise, not fresh Gaussian noise);
- one fake-score step per generator step; the fake score's lr 5x the generator's, AdamW betas
  (0, 0.95) for both (``optimizer_overrides``). No GAN, no data.

Ambiguities and choices:
- The grid is the outer grid (shift ``outer_shift``; the code spaces K steps uniformly in DDPM
  timesteps); the code's margins (``tau`` >= 20/1000 and 10 steps inside the stage) are
  ``U(0.001, 0.999)`` of the interval here.
- The code draws the generator's and the fake score's stages separately from one rollout, and steps
  the fake score first; here both losses share one stage draw (one student forward fewer) and the
  generator steps first, each with its own ``tau`` and noise.
- ``w``: the config's ``guidance`` (the code's ``--cfg 4.5`` is PixArt's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tmd import flow
from tmd.methods import register
from tmd.methods.common import x0_of
from tmd.methods.distribution_matching import DistributionMatching
from tmd.methods.phased_dmd import OwnOptimizerConfig, interval_coefficients, interval_noising
from tmd.sampling import few_step_transition


@dataclass
class TDMConfig(OwnOptimizerConfig):
    generator_every: int = 1  # TDM updates generator and fake score 1:1
    critics_on_generator_steps: bool = True
    gan_weight: float = 0.0
    student_input: str = "backward"  # data-free: stages come from the student's own rollout
    fake_score_lr_scale: float = 5.0
    adam_betas: tuple[float, float] = (0.0, 0.95)
    huber_c: float = 1e-3  # pseudo-Huber constant of the generator loss; 0: squared error
    snr_clamp: float = 5.0  # the fake score's weight min(SNR, 5)

    def __post_init__(self):
        super().__post_init__()
        if self.gan_weight != 0:
            raise ValueError("tdm has no GAN term; set gan_weight=0")
        if self.student_input != "backward" or self.multistep != "deterministic":
            raise ValueError(
                "tdm trains on its own deterministic rollout: student_input must be 'backward' and multistep 'deterministic'"
            )
        if self.huber_c < 0 or self.snr_clamp <= 0:
            raise ValueError(f"need huber_c >= 0 and snr_clamp > 0, got {self.huber_c}, {self.snr_clamp}")


def tdm_generator_loss(
    x0: Tensor, x0_real_c: Tensor, x0_real_u: Tensor, x0_fake: Tensor, guidance: float, huber_c: float
) -> Tensor:
    """The official code's ``loss_instruct``: the student's x0 towards ``x0 + DM + CA``, normalised per
    sample by ``mean|x0 - x0_real^w|``, pseudo-Huber (or squared) per element."""
    with torch.no_grad():
        ca = (guidance - 1) * (x0_real_c - x0_real_u)
        target = x0 + (x0_real_c - x0_fake) + ca
        scale = (x0 - x0_real_c - ca).abs().flatten(1).mean(1).clamp_min(1e-6)
    d = x0.float() - target.float()
    per_element = (d.pow(2) + huber_c**2).sqrt() - huber_c if huber_c > 0 else d.pow(2)
    return (per_element / flow.expand_time(scale, d)).mean()


@register("tdm")
class TDM(DistributionMatching):
    Config = TDMConfig

    def optimizer_overrides(self):
        return self.cfg.optimizer_overrides()

    def x0_from_noise(self, batch, noise, step_index):
        """The student's x0 at a stage drawn per sample (``step_index``, one draw per batch, is ignored)."""
        cond, grid, n = batch["cond"], self.outer_grid(noise.device), noise.shape[0]
        states = [noise]
        with torch.no_grad():
            for i in range(self.cfg.outer_steps - 1):
                states.append(few_step_transition(self.student, states[-1], grid[i], grid[i + 1], cond, self.rng))
        stage = self.rng.randint(self.cfg.outer_steps, n, noise.device)
        x_in = torch.stack(states)[stage, torch.arange(n, device=noise.device)]
        t_in, t_next = grid[stage], grid[stage + 1]
        v = self.student.velocity(x_in, t_in, cond)
        x0 = flow.x0_from_velocity(x_in, v, t_in)
        # the student's own next point, x0 with its own noise (DDIM), from which both losses diffuse
        self._stage = (
            t_next,
            t_in,
            flow.deterministic_step(x_in, x0, t_in, t_next).detach(),
            flow.noise_from_velocity(x_in, v, t_in).detach(),
        )
        return x0

    def _diffused(self, x0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(tau, x_tau, eps, m)``: ``tau ~ U(t_{i+1}, t_i)``, the stage's next point diffused there with
        fresh noise ``eps``, and the total noise ``m`` of ``x_tau = (1 - tau) x0 + tau m``."""
        t_next, t_in, x_next, eps_hat = self._stage
        tau = t_next + (t_in - t_next) * flow.sample_shifted_uniform(x0.shape[0], 1.0, self.rng, x0.device)
        eps = self._randn(x0.shape, x0.device)
        x_tau = interval_noising(x_next, t_next, tau, eps)
        a, b = interval_coefficients(t_next, tau)
        m = (flow.expand_time(a * t_next, eps) * eps_hat + flow.expand_time(b, eps) * eps) / flow.expand_time(tau, eps)
        return tau, x_tau, eps, m

    def generator_loss(self, x_hat, batch):
        tau, x_tau, _, _ = self._diffused(x_hat.detach())
        cond = batch["cond"]
        with torch.no_grad():
            v_c, v_u = self.teacher.velocity(
                torch.cat([x_tau, x_tau]), tau.repeat(2), torch.cat([cond, batch["neg_cond"]])
            ).chunk(2)
            real_c, real_u = flow.x0_from_velocity(x_tau, v_c, tau), flow.x0_from_velocity(x_tau, v_u, tau)
            fake = x0_of(self.fake_score, x_tau, tau, cond)
        loss = tdm_generator_loss(x_hat, real_c, real_u, fake, self.cfg.guidance, self.cfg.huber_c)
        return loss, {"tdm": loss}

    def critic_losses(self, x_fake, batch, update):
        tau, x_tau, eps, m = self._diffused(x_fake)
        snr = ((1 - tau) / tau) ** 2
        importance = torch.exp(-0.5 * (m.float().pow(2).flatten(1).mean(1) - eps.float().pow(2).flatten(1).mean(1)))
        error = (x0_of(self.fake_score, x_tau, tau, batch["cond"]).float() - x_fake.float()).pow(2).flatten(1).mean(1)
        update("fake_score", (error * snr.clamp(max=self.cfg.snr_clamp) * importance).mean())
        return {"importance_weight": float(importance.mean())}
