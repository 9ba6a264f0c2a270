"""MDT-dist (Zhou et al. 2025, arXiv 2509.04406; official code Zanue/MDT-dist
``src/trellis/trainers/flow_matching/flow_matching_mdt.py``, ``distill_type: discrete``, the default of
its configs): marginal-data transport distillation.

The student ``phi(x_t, t)`` is a velocity model whose x0 ``x_t - t phi`` should be the ODE endpoint,
i.e. ``u = phi + t dphi/dt = v_teacher^w`` along the teacher's ODE (Eq. 12-13). ``dphi/dt`` is the
backward difference ``(phi(x_t, t) - phi(x_t - dt v, t - dt)) / dt`` along the teacher's CFG velocity v
(Eq. 14, dt = 0.01), without gradients, and, as the code does, normalised over the whole tensor of each
sample, ``D / (||D||_2 + 0.1)``. Both losses share one time t (logit-normal, the code's config) and one
noise:
- velocity matching (VM) on noised data: ``||phi(x_t, t) - sg(v - t D)||^2``;
- velocity distillation (VD, Eq. 16-17) on a one-step sample from pure noise, ``x' = z' - T phi(z', T)``
  (gradients flow through it): ``x'`` is noised with the same t and noise and pushed by the raw velocity
  gap ``phi(x'_t, t) - (v' - t D')`` (no normaliser), the student itself being the fake score.
The student samples with deterministic Euler steps of its velocity on the outer grid.

Ambiguities and choices:
- ``T`` is ``flow.T_MAX`` (0.999), the first time of our samplers (the code evaluates ``phi(z', 1)``).
- CFG: the config's ``guidance`` for VM and VD (the code's 40 and 100, in its ``(1 + w) v_c - w v_u``
  form, are TRELLIS's; our teacher samples with the scale it was trained for, 3.5 on the world, 5 on Wan).
- The code samples the student with TRELLIS's sampler and CFG; our students sample without CFG
  (one forward per step), like every few-step generator here.
- Learning rate: the paper's 4e-8 (batch 256) is thousands of times below TRELLIS's own; the student is
  its own fake score, so a step that moves the one-step sample off the data also moves the judge. Ours:
  ``lr_scale`` 0.1 of ``train.lr``, the first decade below the shared lr at which the VD term stops growing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tmd import flow
from tmd.methods import register
from tmd.methods.common import StudentMethod, trainable_copy
from tmd.sampling import guided_velocity


@dataclass
class MDTDistConfig:
    guidance: float = 5.0  # CFG of the teacher velocity in VM and VD
    vm_weight: float = 1.0
    vd_weight: float = 1.0  # the paper's lambda
    finite_difference: float = 0.01  # dt of Eq. 14
    tangent_c: float = 0.1  # D / (||D||_2 + c)
    logit_mean: float = 1.0  # t = sigmoid(N(mean, std)), the code's logitNormal(1, 1)
    logit_std: float = 1.0
    outer_steps: int = 2  # the step count a run is scored at first (sample_steps lists the rest)
    outer_shift: float = flow.OUTER_SHIFT
    # the student's lr over train.lr: the paper trains at 4e-8 (TRELLIS); on the world at the shared 1e-4 the
    # VD term runs away after ~260 iterations, at 1e-5 it falls throughout (docs/methods.md)
    lr_scale: float = 0.1

    def __post_init__(self):
        flow.check_guidance(self.guidance)
        flow.check_steps(self.outer_steps, "outer_steps", 16)
        if self.vm_weight < 0 or self.vd_weight < 0 or self.vm_weight + self.vd_weight == 0:
            raise ValueError(f"vm_weight and vd_weight must be >= 0 and not both 0, got {self.vm_weight}, {self.vd_weight}")
        if not 0 < self.finite_difference < 0.1:
            raise ValueError(f"finite_difference must be in (0, 0.1), got {self.finite_difference}")
        if self.tangent_c <= 0 or self.logit_std <= 0 or self.outer_shift <= 0 or self.lr_scale <= 0:
            raise ValueError("tangent_c, logit_std, outer_shift and lr_scale must be > 0")


def normalised_tangent(d: Tensor, c: float) -> Tensor:
    """``D / (||D||_2 + c)``, the norm over all of each sample's elements (the official code's ``d_norm``)."""
    return d / flow.expand_time(torch.linalg.vector_norm(d.flatten(1), dim=1) + c, d)


@register("mdt_dist")
class MDTDist(StudentMethod):
    Config = MDTDistConfig

    def __init__(self, cfg: MDTDistConfig, teacher: nn.Module, student: nn.Module):
        super().__init__(cfg, student, teacher)

    @classmethod
    def from_teacher(cls, cfg: MDTDistConfig, teacher: nn.Module, activation_checkpointing: bool = False) -> MDTDist:
        student = trainable_copy(teacher)
        student.activation_checkpointing = activation_checkpointing
        return cls(cfg, teacher, student)

    sample_steps = (1, 2)

    def _times(self, n: int, device) -> Tensor:
        """The code's logit-normal time, kept in ``[dt + 1e-5, 1]`` so that ``t - dt`` stays a time."""
        cfg, dt = self.cfg, self.cfg.finite_difference
        t = torch.sigmoid(self.rng.randn((n,), device) * cfg.logit_std + cfg.logit_mean)
        return 1e-5 + dt + (1 - dt - 1e-5) * t

    @torch.no_grad()
    def velocity_target(self, x_t: Tensor, t: Tensor, phi: Tensor, batch: dict) -> Tensor:
        """``v^w - t D / (||D|| + c)`` at ``x_t``, ``D`` the student's backward difference along ``v^w``;
        ``phi`` is the student's velocity at ``(x_t, t)``."""
        cfg, dt, cond = self.cfg, self.cfg.finite_difference, batch["cond"]
        v = guided_velocity(self.teacher, x_t, t, cond, batch["neg_cond"], cfg.guidance)
        d = (phi - self.student.velocity(x_t - dt * v, t - dt, cond)) / dt
        return v - flow.expand_time(t, x_t) * normalised_tangent(d, cfg.tangent_c)

    def training_step(self, batch, step, update):
        cfg, x, cond = self.cfg, batch["x"], batch["cond"]
        t, noise = self._times(x.shape[0], x.device), self.rng.randn(x.shape, x.device)
        terms = {}
        if cfg.vm_weight > 0:
            x_t = flow.interpolate(x, noise, t)
            phi = self.student.velocity(x_t, t, cond)
            target = self.velocity_target(x_t, t, phi.detach(), batch)
            terms["vm"] = cfg.vm_weight * (phi.float() - target.float()).pow(2).mean()
        if cfg.vd_weight > 0:
            z = self.rng.randn(x.shape, x.device)
            phi_z = self.student.velocity(z, flow.T_MAX, cond)
            x_fake = flow.x0_from_velocity(z, phi_z, flow.T_MAX)
            with torch.no_grad():
                x_t = flow.interpolate(x_fake, noise, t)
                phi = self.student.velocity(x_t, t, cond)
                gap = phi - self.velocity_target(x_t, t, phi, batch)
            # gradient 2 gap / N on phi_z, hence -2 gap / (T N) on the sample x' = z - T phi_z (Eq. 17)
            terms["vd"] = cfg.vd_weight * (gap.float() + phi_z.float() - phi_z.detach().float()).pow(2).mean()
        update("student", sum(terms.values()), terms)
        return {}
