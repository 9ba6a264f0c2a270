"""LinVideo (Huang et al. 2025, arXiv 2510.08318): linear attention in chosen layers, recovered by ADM.

The student is a copy of the teacher with every self-attention made selective
(:mod:`tmd.models.linear_attention`): ``r softmax + (1 - r) linear`` per layer, every r starting at 1
(0.99: all softmax, converted progressively). For the first ``selection_steps`` steps selective transfer
learns the r's (a constraint on the rounded count, ``(sum round(r) - softmax_layers)^2``, and an
annealed 0/1 regulariser), then :func:`round_selection` keeps exactly ``softmax_layers`` layers softmax
(by default the paper's share: 16 of 30 linear, so 3 of the world's 6) and makes the rest linear;
training goes on with the rounded model. The paper's text was only available to us second-hand
(summaries of arXiv 2510.08318; no official code): ``docs/methods.md`` marks what is ours.

Anytime distribution matching (ADM), data-free: each step samples the teacher's ODE with CFG from noise
on its Euler grid (``trajectory_steps``, ``shift``) down to a random grid time ``t_i``; from that teacher
point the student takes one Euler step of its own, ``x_hat = x_{t_i} + (t_{i+1} - t_i) v_theta``, and
the distribution of ``x_hat`` at ``t_{i+1}`` is matched to the teacher's with the DMD gradient
``(x0_fake - x0_real) / mean|x_hat - x0_real|``. The fake score is the student itself (no grad): it is a
multi-step model, so its own velocity at ``t_{i+1}`` is the score of its own samples there, which is
what makes ADM cheap (no critic network). The exported generator is a velocity model sampled like the
teacher (``sample_teacher``, multi-step, CFG), so it can serve as a teacher for TMD or DMD2 later.

Ambiguities and choices:
- Branches: each sample's step and both scores use one branch, the prompt or the negative prompt
  (``uncond_prob``), so each branch is matched to the teacher's own; matching the CFG combination
  alone would leave the branches free along ``v_c - v_u``, and the model must serve other scales.
- At ``t_{i+1} = 0`` there is no score: the last step's sample is re-noised with fresh noise to the
  last positive grid time and matched there (DMD's re-noising), so the final velocity is trained too.
- Weighting: the loss is divided by the step length, so every grid time counts the same (the DMD
  normaliser makes the per-element gradient ``(v_real - v_fake) / mean|v_real|``, scale-free).
- While layers are mixed, an attention-transfer term (``transfer_weight``) regresses each layer's
  linear output on its softmax output with q/k/v detached, so it trains the feature maps only; it is
  dropped once rounded (a linear layer no longer computes its softmax).
- ``beta`` of the 0/1 regulariser goes linearly from ``beta_start`` to ``beta_end`` over the selection
  phase (AdaRound's 20 -> 2).
- Learning rate (the summaries give none): the student trains at ``lr_scale`` 0.1 of ``train.lr``. ADM's
  fake score is the student, so a step that moves the samples also moves their judge; at the shared 1e-4
  the rounded model's ADM loss ran away on the world, at 1e-5 it fell (``docs/methods.md``).
- The rounding in the constraint passes its gradient straight through (a plain round has none), so the
  constraint pulls every r alike while the rounded count misses the target and is silent once it is met.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from tmd import flow
from tmd.methods import register
from tmd.methods.base import GuidedSampling
from tmd.methods.common import (
    StudentMethod,
    dmd_loss,
    freeze,
    latent_shape,
    trainable_copy,
    x0_of,
)
from tmd.models.export import load_student_weights
from tmd.models.linear_attention import (
    check_target,
    export_config,
    is_rounded,
    linear_layers,
    linearise,
    round_selection,
    selection_losses,
    selective_layers,
    softmax_ratios,
    take_transfer_loss,
)
from tmd.sampling import guided_velocity, sample_teacher, teacher_grid


@dataclass
class LinVideoConfig:
    softmax_layers: Optional[int] = None  # layers left softmax after rounding; None: the paper's 16 of 30 linear
    selection_steps: int = 500  # selective transfer, then rounding at this step (0: none, the first layers stay softmax)
    feature_dim: Optional[int] = None  # Hedgehog features per half; None: the head dimension
    init_ratio: float = 0.99  # r of every layer when selection starts: all softmax (a sigmoid reaches 1 only in the limit)
    # the student's lr over train.lr: ADM's fake score is the student itself; on the world at the shared 1e-4
    # its loss runs away once the layers are rounded (0.34 -> 87 in 250 steps), at 1e-5 it keeps falling
    lr_scale: float = 0.1
    # AdamW moves every parameter by about its lr per step; these gains make the r's and the feature maps move
    # gain x the student's lr (lr_scale x train.lr): 0.1 and 0.01 a step at train.lr 1e-4 (the world: r
    # leaves 0.99 for 0.5 in about 50 steps). Tuned at that rate: scale them inversely with the lr.
    logit_gain: float = 10000.0  # r = sigmoid(gain * logit)
    feature_gain: float = 1000.0  # W = gain * parameter
    # the constraint must outweigh the 0/1 regulariser's hold on r near 1 (at beta 20 and r = 0.99 its
    # gradient is 27 per unit weight, the constraint's 2 per missing layer), and it falls silent once the
    # rounded count is met; Adam follows the sign of each logit's gradient, so the layers separate where
    # ADM's pull towards softmax in the harder layers is stronger than the constraint's, shared by all
    constraint_weight: float = 0.01
    binarise_weight: float = 0.001
    beta_start: float = 20.0
    beta_end: float = 2.0
    transfer_weight: float = 1.0  # attention transfer of the feature maps while layers are mixed
    transfer_tokens: int = 1024  # tokens (evenly strided) the transfer term compares attention on
    guidance: float = 5.0  # CFG of the teacher trajectories
    shift: float = 5.0  # time shift of the teacher's Euler grid
    trajectory_steps: int = 50
    uncond_prob: float = 0.5  # share of samples matched on the negative-prompt branch

    def __post_init__(self):
        flow.check_guidance(self.guidance)
        flow.check_steps(self.trajectory_steps, "trajectory_steps")
        if self.trajectory_steps < 2:
            raise ValueError("trajectory_steps must be >= 2: the last step is matched at the last positive grid time")
        if self.softmax_layers is not None and self.softmax_layers < 0:
            raise ValueError(f"softmax_layers must be >= 0 (or null for the paper's proportion), got {self.softmax_layers}")
        if self.selection_steps < 0:
            raise ValueError(f"selection_steps must be >= 0, got {self.selection_steps}")
        if self.transfer_tokens < 1:
            raise ValueError(f"transfer_tokens must be >= 1, got {self.transfer_tokens}")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1 (or null for the head dimension), got {self.feature_dim}")
        if not 0 < self.init_ratio < 1:
            raise ValueError(f"init_ratio must lie in (0, 1), got {self.init_ratio}")
        if min(self.logit_gain, self.feature_gain, self.shift, self.lr_scale) <= 0:
            raise ValueError("logit_gain, feature_gain, shift and lr_scale must be > 0")
        if min(self.constraint_weight, self.binarise_weight, self.transfer_weight) < 0:
            raise ValueError("constraint_weight, binarise_weight and transfer_weight must be >= 0")
        if not 0 < self.beta_end <= self.beta_start:
            raise ValueError(f"need 0 < beta_end <= beta_start, got {self.beta_end}, {self.beta_start}")
        if not 0 <= self.uncond_prob <= 1:
            raise ValueError(f"uncond_prob must be in [0, 1], got {self.uncond_prob}")


PAPER_LINEAR_SHARE = 16 / 30
"""The paper's Wan 1.3B default: 16 of its 30 self-attention layers linear."""


def load_linearised(teacher: nn.Module, weights: str | Path, copy_model: bool = True) -> nn.Module:
    """A frozen linearised ``teacher`` (a copy unless ``copy_model`` is False) holding a LinVideo run's export
    (``student.safetensors``): the velocity model to sample like a teacher, or to distil further (TMD,
    DMD2) in place of the teacher."""
    feature_dim = export_config(weights).get("feature_dim")
    model = linearise(teacher, feature_dim, copy_model=copy_model)
    load_student_weights(model, str(weights))
    return freeze(model)


@register("linvideo")
class LinVideo(GuidedSampling, StudentMethod):
    Config = LinVideoConfig
    exports_student_folder = False

    """Teacher step counts at which ``tmd demo`` evaluates the linearised model (with CFG, like the teacher)."""

    def __init__(self, cfg: LinVideoConfig, teacher: nn.Module, student: nn.Module):
        layers = len(selective_layers(student))
        self.softmax_layers = (
            cfg.softmax_layers if cfg.softmax_layers is not None else layers - round(PAPER_LINEAR_SHARE * layers)
        )
        check_target(student, self.softmax_layers)
        super().__init__(cfg, student, teacher)

    @classmethod
    def from_teacher(cls, cfg: LinVideoConfig, teacher: nn.Module, activation_checkpointing: bool = False) -> LinVideo:
        student = linearise(
            trainable_copy(teacher), cfg.feature_dim, cfg.init_ratio, cfg.logit_gain, cfg.feature_gain, cfg.transfer_tokens
        )
        student.activation_checkpointing = activation_checkpointing
        return cls(cfg, teacher, student)

    @staticmethod
    def sample_guided(
        model: nn.Module, noise: Tensor, cond: Tensor, neg_cond: Tensor, steps: int, guidance: float, shift: float
    ) -> Tensor:
        return sample_teacher(model, noise, cond, neg_cond, steps, guidance, shift)

    def beta(self, step: int) -> float:
        progress = min(step / self.cfg.selection_steps, 1.0) if self.cfg.selection_steps else 1.0
        return self.cfg.beta_start + (self.cfg.beta_end - self.cfg.beta_start) * progress

    def _teacher_point(self, noise: Tensor, cond: Tensor, neg_cond: Tensor, grid: Tensor, index: int) -> Tensor:
        """The teacher's CFG Euler trajectory from ``noise`` down to ``grid[index]``."""
        x = noise
        with torch.no_grad():
            for j in range(index):
                x = x + (grid[j + 1] - grid[j]) * guided_velocity(self.teacher, x, grid[j], cond, neg_cond, self.cfg.guidance)
        return x

    def adm_loss(self, batch: dict) -> Tensor:
        cfg, g = self.cfg, self.rng
        cond, neg_cond = batch["cond"], batch["neg_cond"]
        shape, device = latent_shape(batch), cond.device
        grid = teacher_grid(cfg.trajectory_steps, cfg.shift).to(device)
        index = g.shared_randint(cfg.trajectory_steps, device)
        x = self._teacher_point(g.randn(shape, device), cond, neg_cond, grid, index)
        uncond = (g.rand(shape[0], device) < cfg.uncond_prob).reshape(-1, *([1] * (cond.ndim - 1)))
        branch = torch.where(uncond, neg_cond, cond)
        t, s = grid[index], grid[index + 1]
        x_hat = x + (s - t) * self.student.velocity(x, t, branch)
        if s > 0:
            x_match, t_match = x_hat, s
        else:
            t_match = grid[-2]
            x_match = flow.interpolate(x_hat, g.randn(shape, device), t_match)
        with torch.no_grad():
            real = x0_of(self.teacher, x_match, t_match, branch)
            fake = x0_of(self.student, x_match, t_match, branch)
        return dmd_loss(x_match, fake, real) / (t - s)

    def training_step(self, batch, step, update):
        cfg = self.cfg
        if not is_rounded(self.student) and (step >= cfg.selection_steps or self.softmax_layers == 0):
            round_selection(self.student, self.softmax_layers)
        selecting = not is_rounded(self.student)
        terms = {"adm": self.adm_loss(batch)}
        if selecting:
            transfer = take_transfer_loss(self.student)
            if cfg.transfer_weight > 0 and transfer is not None:
                terms["transfer"] = cfg.transfer_weight * transfer
            constraint, binarise = selection_losses(self.student, self.softmax_layers, self.beta(step))
            terms["constraint"] = cfg.constraint_weight * constraint
            terms["binarise"] = cfg.binarise_weight * binarise
        update("student", sum(terms.values()), terms)
        with torch.no_grad():
            return {"softmax_share": float(softmax_ratios(self.student).sum()), "linear_layers": len(linear_layers(self.student))}
