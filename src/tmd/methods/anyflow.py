"""AnyFlow (Gu et al. 2026, arXiv 2605.13724; official code NVlabs/AnyFlow; diffusers ``AnyFlowPipeline``): one
any-step flow-map student, ``x_r = x_t - (t - r) u(x_t, t, r)``, sampled at any step count.

The student is the teacher with a second time input (``tmd.models.anyflow``). Two stages, one method
(``stage``), the second started from the first's export (``init_from``):

- ``flowmap`` (the code's ``trainer_wan_anyflow_pretrain``): MeanFlow on data, no teacher. ``t > r`` from two
  uniform draws, ``r = t`` for half the batch and ``r = 0`` for a quarter, both times shifted (5); target
  ``v - (t - r) du/dt`` with ``v = x1 - x`` and ``du/dt`` a central difference along ``v``; guidance fused into
  the conditional output, ``pred = (u_c - (1 - w) sg u_neg) / w``; the squared error weighted by
  ``t sqrt(1 - t)`` and, for ``r != t``, rescaled to the batch's mean ``r = t`` loss.
- ``onpolicy`` (``trainer_wan_anyflow_onpolicy``): DMD on the student's own sample from pure noise by Flow Map
  Backward Simulation: a step count N drawn from ``rollout_steps``, its grid, a step k drawn in [0, N); the
  jumps ``1 -> t_k -> t_{k+1} -> 0``, gradients through all three. The real score is the frozen teacher with CFG,
  the fake score a teacher copy trained by flow matching on the same rollouts, 1:1 with the student; the
  generator step also back-propagates the ``flowmap`` loss on the batch's data (the code's co-training).

Sampling (``FlowMapEulerDiscreteScheduler``): ``t_i = shift_5(1 - i / N)`` from 1 to 0, deterministic jumps.
Choices where the sources are silent or do not fit the harness: docs/methods.md, "AnyFlow".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from tmd import flow
from tmd.methods import register
from tmd.methods.common import dmd_loss, drop_condition, latent_shape, trainable_copy, x0_of, x0_real
from tmd.methods.distribution_matching import DistributionMatching, DistributionMatchingConfig
from tmd.models.anyflow import DELTATIME_TYPES, AnyFlowStudent
from tmd.models.export import load_student_weights

STAGES = ("flowmap", "onpolicy")
STUDENT_KEYS = ("gate_value", "deltatime_type")
"""Settings an ``init_from`` export must have been trained with (not visible in its parameter names)."""


@dataclass
class AnyFlowConfig(DistributionMatchingConfig):
    stage: str = "flowmap"  # flowmap: stage 1 (forward flow-map training); onpolicy: stage 2 (on-policy DMD)
    init_from: Optional[str] = None  # stage 2 starts from stage 1's student.safetensors
    gate_value: float = 0.25  # g of (1 - g) TimeEmb(t) + g DeltaEmb(r)
    deltatime_type: str = "r"  # what DeltaEmb embeds: r, or t - r
    # stage 1, also co-trained in stage 2
    fuse_guidance: float = 3.0  # w of pred = (u_c - (1 - w) sg u_neg) / w
    cond_dropout: float = 0.1
    diffusion_ratio: float = 0.5  # share of the batch with r = t
    consistency_ratio: float = 0.25  # share with r = 0; the rest has 0 < r < t
    time_shift: float = 5.0
    finite_difference: float = 5e-3  # 5 of the 1000 timesteps
    flowmap_weight: float = 1.0  # of the co-trained stage-1 loss in stage 2 (0: DMD alone)
    # stage 2 (the inherited DMD settings with AnyFlow's values)
    guidance: float = 4.0  # the code's x0_c + 3 (x0_c - x0_u)
    rollout_steps: tuple[int, ...] = (2, 4, 8, 16, 50)
    generator_every: int = 1
    critics_on_generator_steps: bool = True
    gan_weight: float = 0.0
    student_input: str = "backward"
    fake_score_target: str = "velocity"
    # the sampler: t_i = shift(1 - i / N), from 1
    outer_shift: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {self.stage!r}")
        if self.deltatime_type not in DELTATIME_TYPES:
            raise ValueError(f"deltatime_type must be one of {list(DELTATIME_TYPES)}, got {self.deltatime_type!r}")
        if not 0 <= self.gate_value <= 1:
            raise ValueError(f"gate_value must lie in [0, 1], got {self.gate_value}")
        flow.check_guidance(self.fuse_guidance)
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if min(self.diffusion_ratio, self.consistency_ratio) < 0 or self.diffusion_ratio + self.consistency_ratio > 1:
            raise ValueError(
                f"diffusion_ratio and consistency_ratio must be >= 0 with sum <= 1, got {self.diffusion_ratio}, {self.consistency_ratio}"
            )
        if not 0 < self.finite_difference < 0.1:
            raise ValueError(f"finite_difference must be in (0, 0.1), got {self.finite_difference}")
        if self.time_shift <= 0 or self.flowmap_weight < 0:
            raise ValueError(f"need time_shift > 0 and flowmap_weight >= 0, got {self.time_shift}, {self.flowmap_weight}")
        self.rollout_steps = tuple(self.rollout_steps)
        if not self.rollout_steps:
            raise ValueError("rollout_steps must name at least one step count")
        for steps in self.rollout_steps:
            flow.check_steps(steps, "rollout_steps")
        if self.gan_weight != 0 or self.student_input != "backward" or self.multistep != "deterministic":
            raise ValueError(
                "anyflow trains on its own flow-map rollout without a GAN: gan_weight must be 0, student_input "
                "'backward' and multistep 'deterministic'"
            )
        if self.init_from is not None and not Path(self.init_from).is_file():
            raise FileNotFoundError(f"init_from: no student weights at {self.init_from}")


def sample_grid(steps: int, shift: float) -> list[float]:
    """``FlowMapEulerDiscreteScheduler(shift).set_timesteps(steps)``'s sigmas: ``shift(1 - i / N)``, 1 to 0."""
    flow.check_steps(steps)
    return flow.shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).tolist()


def flow_map_jumps(student: nn.Module, x: Tensor, cond: Tensor, times: list[float]) -> Tensor:
    """``x <- x - (a - b) u(x, a, b)`` for each consecutive pair (a, b) of ``times``; zero-length pairs are skipped."""
    for a, b in zip(times[:-1], times[1:]):
        if a != b:
            x = x - (a - b) * student.mean_velocity(x, a, b, cond)
    return x


def beta_weight(t: Tensor, shift: float) -> Tensor:
    """The code's ``beta08`` loss weight ``t sqrt(1 - t)``, normalised to mean 1 over the 1000 shifted training times."""
    grid = flow.shift(torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1], shift)
    norm = float((grid * (1 - grid).sqrt()).mean())
    return t * (1 - t).clamp_min(0).sqrt() / norm


def global_mean(values: Tensor, mask: Tensor) -> Tensor | None:
    """The mean of ``values[mask]`` over the global batch (summed over the data-parallel processes, so that K
    processes compute what one does); None where no sample has ``mask``. Every process must call it."""
    stats = torch.stack([(values * mask).sum(), mask.sum().to(values.dtype)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    return stats[0] / stats[1] if float(stats[1]) > 0 else None  # a host sync, once per loss


@register("anyflow")
class AnyFlow(DistributionMatching):
    Config = AnyFlowConfig
    sample_steps = (1, 2, 4)

    @classmethod
    def from_teacher(cls, cfg: AnyFlowConfig, teacher: nn.Module, activation_checkpointing: bool = False) -> AnyFlow:
        student = AnyFlowStudent.from_teacher(teacher, cfg.gate_value, cfg.deltatime_type)
        if cfg.init_from is not None:
            load_student_weights(student, cfg.init_from, {key: getattr(cfg, key) for key in STUDENT_KEYS})
        student.activation_checkpointing = activation_checkpointing
        fake_score = trainable_copy(teacher) if cfg.stage == "onpolicy" else None
        return cls(cfg, teacher, student.requires_grad_(True).train(), fake_score)

    def parameter_groups(self):
        if self.fake_score is None:
            return {"generator": list(self.student.parameters())}
        return super().parameter_groups()

    def state_modules(self):
        modules = super().state_modules()
        return {name: module for name, module in modules.items() if module is not None}

    @staticmethod
    def sample(student, noise, cond, steps, rng=None, outer_shift: float = 5.0, multistep: str = "deterministic"):
        """Deterministic flow-map jumps on ``sample_grid(steps, outer_shift)``; one student pass per step."""
        with torch.no_grad():
            return flow_map_jumps(student, noise.float(), cond, sample_grid(steps, outer_shift))

    # -- stage 1: forward flow-map training on data ------------------------------------------------

    def flowmap_times(self, n: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, r, r_is_t)``: t the larger and r the smaller of two uniform draws, r = t or r = 0 for the
        configured shares (drawn per sample), both shifted."""
        cfg, g = self.cfg, self.rng
        t1, t2 = g.rand(n, device), g.rand(n, device)
        t, r = torch.maximum(t1, t2), torch.minimum(t1, t2)
        kind = g.rand(n, device)
        r_is_t = kind < cfg.diffusion_ratio
        r = torch.where(r_is_t, t, torch.where(kind < cfg.diffusion_ratio + cfg.consistency_ratio, torch.zeros_like(r), r))
        return flow.shift(t, cfg.time_shift), flow.shift(r, cfg.time_shift), r_is_t

    def flowmap_target(self, x_t: Tensor, v: Tensor, t: Tensor, r: Tensor, cond: Tensor) -> Tensor:
        """``v - (t - r) du/dt`` with ``du/dt`` the central difference of the conditional output along ``v``
        (one-sided where ``t +- delta`` leaves [0, 1]), divided by the fused guidance ``w``."""
        d = self.cfg.finite_difference
        with torch.no_grad():
            t_plus, t_minus = (t + d).clamp(max=1.0), (t - d).clamp(min=0.0)
            u_plus = self.student.mean_velocity(x_t + flow.expand_time(t_plus - t, v) * v, t_plus, r, cond)
            u_minus = self.student.mean_velocity(x_t + flow.expand_time(t_minus - t, v) * v, t_minus, r, cond)
            du_dt = (u_plus - u_minus) / flow.expand_time((t_plus - t_minus) * self.cfg.fuse_guidance, v)
            return v.float() - flow.expand_time(t - r, v) * du_dt

    def flowmap_loss(self, batch: dict) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        if "x" not in batch:
            raise ValueError("anyflow's flow-map loss trains on data latents 'x', which this batch lacks")
        x = batch["x"]
        neg = batch["neg_cond"].expand_as(batch["cond"])
        cond, _ = drop_condition(batch["cond"], neg, cfg.cond_dropout, self.rng)
        t, r, r_is_t = self.flowmap_times(x.shape[0], x.device)
        noise = self._randn(x.shape, x.device)
        x_t, v = flow.interpolate(x, noise, t), flow.velocity_target(x, noise)
        pred = self.student.mean_velocity(x_t, t, r, cond)
        w = cfg.fuse_guidance
        if w != 1.0:
            with torch.no_grad():
                u_neg = self.student.mean_velocity(x_t, t, r, neg)
            pred = (pred - (1 - w) * u_neg) / w
        target = self.flowmap_target(x_t, v, t, r, cond)
        loss = (pred - target).pow(2).flatten(1).mean(1) * beta_weight(t, cfg.time_shift)
        # the r != t samples' losses brought to the global batch's mean r = t loss (the code's scale_weight)
        diffusion_mean = global_mean(loss.detach(), r_is_t)
        if diffusion_mean is not None:
            loss = torch.where(r_is_t, loss, loss * diffusion_mean / (loss.detach() + 1e-5))
        return loss.mean(), {"mean_flow_share": float((~r_is_t).float().mean())}

    # -- stage 2: on-policy DMD on flow-map backward simulation --------------------------------------

    def rollout_times(self, device) -> list[float]:
        """``[1, t_k, t_{k+1}, 0]`` on the grid of a drawn step count N, k drawn in [0, N) (shared by the batch)."""
        steps = self.cfg.rollout_steps[self.rng.shared_randint(len(self.cfg.rollout_steps), device)]
        k = self.rng.shared_randint(steps, device)
        grid = sample_grid(steps, self.cfg.outer_shift)
        return [1.0, grid[k], grid[k + 1], 0.0]

    def generator_sample(self, batch: dict) -> Tensor:
        noise = self._randn(latent_shape(batch), batch["cond"].device)
        return flow_map_jumps(self.student, noise, batch["cond"], self.rollout_times(noise.device))

    def generator_loss(self, x_hat: Tensor, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        x_tau, tau = self._renoise(x_hat.detach())
        cond = batch["cond"]
        with torch.no_grad():
            real = x0_real(self.teacher, x_tau, tau, cond, batch["neg_cond"], self.cfg.guidance)
            fake = x0_of(self.fake_score, x_tau, tau, cond)
        # the code's mse(x, sg(x - g)): twice our 0.5-scaled proxy
        terms = {"dmd": 2 * dmd_loss(x_hat, fake, real)}
        if self.cfg.flowmap_weight > 0:
            terms["flowmap"] = self.cfg.flowmap_weight * self.flowmap_loss(batch)[0]
        return sum(terms.values()), terms

    def training_step(self, batch, step, update):
        if self.cfg.stage == "flowmap":
            loss, metrics = self.flowmap_loss(batch)
            update("generator", loss, {"flowmap": loss})
            return metrics
        return super().training_step(batch, step, update)
