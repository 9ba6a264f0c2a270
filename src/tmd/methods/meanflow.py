"""MeanFlow distillation (Geng et al. 2025, arXiv 2505.13447): a few-step flow map from the teacher.

The network is the average velocity ``u(z_t, r, t)`` over [r, t] along the teacher's ODE, so one
sampler step is ``z_r = z_t - (t - r) u``. MeanFlow identity: ``u = v - (t - r) du/dt``, with ``v`` the
teacher's CFG velocity (distillation: a low-variance ``v`` instead of ``x1 - x``) and ``du/dt`` the total
derivative along it; loss ``||u - sg(v - (t - r) du/dt)||^2`` with the adaptive weight.

Model: the TMD student (``tmd.models.split`` / ``MLPTransition``) is a (t, r)-conditioned copy of the
teacher: ``u(z, r, t) = head(z, t, r, backbone(z, t, c))`` with the head's inner input set to z. Its
gap embedding of ``t - r`` is zero-initialised, so u starts as the teacher's velocity.

Ambiguities and choices:
- ``du/dt`` by central finite differences (delta = 5e-3), as TMD stage 1, instead of a JVP.
- r: ``r = t`` for ``1 - mean_flow_fraction`` of the batch (MeanFlow's 75%), otherwise the outer-grid
  point below t, so capacity goes to the jumps the sampler takes (TMD stage 1's choice);
  t ~ shift_{time_shift}(U) over data noised with fresh noise (the teacher's marginal; batches need 'x').
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tmd import flow
from tmd.methods import register
from tmd.methods.common import StudentMethod, adaptive_l2
from tmd.methods.tmd import StudentConfig, grid_point_at_or_below
from tmd.sampling import guided_velocity


@dataclass
class MeanFlowConfig(StudentConfig):
    guidance: float = 5.0  # CFG of the teacher velocity that the flow map integrates
    outer_steps: int = 2
    outer_shift: float = flow.OUTER_SHIFT
    mean_flow_fraction: float = 0.25
    time_shift: float = 3.0
    finite_difference: float = 5e-3
    adaptive_c: float = 1e-3
    adaptive_power: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        flow.check_guidance(self.guidance)
        flow.check_steps(self.outer_steps, "outer_steps", 16)
        if not 0 <= self.mean_flow_fraction <= 1:
            raise ValueError(f"mean_flow_fraction must be in [0, 1], got {self.mean_flow_fraction}")
        if not 0 < self.finite_difference < 0.1:
            raise ValueError(f"finite_difference must be in (0, 0.1), got {self.finite_difference}")
        if self.time_shift <= 0 or self.outer_shift <= 0:
            raise ValueError("time_shift and outer_shift must be > 0")


def average_velocity(student: nn.Module, z: Tensor, t: Tensor | float, r: Tensor | float, cond: Tensor) -> Tensor:
    return student.head(z, t, r, student.backbone(z, t, cond))


@register("meanflow")
class MeanFlow(StudentMethod):
    Config = MeanFlowConfig
    # its weights have the TMD student's form, but a student folder is sampled as TMD (backbone once, inner flow
    # from noise) and this model jumps z_r = z_t - (t - r) u: exported, `tmd generate` would sample it wrongly
    exports_student_folder = False

    def __init__(self, cfg: MeanFlowConfig, teacher: nn.Module, student: nn.Module):
        super().__init__(cfg, student, teacher)

    @classmethod
    def from_teacher(cls, cfg: MeanFlowConfig, teacher: nn.Module, activation_checkpointing: bool = False) -> MeanFlow:
        return cls(cfg, teacher, cfg.build(teacher, activation_checkpointing))

    sample_steps = (1, 2)

    @staticmethod
    def sample(student, noise, cond, steps, rng=None, outer_shift: float = flow.OUTER_SHIFT):
        return sample_mean_flow(student, noise, cond, steps, outer_shift)

    def training_step(self, batch, step, update):
        cfg, g, x, cond = self.cfg, self.rng, batch["x"], batch["cond"]
        n, device, d = x.shape[0], x.device, cfg.finite_difference
        t = flow.sample_shifted_uniform(n, cfg.time_shift, g, device).clamp(d + 1e-3, 1 - d)
        grid = flow.outer_grid(cfg.outer_steps, cfg.outer_shift).to(device=device, dtype=torch.float32)
        r = torch.where(g.rand(n, device) < cfg.mean_flow_fraction, grid_point_at_or_below(grid, t), t)
        z = flow.interpolate(x, g.randn(x.shape, device), t)
        u = average_velocity(self.student, z, t, r, cond)
        with torch.no_grad():
            v = guided_velocity(self.teacher, z, t, cond, batch["neg_cond"], cfg.guidance)
            du_dt = (
                average_velocity(self.student, z + d * v, t + d, r, cond)
                - average_velocity(self.student, z - d * v, t - d, r, cond)
            ) / (2 * d)
            target = v - (t - r).reshape(-1, *([1] * (z.ndim - 1))) * du_dt
        update("student", adaptive_l2(u - target, cfg.adaptive_c, cfg.adaptive_power))
        return {"mean_flow_share": float((r != t).float().mean())}


@torch.no_grad()
def sample_mean_flow(student: nn.Module, noise: Tensor, cond: Tensor, steps: int = 2, shift: float = flow.OUTER_SHIFT) -> Tensor:
    """Deterministic flow-map jumps along the outer grid: ``z_r = z_t - (t - r) u(z_t, r, t)``."""
    grid = flow.outer_grid(steps, shift).to(device=noise.device, dtype=torch.float32)
    z = noise.float()
    for i in range(steps):
        z = z - (grid[i] - grid[i + 1]) * average_velocity(student, z, grid[i], grid[i + 1], cond)
    return z
