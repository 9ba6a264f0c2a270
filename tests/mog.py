"""A class-conditional mixture of Gaussians whose rectified-flow velocity is known in closed form.

Distillation losses are checked here in seconds on CPU: the teacher is exact, so any gap between a
student's samples and the data is the student's doing, and a loss that works must shrink it.

Conditions are vectors of length K + 1: the one-hot of a class, or the one-hot of the extra "null"
index K, which means the marginal over all classes (the negative condition for classifier-free
guidance). A general non-negative vector is read as a mixture of those K + 1 distributions.

Test support (the method tests' closed-form world), with the tiny MLP flow models for it, built like the Wan
models. Time reaches every residual block (as AdaLN does in Wan), so a TMD head split off the top blocks
conditions on its own inner time. :class:`MLPTransition` mirrors ``tmd.models.split``: the inner
state goes through the shared input embedding and a zero-initialised residual block, is fused into
the backbone features by a gated zero-initialised projection, and the head's time embedding gets a
zero-initialised embedding of ``s - r``; so a student built from a velocity model starts equal to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tmd import flow
from tmd.models.protocol import VelocityModel
from tmd.models.wan import as_time
from tmd.sampling import guided_velocity


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


class TimeEmbedding(nn.Module):
    """Fourier features of t in [0, 1] with frequencies up to 1000 (grid gaps reach ~1e-3), then an MLP."""

    def __init__(self, width: int, frequencies: int = 16, max_frequency: float = 1000.0):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(0, math.log10(max_frequency), frequencies), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        angles = t[:, None].to(self.freqs.dtype) * self.freqs
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


class Block(nn.Module):
    """Pre-norm residual MLP with the time embedding added to its hidden layer."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.time = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h)) + self.time(nn.functional.silu(temb))))


class _MLPFlow(nn.Module):
    """Parts shared by both models, under the same names so a velocity model's weights load into a student."""

    def __init__(self, dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        if min(dim, cond_dim, width, depth) < 1:
            raise ValueError(f"dim, cond_dim, width and depth must be >= 1, got {dim}, {cond_dim}, {width}, {depth}")
        self.dim, self.cond_dim, self.width = dim, cond_dim, width
        self.x_embed = nn.Linear(dim, width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.time_embed = TimeEmbedding(width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def _embed(self, x_t: Tensor, t: Tensor | float, cond: Tensor) -> tuple[Tensor, Tensor]:
        if x_t.ndim != 2 or x_t.shape[1] != self.dim or cond.shape != (x_t.shape[0], self.cond_dim):
            raise ValueError(
                f"expected x_t (B, {self.dim}) and cond (B, {self.cond_dim}), got {tuple(x_t.shape)} and {tuple(cond.shape)}"
            )
        t = as_time(t, x_t.shape[0], x_t.device)
        return self.x_embed(x_t) + self.cond_embed(cond), self.time_embed(t)

    @staticmethod
    def _run(blocks, h: Tensor, temb: Tensor) -> Tensor:
        for block in blocks:
            h = block(h, temb)
        return h


class MLPVelocity(_MLPFlow):
    """A ``VelocityModel``: teacher copy, fake score, or few-step generator."""

    def __init__(self, dim: int, cond_dim: int, width: int = 128, depth: int = 3):
        super().__init__(dim, cond_dim, width, depth)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def velocity(self, x_t: Tensor, t: Tensor | float, cond: Tensor) -> Tensor:
        h, temb = self._embed(x_t, t, cond)
        return self.out(self._run(self.blocks, h, temb))


class MLPTransition(_MLPFlow):
    """A ``TransitionModel``: ``backbone_depth`` blocks run once per outer step, ``head_depth`` per inner step."""

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        width: int = 128,
        backbone_depth: int = 3,
        head_depth: int = 2,
        inner_velocity: str = "noise",
        transition_target: str = "difference",
    ):
        if backbone_depth < 1 or head_depth < 1:
            raise ValueError(f"backbone_depth and head_depth must be >= 1, got {backbone_depth}, {head_depth}")
        flow.check_inner_velocity(inner_velocity)
        flow.check_transition_target(transition_target)
        super().__init__(dim, cond_dim, width, backbone_depth + head_depth)
        self.backbone_depth = backbone_depth
        self.inner_velocity = inner_velocity
        self.transition_target = transition_target
        self.inner_block = Block(width)
        self.fusion_gate = nn.Parameter(torch.zeros(()))
        self.fusion = nn.Linear(width, width)
        self.gap_embed = TimeEmbedding(width)
        for layer in (self.inner_block.fc2, self.fusion, self.gap_embed.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_velocity_model(cls, model: MLPVelocity, head_depth: int = 1, inner_velocity: str = "noise") -> MLPTransition:
        """Student whose head's first evaluation at ``s = t`` equals ``model.velocity`` for any ``y_s`` and ``r``."""
        if not 1 <= head_depth < model.depth:
            raise ValueError(f"head_depth must be in [1, {model.depth - 1}] for a model of depth {model.depth}, got {head_depth}")
        student = cls(model.dim, model.cond_dim, model.width, model.depth - head_depth, head_depth, inner_velocity)
        unexpected = student.load_state_dict(model.state_dict(), strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"velocity model has parameters the student lacks: {unexpected}")
        ref = next(model.parameters())
        return student.to(device=ref.device, dtype=ref.dtype)

    def backbone(self, x_t: Tensor, t: Tensor | float, cond: Tensor) -> Tensor:
        """Features (B, width) of the outer state, reused by every head step."""
        h, temb = self._embed(x_t, t, cond)
        return self._run(self.blocks[: self.backbone_depth], h, temb)

    def head(self, y_s: Tensor, s: Tensor | float, r: Tensor | float, features: Tensor) -> Tensor:
        """``y_hat``, the estimate of ``y = x1 - x``, from the inner state ``y_s`` at inner time ``s``."""
        batch = features.shape[0]
        if y_s.shape != (batch, self.dim):
            raise ValueError(f"inner state must be of shape ({batch}, {self.dim}), got {tuple(y_s.shape)}")
        s = as_time(s, batch, y_s.device)
        r = as_time(r, batch, y_s.device)
        # minus the embedding at zero gap: exactly zero at r = s, as in the Wan student (see tmd.models.split)
        gap = self.gap_embed(torch.cat([s - r, torch.zeros_like(s)]))
        temb = self.time_embed(s) + gap[:batch] - gap[batch:]
        z = self.inner_block(self.x_embed(y_s), temb)
        h = features + torch.sigmoid(self.fusion_gate) * self.fusion(z)
        return self.out(self._run(self.blocks[self.backbone_depth :], h, temb))


def fit_velocity(
    model: MLPVelocity,
    world: MixtureWorld,
    teacher: VelocityModel | None = None,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 2e-3,
    guidance: float = 1.0,
    cond_dropout: float = 0.1,
    seed: int = 0,
) -> MLPVelocity:
    """Train ``model`` in place on ``world.sample`` data: flow matching, or, given ``teacher``, regression
    of its (CFG-``guidance``) velocity, which has no target noise and so fits in fewer steps.

    Conditions are dropped to the null condition with probability ``cond_dropout`` so that the fitted
    model has an unconditional branch for CFG. Returns the model.
    """
    if teacher is None and guidance != 1.0:
        raise ValueError("guidance other than 1 needs a teacher to regress; flow matching learns the unguided velocity")
    flow.check_steps(steps, maximum=10**6)
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    neg = world.null_cond(batch_size).to(device)
    for _ in range(steps):
        x, cond = world.sample(batch_size, generator=g)
        drop = torch.rand(batch_size, generator=g) < cond_dropout
        cond = torch.where(drop[:, None], world.null_cond(batch_size), cond).to(device)
        t = torch.rand(batch_size, generator=g).to(device)
        noise = torch.randn(x.shape, generator=g).to(device)
        x = x.to(device)
        x_t = flow.interpolate(x, noise, t)
        if teacher is None:
            target = flow.velocity_target(x, noise)
        else:
            with torch.no_grad():
                target = guided_velocity(teacher, x_t, t, cond, neg, guidance)
        loss = nn.functional.mse_loss(model.velocity(x_t, t, cond), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return model
