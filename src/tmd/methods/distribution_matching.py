"""The DMD2-v machinery that TMD stage 2, DMD2-v and their variants share (TMD paper, Alg. 2 and A.3).

Every ``generator_every``-th iteration the student takes a VSD (+ GAN) step; on the iterations in between
the fake score and the discriminator take theirs (TTUR, as FastGen's Wan DMD2 recipe). The student's input
is noised data ``x_{t_i} = (1 - t_i) x + t_i x1`` at a time of the outer grid (no backward simulation);
``student_input: backward`` simulates the student from noise to ``t_i`` instead (DMD2's recipe).
Real score = the frozen teacher with CFG; fake score = a trained teacher copy; both in x0 form (Eq. 17).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmd import flow
from tmd.methods.base import Method, SampleFn
from tmd.methods.common import dmd_loss, freeze, latent_shape, trainable_copy, x0_of, x0_real
from tmd.models.discriminator import Discriminator, default_feature_blocks
from tmd.models.experts import student_expert
from tmd.sampling import MULTISTEP, sample_few_step

STUDENT_INPUTS = ("data", "backward")
FAKE_SCORE_TARGETS = ("x0", "velocity")


@dataclass
class DistributionMatchingConfig:
    guidance: float = 5.0  # CFG scale of the real score
    tau_shift: float = 5.0  # re-noising times t_dmd ~ shift(U[0.001, 0.999])
    generator_every: int = 5  # TTUR: the student steps on every k-th iteration, the critics on the others
    critics_on_generator_steps: bool = False  # true: the critics step on the student's iterations too
    gan_weight: float = 0.03  # 0 disables the discriminator
    disc_hidden: int = 64
    outer_steps: int = 2
    outer_shift: float = flow.OUTER_SHIFT
    student_input: str = "data"  # data: noised data at an outer-grid time (the paper); backward: simulated from noise
    multistep: str = "deterministic"  # backward simulation of a plain student: Eq. 18, or "renoise" (DMD2's Eq. 19)
    fake_score_target: str = "x0"  # x0 regression (A.3, FastGen's Wan recipe); "velocity": flow matching

    def __post_init__(self):
        flow.check_guidance(self.guidance)
        flow.check_steps(self.outer_steps, "outer_steps", 16)
        if self.generator_every < 1:
            raise ValueError(f"generator_every must be >= 1, got {self.generator_every}")
        if self.generator_every == 1 and not self.critics_on_generator_steps:
            raise ValueError("generator_every=1 leaves no iteration for the critics; set critics_on_generator_steps=true")
        if self.gan_weight < 0:
            raise ValueError(f"gan_weight must be >= 0, got {self.gan_weight}")
        if self.tau_shift <= 0 or self.outer_shift <= 0:
            raise ValueError("tau_shift and outer_shift must be > 0")
        if self.student_input not in STUDENT_INPUTS:
            raise ValueError(f"student_input must be one of {list(STUDENT_INPUTS)}, got {self.student_input!r}")
        if self.fake_score_target not in FAKE_SCORE_TARGETS:
            raise ValueError(f"fake_score_target must be one of {list(FAKE_SCORE_TARGETS)}, got {self.fake_score_target!r}")
        if self.multistep not in MULTISTEP:
            raise ValueError(f"multistep must be one of {list(MULTISTEP)}, got {self.multistep!r}")


class DistributionMatching(Method):
    """Base of DMD-style methods. Subclasses define ``x0_from_noised`` (the generator's x0 sample from a noised
    input, with gradients) and ``x0_from_noise`` (the same after backward simulation from noise)."""

    export_module = "generator"

    def __init__(self, cfg: DistributionMatchingConfig, teacher: nn.Module, student: nn.Module, fake_score: nn.Module):
        super().__init__(cfg)
        self.teacher = freeze(teacher)
        self.student = student
        self.fake_score = fake_score
        self.discriminator = None
        if cfg.gan_weight > 0:
            if not hasattr(teacher, "velocity_and_features"):
                raise ValueError("gan_weight > 0 needs a teacher with intermediate features (a Wan teacher); set gan_weight=0")
            self.feature_blocks = default_feature_blocks(teacher.num_blocks)
            config = teacher.config
            patch_volume = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
            channels = config.num_attention_heads * config.attention_head_dim // patch_volume
            self.discriminator = Discriminator(channels, len(self.feature_blocks), cfg.disc_hidden)

    @classmethod
    def from_teacher(cls, cfg, teacher: nn.Module, activation_checkpointing: bool = False):
        """Generator and fake score both start as copies of the teacher (DMD2's initialisation); for a Wan2.2 A14B
        the generator copies the expert of its outer times and the fake score both experts (docs/methods.md)."""
        generator = trainable_copy(student_expert(teacher, cfg.outer_steps, cfg.outer_shift))
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

    @staticmethod
    def sample(
        generator_module: nn.Module,
        noise: Tensor,
        cond: Tensor,
        steps: int,
        rng: torch.Generator | None = None,
        outer_shift: float = flow.OUTER_SHIFT,
        multistep: str = "deterministic",
    ) -> Tensor:
        """How this method's trained generator samples: deterministic Eq. 18 steps (DMD2-v) on the outer grid.
        ``outer_shift`` and ``multistep`` take the values of the run's method-config keys of the same names."""
        return sample_few_step(generator_module, noise, cond, steps, rng, outer_shift, multistep)

    @classmethod
    def runs_in_stock_pipeline(cls, cfg) -> bool:
        return cfg.multistep == "deterministic"  # an Euler step is Eq. 18; DMD2's re-noising draws fresh noise

    @classmethod
    def sampler(cls, cfg, module, outer, inner, seed, guidance, shift) -> SampleFn:
        cls.check_steps(outer, inner)
        return lambda noise, cond, neg: cls.sample(
            module, noise, cond, outer, torch.Generator(noise.device).manual_seed(seed), cfg.outer_shift, cfg.multistep
        )

    def x0_from_noised(self, x_t: Tensor, t: Tensor, noise: Tensor, cond: Tensor) -> Tensor:
        """The generator's sample ``x_hat`` from the noised data ``x_t = (1 - t) x + t noise`` (per-sample t)."""
        raise NotImplementedError

    def x0_from_noise(self, batch: dict, noise: Tensor, step_index: int) -> Tensor:
        """Generator sample ``x_hat`` (x0 estimate) from outer grid time ``step_index``, backward-simulated
        there without gradients; the last transition carries gradients when they are enabled."""
        raise NotImplementedError

    def generator_sample(self, batch: dict) -> Tensor:
        """``x_hat`` for this iteration, from the configured student input (with gradients when enabled)."""
        if self.cfg.student_input == "backward":
            noise = self._randn(latent_shape(batch), batch["cond"].device)
            return self.x0_from_noise(batch, noise, self.rng.shared_randint(self.cfg.outer_steps, noise.device))
        if "x" not in batch:
            raise ValueError(
                "student_input=data noises data latents 'x', which this batch lacks; set method.student_input=backward"
            )
        x = batch["x"]
        grid = self.outer_grid(x.device)
        t = grid[self.rng.randint(self.cfg.outer_steps, x.shape[0], x.device)]
        noise = self._randn(x.shape, x.device)
        return self.x0_from_noised(flow.interpolate(x, noise, t), t, noise, batch["cond"])

    def _randn(self, shape, device) -> Tensor:
        return self.rng.randn(shape, device)

    def _noised(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, eps, x_t)``: a DMD time ``t ~ shift(U[0.001, 0.999])``, fresh noise, and ``x`` noised with them."""
        t = flow.sample_shifted_uniform(x.shape[0], self.cfg.tau_shift, self.rng, x.device)
        eps = self._randn(x.shape, x.device)
        return t, eps, flow.interpolate(x, eps, t)

    def _renoise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t, _, x_t = self._noised(x)
        return x_t, t

    def _logits(self, x_tau: Tensor, tau: Tensor, cond: Tensor) -> Tensor:
        """(B, heads) discriminator logits on the frozen teacher's features at ``(x_tau, tau)``."""
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
            # non-saturating, averaged over the heads (A.3)
            terms["gan"] = self.cfg.gan_weight * F.softplus(-self._logits(x_tau, tau, cond)).mean()
        return sum(terms.values()), terms

    def critic_losses(self, x_fake: Tensor, batch: dict, update) -> dict[str, float]:
        """Fake score by x0 regression (or flow matching) on noised student samples (A.3); the discriminator on real and fake
        data noised with the same time and noise (FastGen's Wan recipe)."""
        cond = batch["cond"]
        t, eps, fake_t = self._noised(x_fake)
        if self.cfg.fake_score_target == "x0":
            fake_loss = (x0_of(self.fake_score, fake_t, t, cond).float() - x_fake.float()).pow(2).mean()
        else:
            fake_loss = (
                (self.fake_score.velocity(fake_t, t, cond).float() - flow.velocity_target(x_fake, eps).float()).pow(2).mean()
            )
        update("fake_score", fake_loss)
        if self.discriminator is None:
            return {}
        if "x" not in batch:
            raise ValueError("the GAN term needs real data latents 'x' in the batch; set gan_weight=0 for data-free runs")
        real_t = flow.interpolate(batch["x"], eps, t)
        logits_fake, logits_real = self._logits(
            torch.cat([fake_t, real_t]), t.repeat(2), cond.repeat(2, *([1] * (cond.ndim - 1)))
        ).chunk(2)
        update("discriminator", F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean())
        return {"d_real_acc": (logits_real > 0).float().mean().item(), "d_fake_acc": (logits_fake < 0).float().mean().item()}

    def training_step(self, batch, step, update):
        generator_turn = step % self.cfg.generator_every == 0
        with torch.set_grad_enabled(generator_turn):
            x_hat = self.generator_sample(batch)
        metrics = {}
        if generator_turn:
            loss, terms = self.generator_loss(x_hat, batch)
            update("generator", loss, terms)
        if not generator_turn or self.cfg.critics_on_generator_steps:
            metrics.update(self.critic_losses(x_hat.detach(), batch, update))
        return metrics
