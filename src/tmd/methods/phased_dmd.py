"""Phased DMD (Fan et al., SenseTime 2025, arXiv 2510.27684v3): one expert per phase of the outer grid.

Phase k trains only expert k, which maps ``x_{t_k}`` to ``x_{t_{k+1}}`` by an Euler step of its own
velocity (the paper's solver, in backward simulation and at inference); earlier experts are frozen and
only back-simulate, later ones are not used yet. The generator sample is the *noisy* ``x_s``,
``s = t_{k+1}``, so distribution matching happens at ``t in (s, 1]`` on ``x_t = a x_s + b eps``
(Eq. 10), and the phase's fake score, which starts from the teacher, learns that marginal with the
subinterval target of Eq. 11 and the clamped weight of Eq. 13 (:func:`interval_target`). The fake
score takes 5 steps per generator step, with its own (far smaller) learning rate and AdamW beta1 = 0
for both (``optimizer_overrides``). No GAN, no regression loss. The experts together are a
mixture-of-experts few-step generator, sampled by :func:`sample_phased`.

Storage: ``student`` is an ``nn.ModuleList`` of generator copies (expert k = entry k), all in the
"generator" parameter group. Every expert but the current one is frozen (``requires_grad=False``),
so AdamW leaves it alone and its EMA is its weights: the exported mixture holds, for each finished
phase, exactly the expert the later phases were trained against.

Ambiguities and choices:
- The phase is derived from the trainer's step: ``min(step // phase_steps, outer_steps - 1)``.
- Every expert starts from the teacher (the paper initialises experts from the base model).
- "The fake score is initialised from the teacher at the beginning of each phase": one fake score per
  phase (``fake_score`` is a :class:`PerPhase` list of teacher copies), so a phase starts from fresh
  weights *and* fresh AdamW moments (resetting one in place would keep the previous phase's moments).
- ``t ~ T(t_k, 1)``: T is not named; ``t = s + (1 - s) shift_{tau_shift}(U)``, DMD2-v's shifted draw
  mapped into the subinterval.
- Learning rates: the paper's fake score lr is 4e-7 for a LoRA generator at 5e-5 (ratio 0.008);
  ``fake_score_lr_scale`` is that ratio by default. Our generator trains all its weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tmd import flow
from tmd.methods import register
from tmd.methods.common import trainable_copy
from tmd.methods.distribution_matching import DistributionMatching, DistributionMatchingConfig
from tmd.sampling import few_step_transition


def interval_coefficients(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, b)`` of the forward process from s to t (Eq. 2): ``a = (1 - t)/(1 - s)``, ``b^2 = t^2 - a^2 s^2``."""
    a = (1 - t) / (1 - s)
    return a, (t**2 - (a * s) ** 2).clamp_min(0).sqrt()


def interval_noising(x_s: Tensor, s: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """``x_t = a x_s + b eps``: a sample of the marginal at s becomes one of the marginal at t."""
    a, b = interval_coefficients(s, t)
    return flow.expand_time(a, x_s) * x_s + flow.expand_time(b, x_s) * eps


def interval_target(x_s: Tensor, s: Tensor, t: Tensor, eps: Tensor, weight_clamp: float) -> tuple[Tensor, Tensor]:
    """Eq. 11's velocity target on the subinterval (its conditional mean given ``x_t`` is the
    rectified-flow velocity of the marginal at t) and Eq. 13's per-sample weight.

    Target ``((t + (1 - t) s^2/(1 - s)^2) / b) eps - x_s/(1 - s)`` (Eq. 11 with ``alpha = 1 - t``,
    ``sigma = t``; plain ``eps - x0`` at s = 0). Eq. 13 multiplies Eq. 11's error by ``b^2`` and by
    ``clamp(1/b^2, 0, weight_clamp)``: the weight is ``min(1, weight_clamp b^2)``.
    """
    b2 = interval_coefficients(s, t)[1].pow(2).clamp_min(1e-12)
    c = (t + (1 - t) * s**2 / (1 - s) ** 2) / b2.sqrt()
    target = flow.expand_time(c, eps) * eps - x_s / flow.expand_time(1 - s, x_s)
    return target, (1 / b2).clamp(max=weight_clamp) * b2


class PerPhase(nn.ModuleList):
    """One model per phase behind a single ``velocity``: the owner sets ``phase``."""

    phase = 0

    def velocity(self, x_t, t, cond):
        return self[self.phase].velocity(x_t, t, cond)


@dataclass
class OwnOptimizerConfig(DistributionMatchingConfig):
    """A method whose paper sets the fake score's learning rate and both AdamW betas (applied through the
    trainer's ``optimizer_overrides``); ``train.lr`` is the generator's."""

    fake_score_lr_scale: float = 1.0  # the fake score's lr over the generator's
    adam_betas: tuple[float, float] = (0.9, 0.99)  # both optimisers' betas, in place of train.betas

    def __post_init__(self):
        super().__post_init__()
        if self.fake_score_lr_scale <= 0:
            raise ValueError(f"fake_score_lr_scale must be > 0, got {self.fake_score_lr_scale}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")

    def optimizer_overrides(self) -> dict:
        betas = tuple(self.adam_betas)
        return {"generator": {"betas": betas}, "fake_score": {"betas": betas, "lr_scale": self.fake_score_lr_scale}}


@dataclass
class PhasedDMDConfig(OwnOptimizerConfig):
    phase_steps: int = 2000  # trainer steps per phase; phase k = min(step // phase_steps, outer_steps - 1)
    gan_weight: float = 0.0
    student_input: str = "backward"  # a phase's noisy sample comes from the earlier experts' rollout
    critics_on_generator_steps: bool = True  # with generator_every 5: 5 fake-score steps per expert step
    fake_score_target: str = "velocity"  # Eq. 11 is a velocity target
    weight_clamp: float = 10.0  # Eq. 13: clamp(1 / sigma_{t|s}^2) to [0, 10]
    fake_score_lr_scale: float = 0.008  # the paper's 4e-7 / 5e-5
    adam_betas: tuple[float, float] = (0.0, 0.999)

    def __post_init__(self):
        super().__post_init__()
        if self.phase_steps < 1:
            raise ValueError(f"phase_steps must be >= 1, got {self.phase_steps}")
        if self.gan_weight != 0:
            raise ValueError("phased_dmd has no GAN term (it matches noisy intermediate samples); set gan_weight=0")
        if self.student_input != "backward" or self.fake_score_target != "velocity":
            raise ValueError(
                "phased_dmd trains each expert on the earlier experts' rollout with Eq. 11's velocity target: "
                "student_input must be 'backward' and fake_score_target 'velocity'"
            )
        if self.weight_clamp <= 0:
            raise ValueError(f"weight_clamp must be > 0, got {self.weight_clamp}")


@register("phased_dmd")
class PhasedDMD(DistributionMatching):
    Config = PhasedDMDConfig
    # one Wan transformer per phase: a student folder holds one; the experts are sampled from the run's weights
    exports_student_folder = False

    def __init__(self, cfg: PhasedDMDConfig, teacher: nn.Module, experts: nn.ModuleList, fake_scores: PerPhase):
        if not len(experts) == len(fake_scores) == cfg.outer_steps:
            raise ValueError(f"phased DMD needs one expert and one fake score per outer step ({cfg.outer_steps})")
        super().__init__(cfg, teacher, experts, fake_scores)
        self.phase = 0

    @classmethod
    def from_teacher(cls, cfg: PhasedDMDConfig, teacher: nn.Module, activation_checkpointing: bool = False) -> PhasedDMD:
        experts = nn.ModuleList(trainable_copy(teacher) for _ in range(cfg.outer_steps))
        for expert in experts:
            expert.activation_checkpointing = activation_checkpointing
        return cls(cfg, teacher, experts, PerPhase(trainable_copy(teacher) for _ in range(cfg.outer_steps)))

    def optimizer_overrides(self):
        return self.cfg.optimizer_overrides()

    def training_step(self, batch, step, update):
        self.phase = self.fake_score.phase = min(step // self.cfg.phase_steps, self.cfg.outer_steps - 1)
        for k, expert in enumerate(self.student):
            expert.requires_grad_(k == self.phase)
        return {**super().training_step(batch, step, update), "phase": float(self.phase)}

    sample_steps = (2,)  # one expert per outer step: the expert count fixes the step count

    @staticmethod
    def sample(
        generator_module, noise, cond, steps, rng=None, outer_shift: float = flow.OUTER_SHIFT, multistep: str = "deterministic"
    ):
        if steps != len(generator_module):
            raise ValueError(f"phased DMD samples with its {len(generator_module)} experts, not {steps} steps")
        return sample_phased(generator_module, noise, cond, rng, outer_shift, multistep)

    def x0_from_noise(self, batch, noise, step_index):
        """``x_s`` at the current phase's boundary; ``step_index`` (random) is ignored: the phase decides."""
        k, cond, grid, multistep = self.phase, batch["cond"], self.outer_grid(noise.device), self.cfg.multistep
        x = noise
        with torch.no_grad():
            for i in range(k):
                x = few_step_transition(self.student[i], x, grid[i], grid[i + 1], cond, self.rng, multistep)
        return few_step_transition(self.student[k], x, grid[k], grid[k + 1], cond, self.rng, multistep)

    def _interval_draw(self, x_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(s, t, eps)``: the phase's boundary s, ``t in (s, 1)`` (Eq. 10's ``T(t_k, 1)``) and fresh noise."""
        n, device = x_s.shape[0], x_s.device
        s = self.outer_grid(device)[self.phase + 1].expand(n)
        t = s + (flow.T_MAX - s) * flow.sample_shifted_uniform(n, self.cfg.tau_shift, self.rng, device)
        return s, t, self._randn(x_s.shape, device)

    def _renoise(self, x_s):
        s, t, eps = self._interval_draw(x_s)
        return interval_noising(x_s, s, t, eps), t

    def critic_losses(self, x_fake, batch, update):
        s, t, eps = self._interval_draw(x_fake)
        target, weight = interval_target(x_fake, s, t, eps, self.cfg.weight_clamp)
        v = self.fake_score.velocity(interval_noising(x_fake, s, t, eps), t, batch["cond"])
        update("fake_score", (weight * (v.float() - target.float()).pow(2).flatten(1).mean(1)).mean())
        return {}


@torch.no_grad()
def sample_phased(
    experts,
    noise: Tensor,
    cond: Tensor,
    rng: torch.Generator | None = None,
    shift: float = flow.OUTER_SHIFT,
    multistep: str = "deterministic",
) -> Tensor:
    """Expert k takes the k-th transition of the outer grid: an Euler step of its velocity (the paper's
    solver), or DMD2's re-noising with ``multistep="renoise"``."""
    grid = flow.outer_grid(len(experts), shift).to(device=noise.device, dtype=torch.float32)
    x = noise.float()
    for i, expert in enumerate(experts):
        x = few_step_transition(expert, x, grid[i], grid[i + 1], cond, rng, multistep)
    return x
