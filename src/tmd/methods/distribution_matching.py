"""The DMD2 machinery that TMD stage 2, DMD2 and their variants share.

Each iteration: the subclass produces generator samples ``x_hat`` (``generate``); every
``generator_every``-th iteration the generator takes a DMD (+ GAN) step on them; every iteration the
fake score takes a flow-matching step and the discriminator a GAN step on the detached samples (TTUR).
Real score = frozen teacher with CFG; fake score = a trained teacher copy; both in x0 form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmd import flow
from tmd.methods.common import dmd_loss, flow_matching_loss, freeze, latent_shape, trainable_copy, x0_of, x0_real
from tmd.models.discriminator import Discriminator, default_feature_blocks
from tmd.sampling import sample_few_step
from tmd.rng import BatchRandom


@dataclass
class DistributionMatchingConfig:
    guidance: float = 5.0  # CFG scale of the real score
    tau_shift: float = 5.0  # re-noising times tau ~ shift(U[0.001, 0.999])
    generator_every: int = 5  # TTUR: critic steps per generator step
    gan_weight: float = 0.03  # 0 disables the discriminator
    disc_hidden: int = 64
    outer_steps: int = 2
    outer_shift: float = flow.OUTER_SHIFT

    def __post_init__(self):
        flow.check_guidance(self.guidance)
        flow.check_steps(self.outer_steps, "outer_steps", 16)
        if self.generator_every < 1:
            raise ValueError(f"generator_every must be >= 1, got {self.generator_every}")
        if self.gan_weight < 0:
            raise ValueError(f"gan_weight must be >= 0, got {self.gan_weight}")
        if self.tau_shift <= 0 or self.outer_shift <= 0:
            raise ValueError("tau_shift and outer_shift must be > 0")


class DistributionMatching(nn.Module):
    """Base of DMD-style methods; subclasses define ``generate(batch, i, noise)`` and the generator module."""

    def __init__(self, cfg: DistributionMatchingConfig, teacher: nn.Module, student: nn.Module, fake_score: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.teacher = freeze(teacher)
        self.student = student
        self.fake_score = fake_score
        self.generator: BatchRandom | None = None
        self.discriminator = None
        if cfg.gan_weight > 0:
            if not hasattr(teacher, "velocity_and_features"):
                raise ValueError("gan_weight > 0 needs a teacher with intermediate features (a Wan teacher); set gan_weight=0")
            self.feature_blocks = default_feature_blocks(teacher.num_blocks)
            dim = teacher.config.num_attention_heads * teacher.config.attention_head_dim
            self.discriminator = Discriminator(dim, len(self.feature_blocks), cfg.disc_hidden)

    @classmethod
    def from_teacher(cls, cfg, teacher: nn.Module, activation_checkpointing: bool = False):
        """Generator and fake score both start as copies of the teacher (DMD2's initialisation)."""
        generator = trainable_copy(teacher)
        generator.activation_checkpointing = activation_checkpointing
        return cls(cfg, teacher, generator, trainable_copy(teacher))

    def parameter_groups(self):
        groups = {"generator": list(self.student.parameters()), "fake_score": list(self.fake_score.parameters())}
        if self.discriminator is not None:
            groups["discriminator"] = list(self.discriminator.parameters())
        return groups

    def ema_modules(self):
        return {"generator": self.student}

    def state_modules(self):
        modules = {"student": self.student, "fake_score": self.fake_score}
        if self.discriminator is not None:
            modules["discriminator"] = self.discriminator
        return modules

    def outer_grid(self, device) -> Tensor:
        return flow.outer_grid(self.cfg.outer_steps, self.cfg.outer_shift).to(device=device, dtype=torch.float32)

    sample_steps: tuple[int, ...] = (1, 2)
    """Step counts at which ``tmd demo`` evaluates the trained generator."""

    @staticmethod
    def sample(generator_module: nn.Module, noise: Tensor, cond: Tensor, steps: int, rng: torch.Generator | None = None) -> Tensor:
        """How this method's trained generator samples: DMD2-style predict-x0-and-re-noise steps."""
        return sample_few_step(generator_module, noise, cond, steps, rng)

    def generate(self, batch: dict, noise: Tensor, step_index: int) -> Tensor:
        """Generator sample ``x_hat`` (x0 estimate) from outer grid time ``step_index``, backward-simulated
        there without gradients; the last transition carries gradients when they are enabled."""
        raise NotImplementedError

    def _randn(self, shape, device) -> Tensor:
        return self.generator.randn(shape, device)

    def _renoise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tau = flow.sample_shifted_uniform(x.shape[0], self.cfg.tau_shift, self.generator, x.device)
        return flow.interpolate(x, self._randn(x.shape, x.device), tau), tau

    def _logits(self, x_tau: Tensor, tau: Tensor, cond: Tensor) -> Tensor:
        _, features = self.teacher.velocity_and_features(x_tau, tau, cond, self.feature_blocks)
        return self.discriminator(features)

    def generator_loss(self, x_hat: Tensor, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        cond, neg = batch["cond"], batch["neg_cond"]
        x_tau, tau = self._renoise(x_hat)
        with torch.no_grad():
            real = x0_real(self.teacher, x_tau, tau, cond, neg, self.cfg.guidance)
            fake = x0_of(self.fake_score, x_tau, tau, cond)
        terms = {"dmd": dmd_loss(x_hat, fake, real)}
        if self.discriminator is not None:
            terms["gan"] = self.cfg.gan_weight * F.softplus(-self._logits(x_tau, tau, cond)).mean()
        return sum(terms.values()), terms

    def critic_losses(self, x_fake: Tensor, batch: dict, update) -> dict[str, float]:
        cond = batch["cond"]
        tau = flow.sample_shifted_uniform(x_fake.shape[0], self.cfg.tau_shift, self.generator, x_fake.device)
        update("fake_score", flow_matching_loss(self.fake_score, x_fake, cond, tau, self._randn(x_fake.shape, x_fake.device)))
        if self.discriminator is None:
            return {}
        if "x" not in batch:
            raise ValueError("the GAN term needs real data latents 'x' in the batch; set gan_weight=0 for data-free runs")
        noise = self._randn(x_fake.shape, x_fake.device)
        with torch.no_grad():
            fake_tau = flow.interpolate(x_fake, noise, tau)
            real_tau = flow.interpolate(batch["x"], noise, tau)
        logits_fake, logits_real = self._logits(torch.cat([fake_tau, real_tau]), tau.repeat(2), cond.repeat(2, *([1] * (cond.ndim - 1)))).chunk(2)
        d_loss = F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
        update("discriminator", d_loss)
        return {"d_real_acc": (logits_real > 0).float().mean().item(), "d_fake_acc": (logits_fake < 0).float().mean().item()}

    def training_step(self, batch, step, update):
        shape = latent_shape(batch)
        device = batch["cond"].device
        noise = self._randn(shape, device)
        step_index = self.generator.shared_randint(self.cfg.outer_steps, device)
        generator_turn = step % self.cfg.generator_every == 0
        with torch.set_grad_enabled(generator_turn):
            x_hat = self.generate(batch, noise, step_index)
        metrics = {}
        if generator_turn:
            loss, terms = self.generator_loss(x_hat, batch)
            update("generator", loss, terms)
        metrics.update(self.critic_losses(x_hat.detach(), batch, update))
        return metrics
