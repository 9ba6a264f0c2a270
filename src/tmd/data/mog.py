"""A class-conditional mixture of Gaussians whose rectified-flow velocity is known in closed form.

Distillation losses are checked here in seconds on CPU: the teacher is exact, so any gap between a
student's samples and the data is the student's doing, and a loss that works must shrink it.

Conditions are vectors of length K + 1: the one-hot of a class, or the one-hot of the extra "null"
index K, which means the marginal over all classes (the negative condition for classifier-free
guidance). A general non-negative vector is read as a mixture of those K + 1 distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tmd.models.wan import as_time


@dataclass
class MixtureWorld:
    """K classes in ``dim`` dimensions, each a mixture of ``components`` isotropic Gaussians.

    In the first two coordinates the component means sit on a circle of ``radius`` with the classes
    interleaved, so a class is multi-modal and its neighbours belong to other classes (CFG has work to
    do); further coordinates are seeded random. Weights and stds vary per component so that a
    generator dropping or re-weighting modes shows up in the metrics.
    """

    dim: int = 2
    num_classes: int = 4
    components: int = 3
    std: float = 0.15
    radius: float = 2.0
    seed: int = 0
    means: Tensor = field(init=False, repr=False, compare=False)  # (K, C, D) float64
    stds: Tensor = field(init=False, repr=False, compare=False)  # (K, C)
    weights: Tensor = field(init=False, repr=False, compare=False)  # (K, C), each row sums to 1
    class_probs: Tensor = field(init=False, repr=False, compare=False)  # (K,)

    def __post_init__(self):
        if self.dim < 1 or self.num_classes < 1 or self.components < 1:
            raise ValueError(
                f"dim, num_classes and components must be >= 1, got {self.dim}, {self.num_classes}, {self.components}"
            )
        if not (self.std > 0 and self.radius >= 0):
            raise ValueError(f"std must be > 0 and radius >= 0, got {self.std}, {self.radius}")
        g = torch.Generator().manual_seed(self.seed)
        k, c, d = self.num_classes, self.components, self.dim
        slot = (torch.arange(c)[None, :] * k + torch.arange(k)[:, None]).double()  # component c of class k
        means = torch.zeros(k, c, d, dtype=torch.float64)
        if d == 1:
            means[..., 0] = self.radius * (2 * slot / max(k * c - 1, 1) - 1)
        else:
            angle = 2 * math.pi * slot / (k * c)
            means[..., 0] = self.radius * angle.cos()
            means[..., 1] = self.radius * angle.sin()
            means[..., 2:] = 0.5 * self.radius * torch.randn(k, c, d - 2, generator=g, dtype=torch.float64)
        self.means = means
        self.stds = self.std * (0.75 + 0.5 * torch.rand(k, c, generator=g, dtype=torch.float64))
        w = 1 + torch.rand(k, c, generator=g, dtype=torch.float64)
        self.weights = w / w.sum(1, keepdim=True)
        self.class_probs = torch.full((k,), 1.0 / k, dtype=torch.float64)

    @property
    def cond_dim(self) -> int:
        return self.num_classes + 1

    @property
    def null_label(self) -> int:
        return self.num_classes

    def labels_to_cond(self, labels: Tensor) -> Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if torch.any(labels < 0) or torch.any(labels > self.null_label):
            raise ValueError(f"labels must lie in [0, {self.null_label}] ({self.null_label} = null), got {labels.tolist()}")
        return nn.functional.one_hot(labels, self.cond_dim).float()

    def null_cond(self, n: int) -> Tensor:
        return self.labels_to_cond(torch.full((n,), self.null_label))

    def neg_cond(self) -> Tensor:
        """(1, K + 1): the samplers broadcast it over the batch."""
        return self.null_cond(1)

    def sample(
        self, n: int, labels: Tensor | int | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``n`` data points and their conditions; null labels draw from the marginal and keep the null condition."""
        if labels is None:
            labels = torch.multinomial(self.class_probs, n, replacement=True, generator=generator)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.ndim == 0:
            labels = labels.expand(n)
        if labels.shape != (n,):
            raise ValueError(f"labels must be an int or of shape ({n},), got {tuple(labels.shape)}")
        cond = self.labels_to_cond(labels)
        random_class = torch.multinomial(self.class_probs, n, replacement=True, generator=generator)
        classes = torch.where(labels == self.null_label, random_class, labels)
        comps = torch.multinomial(self.weights[classes], 1, generator=generator).squeeze(1)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[classes, comps] + self.stds[classes, comps, None] * noise
        return x.float(), cond

    def mixture_log_weights(self, cond: Tensor) -> Tensor:
        """(B, K C) log-weights of all components under each condition (-inf where a class is excluded)."""
        if cond.ndim != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond must be of shape (B, {self.cond_dim}), got {tuple(cond.shape)}")
        cond = cond.to(torch.float64)
        probs = self.class_probs.to(cond.device)
        class_w = cond[:, : self.num_classes] + cond[:, self.num_classes :] * probs
        return (class_w[:, :, None] * self.weights.to(cond.device)).flatten(1).log()

    def noised_components(self, x_t: Tensor, t: Tensor | float, cond: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-component terms of ``x_t | k ~ N((1 - t) mu_k, ((1 - t)^2 s_k^2 + t^2) I)``, in float64.

        Returns the log joint ``log w_k + log N(x_t; ...)`` (B, J), the offset ``x_t - (1 - t) mu_k``
        (B, J, D), the variance (B, J) and ``t`` (B,).
        """
        if x_t.ndim != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t must be of shape (B, {self.dim}), got {tuple(x_t.shape)}")
        x = x_t.to(torch.float64)
        t = as_time(t, x.shape[0], x.device).double()
        a = (1 - t)[:, None]
        means = self.means.to(x.device).flatten(0, 1)
        s2 = self.stds.to(x.device).flatten() ** 2
        var = a**2 * s2 + t[:, None] ** 2
        offset = x[:, None, :] - a[..., None] * means
        log_joint = (
            self.mixture_log_weights(cond.to(x.device))
            - 0.5 * self.dim * torch.log(2 * math.pi * var)
            - 0.5 * (offset**2).sum(-1) / var
        )
        return log_joint, offset, var, t

    def log_prob(self, x_t: Tensor, cond: Tensor, t: Tensor | float = 0.0) -> Tensor:
        """Exact log density of the (noised, at time t) conditional distribution; t = 0 is the data."""
        return self.noised_components(x_t, t, cond)[0].logsumexp(-1)


class AnalyticTeacher(nn.Module):
    """The exact rectified-flow velocity ``E[x1 - x | x_t, cond]`` of a :class:`MixtureWorld`.

    Per component, Gaussian conditioning gives ``v_k = (t - (1 - t) s_k^2) / var_k (x_t - (1 - t) mu_k) - mu_k``,
    and the velocity is their average under the posterior responsibilities. The form has no 1 / t, so it
    holds down to t = 0 (where ``v = -x``). An ``nn.Module`` without parameters so that generic
    training code may call ``eval``, ``requires_grad_`` or ``parameters`` on any teacher.
    """

    def __init__(self, world: MixtureWorld):
        super().__init__()
        self.world = world

    def velocity(self, x_t: Tensor, t: Tensor | float, cond: Tensor) -> Tensor:
        log_joint, offset, var, t = self.world.noised_components(x_t, t, cond)
        s2 = self.world.stds.to(offset.device).flatten() ** 2
        means = self.world.means.to(offset.device).flatten(0, 1)
        v_k = ((t[:, None] - (1 - t[:, None]) * s2) / var)[..., None] * offset - means
        resp = log_joint.softmax(-1)
        return (resp[..., None] * v_k).sum(1).to(x_t.dtype)
