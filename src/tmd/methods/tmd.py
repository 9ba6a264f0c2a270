"""Transition Matching Distillation (Nie, Berner et al. 2026): stage 1 and stage 2.

Stage 1 ("tm") adapts the flow head into a conditional flow map of the transition target
``y = x1 - x`` with a MeanFlow loss (plain transition matching when ``mean_flow_fraction = 0``).
Stage 2 ("tmd") is DMD2 where the generator sample comes from the full inner rollout of the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from tmd import flow
from tmd.methods import register
from tmd.methods.common import StudentMethod, adaptive_l2, drop_condition, load_student_weights, trainable_copy
from tmd.methods.distribution_matching import DistributionMatching, DistributionMatchingConfig
from tmd.models.split import FUSIONS, TMDStudent
from tmd.sampling import tmd_transition


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

    def build(self, teacher: nn.Module, activation_checkpointing: bool = False) -> TMDStudent:
        student = TMDStudent.from_teacher(teacher, head_blocks=self.head_blocks, fusion=self.fusion)
        if self.init_from is not None:
            load_student_weights(student, self.init_from, {"head_blocks": self.head_blocks, "fusion": self.fusion})
        student.activation_checkpointing = activation_checkpointing
        return student.requires_grad_(True).train()


@dataclass
class TransitionMatchingConfig(StudentConfig):
    outer_steps: int = 2
    inner_steps: int = 4
    outer_shift: float = flow.OUTER_SHIFT
    inner_shift: float = flow.INNER_SHIFT
    mean_flow_fraction: float = 0.25  # share of the batch with r < s; 0 is plain transition matching
    guidance: float = 3.0  # CFG of the MeanFlow target, from the network's own unconditional prediction
    finite_difference: float = 5e-3  # delta of the central difference for du/ds
    s_shift: float = 3.0
    adaptive_c: float = 1e-3
    adaptive_power: float = 1.0  # MeanFlow's p; 0 is the plain squared error
    cond_dropout: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        flow.check_steps(self.outer_steps, "outer_steps", 16)
        flow.check_steps(self.inner_steps, "inner_steps", 64)
        flow.check_guidance(self.guidance)
        if not 0 <= self.mean_flow_fraction <= 1:
            raise ValueError(f"mean_flow_fraction must be in [0, 1], got {self.mean_flow_fraction}")
        if not 0 < self.finite_difference < 0.1:
            raise ValueError(f"finite_difference must be in (0, 0.1), got {self.finite_difference}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")


def _below(grid: Tensor, s: Tensor) -> Tensor:
    """For each s, the largest point of the decreasing grid that lies strictly below it."""
    below = torch.where(grid[None, :] < s[:, None], grid[None, :], torch.full_like(grid[None, :], -1.0))
    return below.max(dim=1).values.clamp_min(0.0)


@register("tm")
class TransitionMatching(StudentMethod):
    """Stage 1: TM-MeanFlow pretraining of the head (everything trains; no teacher needed)."""

    Config = TransitionMatchingConfig

    def __init__(self, cfg: TransitionMatchingConfig, student: nn.Module):
        super().__init__(cfg, student)

    @classmethod
    def from_teacher(cls, cfg: TransitionMatchingConfig, teacher: nn.Module, activation_checkpointing: bool = False):
        return cls(cfg, cfg.build(teacher, activation_checkpointing))

    def _times(self, batch: int, device) -> tuple[Tensor, Tensor, Tensor]:
        cfg, g = self.cfg, self.generator
        outer = flow.outer_grid(cfg.outer_steps, cfg.outer_shift).to(device=device, dtype=torch.float32)
        t = outer[g.randint(cfg.outer_steps, batch, device)]
        delta = cfg.finite_difference
        s = flow.sample_shifted_uniform(batch, cfg.s_shift, g, device).clamp(delta + 1e-3, 1 - delta)
        inner = flow.inner_grid(cfg.inner_steps, cfg.inner_shift).to(device=device, dtype=torch.float32)
        mean_flow = g.rand(batch, device) < cfg.mean_flow_fraction
        r = torch.where(mean_flow, _below(inner, s), s)
        return t, s, r

    def average_velocity(self, y_s: Tensor, s: Tensor, r: Tensor, features) -> Tensor:
        return (y_s - self.student.head(y_s, s, r, features)) / s.reshape(-1, *([1] * (y_s.ndim - 1)))

    def training_step(self, batch, step, update):
        cfg, g = self.cfg, self.generator
        x = batch["x"]
        device = x.device
        cond, dropped = drop_condition(batch["cond"], batch["neg_cond"], cfg.cond_dropout, g)
        t, s, r = self._times(x.shape[0], device)
        x1 = g.randn(x.shape, device)
        x_t = flow.interpolate(x, x1, t)
        y = x1 - x
        y1 = g.randn(x.shape, device)
        y_s = flow.interpolate(y, y1, s)
        v = y1 - y
        features = self.student.backbone(x_t, t, cond)
        u = self.average_velocity(y_s, s, r, features)

        with torch.no_grad():
            if cfg.guidance != 1.0:
                uncond = self.student.backbone(x_t, t, batch["neg_cond"])
                u_uncond = self.average_velocity(y_s, s, s, uncond)
                w = torch.where(dropped, 1.0, cfg.guidance).reshape(-1, *([1] * (x.ndim - 1)))
                v = u_uncond + w * (v - u_uncond)
            gap = (s - r).reshape(-1, *([1] * (x.ndim - 1)))
            target = v
            if cfg.mean_flow_fraction > 0:
                d = cfg.finite_difference
                du_ds = (
                    self.average_velocity(y_s + d * v, s + d, r, features) - self.average_velocity(y_s - d * v, s - d, r, features)
                ) / (2 * d)
                target = v - gap * du_ds
        # [inferred] the error is measured in y-space (times s), the head's own output scale: in u-space the
        # 1/s factor lets the easy small-s samples dominate the loss and the head never learns the transition.
        s_ = s.reshape(-1, *([1] * (x.ndim - 1)))
        loss = adaptive_l2(s_ * (u - target), cfg.adaptive_c, cfg.adaptive_power)
        update("student", loss)
        return {"mean_flow_share": float((s != r).float().mean())}


@dataclass
class TMDConfig(DistributionMatchingConfig, StudentConfig):
    inner_steps: int = 4
    inner_shift: float = flow.INNER_SHIFT

    def __post_init__(self):
        DistributionMatchingConfig.__post_init__(self)
        StudentConfig.__post_init__(self)
        flow.check_steps(self.inner_steps, "inner_steps", 64)


@register("tmd")
class TMD(DistributionMatching):
    """Stage 2: DMD2 whose generator sample runs the whole inner rollout, with gradients through it."""

    Config = TMDConfig

    @classmethod
    def from_teacher(cls, cfg: TMDConfig, teacher: nn.Module, activation_checkpointing: bool = False) -> "TMD":
        return cls(cfg, teacher, cfg.build(teacher, activation_checkpointing), trainable_copy(teacher))

    def generate(self, batch, noise, step_index):
        cond = batch["cond"]
        outer = self.outer_grid(noise.device)
        inner = flow.inner_grid(self.cfg.inner_steps, self.cfg.inner_shift).to(device=noise.device, dtype=torch.float32)
        x = noise
        with torch.no_grad():
            for i in range(step_index):
                x = tmd_transition(self.student, x, outer[i], outer[i + 1], cond, inner, self.generator)
        return tmd_transition(self.student, x, outer[step_index], 0.0, cond, inner, self.generator)
