"""Transition Matching Distillation (Nie, Berner et al. 2026): stage 1 and stage 2.

Stage 1 ("tm", TM-MeanFlow, Alg. 2 and A.2) turns the flow head into a conditional flow map of the
transition target ``y = x1 - x``: ``u = y1 - head`` (Eq. 14) regresses ``sg(v - (s - r) du/ds)`` with
``v = y1 - y`` under CFG, ``du/ds`` by finite differences, adaptive normalisation; plain transition
matching when ``mean_flow_fraction = 0``. Stage 2 ("tmd", Alg. 2 and Eq. 15) is DMD2-v whose generator
sample ``x1 - InnerFlow(m(x_{t_i}, t_i))`` comes from the head's whole inner rollout, with gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from tmd import flow
from tmd.methods import register
from tmd.methods.base import SampleFn
from tmd.methods.common import StudentMethod, adaptive_l2, drop_condition, trainable_copy
from tmd.methods.distribution_matching import DistributionMatching, DistributionMatchingConfig
from tmd.models.experts import student_expert
from tmd.models.export import load_student_weights
from tmd.models.split import FUSIONS, TMDStudent
from tmd.sampling import ROLLOUT_GRADIENTS, head_rollout, sample_tmd, tmd_transition

GENERATOR_OUTPUTS = ("x1_minus_y", "xt_minus_ty")
"""Stage 2's generator sample from noised data ``x_t = (1 - t) x + t x1``: Eq. 15's ``x1 - y``, or the DTM
step to t = 0, ``x_t - t y`` (what Alg. 1's sampler computes from ``x_t``)."""


@dataclass
class StudentConfig:
    """How the TMD student is cut from the teacher, and where an earlier stage left its weights."""

    head_blocks: int = 2
    fusion: str = "gated"
    init_from: Optional[str] = None  # safetensors of an earlier stage's student (stage 2 starts from stage 1)

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {self.fusion!r}")
        if self.head_blocks < 1:
            raise ValueError(f"head_blocks must be >= 1, got {self.head_blocks}")
        if self.init_from is not None and not Path(self.init_from).is_file():
            raise FileNotFoundError(f"init_from: no student weights at {self.init_from}")

    def build(self, teacher: nn.Module, activation_checkpointing: bool = False, **inner_flow: str) -> TMDStudent:
        """The student cut from ``teacher``; ``inner_flow`` are the inner-flow settings (``inner_velocity``,
        ``transition_target``) it is built with and an ``init_from`` export must have been trained with."""
        split = {"head_blocks": self.head_blocks, "fusion": self.fusion, **inner_flow}
        student = TMDStudent.from_teacher(student_expert(teacher, self.outer_steps, self.outer_shift), **split)
        if self.init_from is not None:
            load_student_weights(student, self.init_from, split)
        student.activation_checkpointing = activation_checkpointing
        return student.requires_grad_(True).train()


@dataclass
class InnerFlowConfig(StudentConfig):
    """A student whose head is rolled out as an inner flow map."""

    inner_steps: int = 4
    inner_shift: float = flow.INNER_SHIFT
    inner_velocity: str = "noise"  # Eq. 14's u = y1 - head; "implied": u = (y_s - head) / s
    transition_target: str = "difference"  # y = x1 - x (Eq. 3); "sample": y = x (B.4, with inner_velocity=implied)

    def __post_init__(self):
        super().__post_init__()
        flow.check_steps(self.inner_steps, "inner_steps", 64)
        flow.check_inner_velocity(self.inner_velocity)
        flow.check_transition_target(self.transition_target)
        if self.transition_target == "sample" and self.inner_velocity != "implied":
            raise ValueError("transition_target=sample takes B.4's velocity u = (y_s - y_hat) / s: set inner_velocity=implied")

    def build(self, teacher: nn.Module, activation_checkpointing: bool = False, **inner_flow: str) -> TMDStudent:
        inner_flow = {"inner_velocity": self.inner_velocity, "transition_target": self.transition_target}
        return super().build(teacher, activation_checkpointing, **inner_flow)

    def inner_grid(self, device) -> Tensor:
        return flow.inner_grid(self.inner_steps, self.inner_shift).to(device=device, dtype=torch.float32)


@dataclass
class TransitionMatchingConfig(InnerFlowConfig):
    outer_steps: int = 2
    outer_shift: float = flow.OUTER_SHIFT
    mean_flow_fraction: float = 0.25  # share of the batch with r < s; 0 is plain transition matching
    guidance: float = 3.0  # CFG of the target velocity, against the network's own unconditional prediction
    finite_difference: float = 5e-3  # delta of the difference quotient for du/ds
    s_shift: float = 3.0  # s_mf ~ shift(U[0.001, 0.999])
    adaptive_c: float = 1.0  # c / d of the adaptive normalisation (1.3B: c = d; 14B: c = 1e-5 d)
    adaptive_power: float = 1.0  # MeanFlow's p; 0 is the plain squared error
    cond_dropout: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        flow.check_steps(self.outer_steps, "outer_steps", 16)
        flow.check_guidance(self.guidance)
        if not 0 <= self.mean_flow_fraction <= 1:
            raise ValueError(f"mean_flow_fraction must be in [0, 1], got {self.mean_flow_fraction}")
        if not 0 < self.finite_difference < 0.1:
            raise ValueError(f"finite_difference must be in (0, 0.1), got {self.finite_difference}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.adaptive_c <= 0:
            raise ValueError(f"adaptive_c must be > 0, got {self.adaptive_c}")


def grid_point_at_or_below(grid: Tensor, s: Tensor) -> Tensor:
    """For each s, the largest point of the decreasing grid (which ends at 0) that is <= s (A.2's r)."""
    below = torch.where(grid[None, :] <= s[:, None], grid[None, :], torch.full_like(grid[None, :], -1.0))
    return below.max(dim=1).values.clamp_min(0.0)


class TransitionSampling:
    """For TM and TMD, whose generator is a TMD student: M outer transitions of N flow-head steps each."""

    samples_with_inner_steps: ClassVar[bool] = True

    @classmethod
    def sampler(cls, cfg, module, outer, inner, seed, guidance, shift) -> SampleFn:
        cls.check_steps(outer, inner)
        return lambda noise, cond, neg: sample_tmd(
            module, noise, cond, outer, inner, torch.Generator(noise.device).manual_seed(seed), cfg.outer_shift, cfg.inner_shift
        )

    @classmethod
    def effective_nfe(cls, cfg, outer, inner, num_blocks, guidance) -> float:
        return flow.tmd_effective_nfe(outer, inner, cfg.head_blocks, num_blocks)


@register("tm")
class TransitionMatching(TransitionSampling, StudentMethod):
    """Stage 1: TM-MeanFlow pretraining of the head (everything trains; no teacher needed)."""

    Config = TransitionMatchingConfig
    trains_on_two_experts = True  # the student is cut from the expert of its outer times; no teacher call

    def __init__(self, cfg: TransitionMatchingConfig, student: nn.Module):
        super().__init__(cfg, student)

    @classmethod
    def from_teacher(cls, cfg: TransitionMatchingConfig, teacher: nn.Module, activation_checkpointing: bool = False):
        return cls(cfg, cfg.build(teacher, activation_checkpointing))

    def _times(self, batch: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """``t_i`` uniform on the outer grid's positive times; ``s = s_mf ~ shift(U)``; ``r = s`` for
        ``1 - mean_flow_fraction`` of the batch, else the largest inner-grid point <= s (A.2)."""
        cfg, g = self.cfg, self.rng
        outer = flow.outer_grid(cfg.outer_steps, cfg.outer_shift).to(device=device, dtype=torch.float32)
        t = outer[g.randint(cfg.outer_steps, batch, device)]
        s = flow.sample_shifted_uniform(batch, cfg.s_shift, g, device)
        mean_flow = g.rand(batch, device) < cfg.mean_flow_fraction
        r = torch.where(mean_flow, grid_point_at_or_below(cfg.inner_grid(device), s), s)
        return t, s, r

    def average_velocity(self, y_s: Tensor, y1: Tensor, s: Tensor, r: Tensor, features, x_t: Tensor, t: Tensor) -> Tensor:
        student = self.student
        head = flow.head_estimate(student.head(y_s, s, r, features), x_t, t, student.transition_target)
        return flow.average_velocity(head, y_s, y1, s, student.inner_velocity)

    def du_ds(self, y_s: Tensor, y1: Tensor, s: Tensor, r: Tensor, v: Tensor, features, x_t: Tensor, t: Tensor) -> Tensor:
        """Total derivative of ``u`` along ``v`` (A.2): the central difference
        ``(u(y_s + delta v, s + delta) - u(y_s - delta v, s - delta)) / 2 delta``, one-sided at the ends of the
        domain ``r <= s <= 1`` (forward where ``s - delta < r``, backward where ``s + delta > 1``)."""
        delta = self.cfg.finite_difference
        up_ok, down_ok = s + delta <= 1, s - delta >= r
        s_hi = torch.where(up_ok, s + delta, s)
        # at both ends at once (s within delta of 1 and of r) the backward step shrinks to the room left above r
        s_lo = torch.where(down_ok, s - delta, torch.where(up_ok, s, r))
        step = s_hi - s_lo  # zero only where r = s, whose (s - r) du/ds term vanishes anyway
        u_hi = self.average_velocity(y_s + flow.expand_time(s_hi - s, v) * v, y1, s_hi, r, features, x_t, t)
        u_lo = self.average_velocity(y_s - flow.expand_time(s - s_lo, v) * v, y1, s_lo, r, features, x_t, t)
        return (u_hi - u_lo) / flow.expand_time(torch.where(step > 0, step, torch.ones_like(step)), v)

    def training_step(self, batch, step, update):
        cfg, g = self.cfg, self.rng
        x = batch["x"]
        device = x.device
        cond, dropped = drop_condition(batch["cond"], batch["neg_cond"], cfg.cond_dropout, g)
        t, s, r = self._times(x.shape[0], device)
        x1 = g.randn(x.shape, device)
        x_t = flow.interpolate(x, x1, t)
        y = x1 - x if self.student.transition_target == "difference" else x
        y1 = g.randn(x.shape, device)
        y_s = flow.interpolate(y, y1, s)
        v = y1 - y  # the conditional inner velocity
        features = self.student.backbone(x_t, t, cond)
        u = self.average_velocity(y_s, y1, s, r, features, x_t, t)

        with torch.no_grad():
            if cfg.guidance != 1.0:
                # MeanFlow's CFG: the guided velocity w v + (1 - w) u(y_s, s, s | no text), unguided for dropped samples
                u_uncond = self.average_velocity(y_s, y1, s, s, self.student.backbone(x_t, t, batch["neg_cond"]), x_t, t)
                w = flow.expand_time(torch.where(dropped, 1.0, cfg.guidance), x)
                v = u_uncond + w * (v - u_uncond)
            target = v
            if cfg.mean_flow_fraction > 0:
                target = v - flow.expand_time(s - r, x) * self.du_ds(y_s, y1, s, r, v, features, x_t, t)
        error = u - target
        if self.student.inner_velocity == "implied":
            # the implied velocity carries 1/s: measured in y-space (times s), else small-s samples dominate
            error = flow.expand_time(s, x) * error
        update("student", adaptive_l2(error, cfg.adaptive_c, cfg.adaptive_power))
        return {"mean_flow_share": float((s != r).float().mean())}


@dataclass
class TMDConfig(DistributionMatchingConfig, InnerFlowConfig):
    rollout_gradients: str = "all"  # back-propagate through every inner step; "last": only the last one
    generator_output: str = "x1_minus_y"  # Eq. 15; "xt_minus_ty": the DTM step to 0 (always so in backward simulation)

    def __post_init__(self):
        DistributionMatchingConfig.__post_init__(self)
        InnerFlowConfig.__post_init__(self)
        if self.rollout_gradients not in ROLLOUT_GRADIENTS:
            raise ValueError(f"rollout_gradients must be one of {list(ROLLOUT_GRADIENTS)}, got {self.rollout_gradients!r}")
        if self.generator_output not in GENERATOR_OUTPUTS:
            raise ValueError(f"generator_output must be one of {list(GENERATOR_OUTPUTS)}, got {self.generator_output!r}")


@register("tmd")
class TMD(TransitionSampling, DistributionMatching):
    """Stage 2: DMD2-v whose generator sample runs the whole inner rollout, with gradients through it."""

    Config = TMDConfig
    trains_on_two_experts = True

    @classmethod
    def from_teacher(cls, cfg: TMDConfig, teacher: nn.Module, activation_checkpointing: bool = False) -> TMD:
        return cls(cfg, teacher, cfg.build(teacher, activation_checkpointing), trainable_copy(teacher))

    def x0_from_noised(self, x_t, t, noise, cond):
        features = self.student.backbone(x_t, t, cond)
        y1 = self._randn(x_t.shape, x_t.device)
        y = head_rollout(self.student, x_t, t, y1, features, self.cfg.inner_grid(x_t.device), self.cfg.rollout_gradients)
        if self.student.transition_target == "sample":
            return y
        if self.cfg.generator_output == "x1_minus_y":
            return noise - y
        return x_t - flow.expand_time(t, x_t) * y

    def x0_from_noise(self, batch, noise, step_index):
        cond, outer, inner = batch["cond"], self.outer_grid(noise.device), self.cfg.inner_grid(noise.device)
        x = noise
        with torch.no_grad():
            for i in range(step_index):
                x = tmd_transition(self.student, x, outer[i], outer[i + 1], cond, inner, self.rng)
        return tmd_transition(self.student, x, outer[step_index], 0.0, cond, inner, self.rng, self.cfg.rollout_gradients)
