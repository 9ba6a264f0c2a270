"""Pieces several methods share: condition dropout, adaptive weighting, real/fake x0, the DMD loss."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from tmd import flow
from tmd.methods.base import Method
from tmd.models.protocol import VelocityModel
from tmd.rng import BatchRandom
from tmd.sampling import guided_velocity


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


class StudentMethod(Method):
    """A method that trains one module, ``self.student``, and keeps its EMA; the teacher, when the method needs
    one, is frozen."""

    export_module = "student"

    def __init__(self, cfg, student: nn.Module, teacher: nn.Module | None = None):
        super().__init__(cfg)
        self.student = student
        self.teacher = freeze(teacher) if teacher is not None else None

    def parameter_groups(self):
        return {"student": list(self.student.parameters())}

    def optimizer_overrides(self):
        """The student's lr as ``cfg.lr_scale x train.lr`` for a method whose config has one (its paper trains
        far below the shared lr)."""
        scale = getattr(self.cfg, "lr_scale", None)
        return {} if scale is None else {"student": {"lr_scale": scale}}

    def ema_modules(self):
        return {"student": self.student}

    def state_modules(self):
        return {"student": self.student}


def trainable_copy(module: nn.Module) -> nn.Module:
    """A copy that trains (generator or fake score initialised from the teacher); the teacher stays as is."""
    return copy.deepcopy(module).requires_grad_(True).train()


def latent_shape(batch: dict) -> tuple[int, ...]:
    """Data-free methods only need the latent shape; batches carry data ``x`` or one sample's ``latent_shape``
    (per sample, so that slicing a batch over data-parallel ranks needs no special case)."""
    if "x" in batch:
        return tuple(batch["x"].shape)
    if "latent_shape" in batch:
        return (batch["cond"].shape[0], *(int(s) for s in batch["latent_shape"]))
    raise ValueError("a batch must hold data latents 'x' or their 'latent_shape'")


def drop_condition(cond: Tensor, neg_cond: Tensor, p: float, rng: BatchRandom) -> tuple[Tensor, Tensor]:
    """Replace each sample's condition by the negative one with probability p; returns (cond, dropped mask)."""
    dropped = rng.rand(cond.shape[0], cond.device) < p
    mask = dropped.reshape(-1, *([1] * (cond.ndim - 1)))
    return torch.where(mask, neg_cond, cond), dropped


def adaptive_l2(error: Tensor, c: float = 1e-3, power: float = 1.0) -> Tensor:
    """MeanFlow's adaptive weighting ``m / sg(m + c)^p`` of the per-sample mean squared error ``m``; ``p = 0``
    is the plain mean squared error. With ``p = 1`` it equals the TMD paper's form over the *summed* error,
    ``||e||^2 / sg(||e||^2 + c d)`` (d the sample's dimension), so ``c`` here is the paper's ``c / d``."""
    squared = error.float().pow(2).flatten(1).mean(1)
    return (squared / (squared.detach() + c).pow(power)).mean()


def x0_real(teacher: VelocityModel, x_t: Tensor, t: Tensor, cond: Tensor, neg_cond: Tensor, guidance: float) -> Tensor:
    with torch.no_grad():
        return flow.x0_from_velocity(x_t, guided_velocity(teacher, x_t, t, cond, neg_cond, guidance), t)


def x0_of(model: VelocityModel, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
    return flow.x0_from_velocity(x_t, model.velocity(x_t, t, cond), t)


def dmd_loss(x_hat: Tensor, x0_fake: Tensor, x0_real: Tensor) -> Tensor:
    """``0.5 ||x - sg(x - g)||^2`` with the DMD direction ``g = (x0_fake - x0_real) / mean|x - x0_real|``.

    Its gradient wrt x_hat is g (per element, up to the mean's scale); the per-sample normaliser
    makes the step size independent of how far the sample is from the teacher.
    """
    return proxy_loss(x_hat, x0_real - x0_fake, x0_real)


def proxy_loss(x_hat: Tensor, direction: Tensor, reference: Tensor | None = None) -> Tensor:
    """``0.5 ||x - sg(x + direction / scale)||^2``, a step along ``direction``: with ``reference`` (the real
    score's x0 the step points to) DMD's per-sample ``scale = mean|x - reference|``, without it 1."""
    with torch.no_grad():
        if reference is not None:
            dims = tuple(range(1, x_hat.ndim))
            direction = direction / (x_hat - reference).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
        target = x_hat + direction
    return 0.5 * (x_hat.float() - target.float()).pow(2).mean()


def flow_matching_loss(model: VelocityModel, x: Tensor, cond: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Plain flow matching: the velocity at ``x_t`` regresses ``noise - x``."""
    x_t = flow.interpolate(x, noise, t)
    return (model.velocity(x_t, t, cond).float() - flow.velocity_target(x, noise).float()).pow(2).mean()
