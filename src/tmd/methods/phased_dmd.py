"""Phased DMD (Fan et al., SenseTime 2025, arXiv 2510.27684): one expert per phase of the outer grid.

Phase k trains only expert k, which maps ``x_{t_k}`` to ``x_{t_{k+1}}`` (predict x0, re-noise to
``t_{k+1}`` with fresh noise, as DMD2's few-step transition); earlier experts are frozen and only
back-simulate, later ones are not used yet. The generator sample is the *noisy* ``x_s``, ``s = t_{k+1}``,
so distribution matching happens at ``t in (s, 1]`` on ``x_t = a x_s + b eps`` and the fake score learns
that marginal with the unbiased within-interval target (:func:`interval_target`). The experts together
are a mixture-of-experts few-step generator, sampled by :func:`sample_phased`.

Storage: ``student`` is an ``nn.ModuleList`` of generator copies (expert k = entry k), all in the
"generator" parameter group; experts other than the current one never get gradients, so AdamW leaves
them alone, and their EMA copies stay at their last trained state.

Ambiguities and choices:
- The phase is derived from the trainer's step: ``min(step // phase_steps, outer_steps - 1)``.
- Every expert starts from the teacher (the paper initialises experts from the base model).
- "Re-initialised per phase": each phase has its own fake score (``fake_score`` is a :class:`PerPhase`
  list of teacher copies), so a phase starts from fresh weights *and* fresh AdamW moments. Measured: a
  single fake score reset in place kept phase 0's second moments (large: its targets' noise grows near
  t -> s), learnt too slowly in phase 1, and the generator diverged (closed-form SW 1.23 -> 1.54).
  Costs one fake-score copy per phase.
- ``t`` is drawn as ``s + (1 - s) shift_{tau_shift}(U)``. The target's noise coefficient grows like
  ``1 / b`` as t -> s; samples are weighted by ``min(1, (b / t)^2 / min_noise_share)`` (b^2/t^2 is the
  share of the noise at t that the fresh noise contributes), bounding the weighted variance; at s = 0
  the weight is 1 and the loss is plain flow matching.
- No GAN term: it would need real data noised to each phase's boundary; ``gan_weight`` must be 0.
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


def _col(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interval_noising(x_s: Tensor, s: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """``x_t = a x_s + b eps`` with ``a = (1 - t)/(1 - s)``, ``b = sqrt(t^2 - a^2 s^2)``: the forward process
    from s to t, so a sample of the marginal at s becomes one of the marginal at t."""
    a = (1 - t) / (1 - s)
    b = (t**2 - (a * s) ** 2).clamp_min(0).sqrt()
    return _col(a, x_s) * x_s + _col(b, x_s) * eps


def interval_target(x_s: Tensor, s: Tensor, t: Tensor, eps: Tensor, min_noise_share: float) -> tuple[Tensor, Tensor]:
    """Velocity target whose conditional mean given ``x_t`` is the rectified-flow velocity of the marginal
    at t (so a model trained on it is comparable with the teacher), and its per-sample weight.

    ``((t + (1 - t) s^2/(1 - s)^2) / b) eps - x_s/(1 - s)``; reduces to ``eps - x0`` at s = 0.
    """
    a = (1 - t) / (1 - s)
    b2 = (t**2 - (a * s) ** 2).clamp_min(1e-12)
    b = b2.sqrt()
    c = (t + (1 - t) * s**2 / (1 - s) ** 2) / b
    target = _col(c, eps) * eps - x_s / _col(1 - s, x_s)
    weight = (b2 / t**2 / min_noise_share).clamp(max=1.0)
    return target, weight


@dataclass
class IntervalMatchingConfig(DistributionMatchingConfig):
    gan_weight: float = 0.0
    student_input: str = "backward"  # the phase's noisy sample comes from the earlier experts' rollout
    multistep: str = "renoise"
    min_noise_share: float = 0.05  # fake-score weight is clamped below this share of fresh noise

    def __post_init__(self):
        super().__post_init__()
        if self.gan_weight != 0:
            raise ValueError("this method has no GAN term (it matches noisy intermediate samples); set gan_weight=0")
        if not 0 < self.min_noise_share <= 1:
            raise ValueError(f"min_noise_share must be in (0, 1], got {self.min_noise_share}")


class IntervalMatching(DistributionMatching):
    """DMD on a generator sample ``x_s`` that is noisy (marginal at ``s``), matched at ``t in (s, hi]``.

    Subclasses set ``self._interval = (s, hi, fake_weight)`` (per-sample tensors) in ``generate``.
    """

    def _sample_interval(self, x_s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s, hi, _ = self._interval
        u = flow.sample_shifted_uniform(x_s.shape[0], self.cfg.tau_shift, self.generator, x_s.device)
        t = s + (hi - s) * u
        return s, t, self._randn(x_s.shape, x_s.device), u

    def _renoise(self, x_s):
        s, t, eps, _ = self._sample_interval(x_s)
        return interval_noising(x_s, s, t, eps), t

    def critic_losses(self, x_fake, batch, update):
        s, t, eps, _ = self._sample_interval(x_fake)
        target, weight = interval_target(x_fake, s, t, eps, self.cfg.min_noise_share)
        v = self.fake_score.velocity(interval_noising(x_fake, s, t, eps), t, batch["cond"])
        per_sample = (v.float() - target.float()).pow(2).flatten(1).mean(1)
        update("fake_score", (weight * self._interval[2] * per_sample).mean())
        return {}


class PerPhase(nn.ModuleList):
    """One model per phase behind a single ``velocity``: the owner sets ``phase``."""

    phase = 0

    def velocity(self, x_t, t, cond):
        return self[self.phase].velocity(x_t, t, cond)


@dataclass
class PhasedDMDConfig(IntervalMatchingConfig):
    phase_steps: int = 2000  # trainer steps per phase; phase k = min(step // phase_steps, outer_steps - 1)

    def __post_init__(self):
        super().__post_init__()
        if self.phase_steps < 1:
            raise ValueError(f"phase_steps must be >= 1, got {self.phase_steps}")


@register("phased_dmd")
class PhasedDMD(IntervalMatching):
    Config = PhasedDMDConfig

    def __init__(self, cfg: PhasedDMDConfig, teacher: nn.Module, experts: nn.ModuleList, fake_scores: PerPhase):
        if not len(experts) == len(fake_scores) == cfg.outer_steps:
            raise ValueError(f"phased DMD needs one expert and one fake score per outer step ({cfg.outer_steps})")
        super().__init__(cfg, teacher, experts, fake_scores)
        self.phase = 0

    @classmethod
    def from_teacher(cls, cfg: PhasedDMDConfig, teacher: nn.Module, activation_checkpointing: bool = False) -> "PhasedDMD":
        experts = nn.ModuleList(trainable_copy(teacher) for _ in range(cfg.outer_steps))
        for expert in experts:
            expert.activation_checkpointing = activation_checkpointing
        return cls(cfg, teacher, experts, PerPhase(trainable_copy(teacher) for _ in range(cfg.outer_steps)))

    def training_step(self, batch, step, update):
        self.phase = self.fake_score.phase = min(step // self.cfg.phase_steps, self.cfg.outer_steps - 1)
        return {**super().training_step(batch, step, update), "phase": float(self.phase)}

    sample_steps = (2,)  # one expert per outer step: the expert count fixes the step count

    @staticmethod
    def sample(generator_module, noise, cond, steps, rng=None):
        if steps != len(generator_module):
            raise ValueError(f"phased DMD samples with its {len(generator_module)} experts, not {steps} steps")
        return sample_phased(generator_module, noise, cond, rng)

    def generate(self, batch, noise, step_index):
        """``x_s`` at the current phase's boundary; ``step_index`` (random) is ignored: the phase decides."""
        k, cond, grid = self.phase, batch["cond"], self.outer_grid(noise.device)
        x = noise
        with torch.no_grad():
            for i in range(k):
                x = few_step_transition(self.student[i], x, grid[i], grid[i + 1], cond, self.generator, self.cfg.multistep)
        n = noise.shape[0]
        self._interval = (grid[k + 1].expand(n), torch.full((n,), flow.T_MAX, device=noise.device), 1.0)
        return few_step_transition(self.student[k], x, grid[k], grid[k + 1], cond, self.generator, self.cfg.multistep)


@torch.no_grad()
def sample_phased(
    experts, noise: Tensor, cond: Tensor, generator: torch.Generator | None = None, shift: float = flow.OUTER_SHIFT,
    multistep: str = "renoise",
) -> Tensor:
    """Expert k takes the k-th transition of the outer grid (predict x0, re-noise to the next time)."""
    grid = flow.outer_grid(len(experts), shift).to(device=noise.device, dtype=torch.float32)
    x = noise.float()
    for i, expert in enumerate(experts):
        x = few_step_transition(expert, x, grid[i], grid[i + 1], cond, generator, multistep)
    return x
