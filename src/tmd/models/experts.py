"""Wan2.2 A14B as a teacher: two Wan transformers, one per noise range, switched at a boundary time.

``WanPipeline`` runs ``transformer`` (the high-noise expert) while ``timestep >= boundary_ratio * 1000`` and
``transformer_2`` (low noise) below it, with ``guidance_scale`` and ``guidance_scale_2`` respectively. In tmd's
time (``t = timestep / 1000``) that is ``t >= boundary``. :class:`DualExpertTeacher` answers every teacher query
(sampling, KD targets, the real score, the discriminator's features) that way, per sample, so a batch whose times
straddle the boundary is split between the experts.

Memory: with ``offload=True`` (``tmd generate`` on a GPU) only the expert being evaluated is on the compute device;
the other waits in CPU memory and the two swap when a query needs the other one (one swap per sampled video). A
training run does not offload: FSDP shards each expert over the processes (``tmd.train.memory`` estimates it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tmd import flow


class DualExpertTeacher(nn.Module):
    """``velocity(x_t, t, cond)`` of the high-noise expert where ``t >= boundary``, of the low-noise one below."""

    fsdp_entry_points = ("velocity_and_features",)

    def __init__(
        self,
        high: nn.Module,
        low: nn.Module,
        boundary: float,
        guidance_2: float | None = None,
        offload: bool = False,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        if not 0.0 < boundary < 1.0:
            raise ValueError(f"boundary must lie in (0, 1), got {boundary}")
        if high.config.in_channels != low.config.in_channels or high.num_blocks != low.num_blocks:
            raise ValueError("the two experts differ in shape: a Wan2.2 A14B pipeline has two experts of one shape")
        self.high, self.low = high, low
        self.boundary = float(boundary)
        self.guidance_2 = guidance_2
        """The low-noise expert's CFG scale (diffusers' ``guidance_scale_2``); None: the one the caller gives."""
        self.offload = offload
        self.compute_device = torch.device(device) if device is not None else high.transformer.device

    # what methods and the discriminator read of a teacher: the high-noise expert's (both share a shape)
    @property
    def config(self):
        return self.high.config

    @property
    def num_blocks(self) -> int:
        return self.high.num_blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.high.dtype

    @property
    def transformer(self):
        """The high-noise expert's transformer: what a student is cut from (see :meth:`student_source`)."""
        return self.high.transformer

    @property
    def activation_checkpointing(self) -> bool:
        return self.high.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.high.activation_checkpointing = self.low.activation_checkpointing = value

    def expert_of(self, t: Tensor) -> Tensor:
        """True where the high-noise expert answers (``WanPipeline``'s ``t >= boundary_timestep``)."""
        return t >= self.boundary

    def student_source(self, times: Sequence[float]) -> nn.Module:
        """The expert a student that is evaluated only at ``times`` is initialised from; one line of error
        when the times straddle the boundary (that needs one student per expert, not built; docs/methods.md)."""
        high = [float(t) >= self.boundary for t in times if float(t) > 0]
        if all(high):
            return self.high
        if not any(high):
            return self.low
        raise ValueError(
            f"the student's outer times {[round(float(t), 4) for t in times if float(t) > 0]} straddle the A14B "
            f"boundary {self.boundary}: one student per expert is not built; choose outer_steps/outer_shift so that "
            "all outer times lie on one side (M = 1 or 2 at the default outer_shift 10: 0.999, 0.909)"
        )

    def guidance_at(self, t: Tensor, guidance: float) -> Tensor | float:
        """Per-sample CFG scale: ``guidance`` for the high-noise expert, ``guidance_2`` (if set) for the low."""
        if self.guidance_2 is None or self.guidance_2 == guidance:
            return guidance
        high = self.expert_of(t).to(torch.float32)
        return (high * guidance + (1 - high) * self.guidance_2).view(-1, 1, 1, 1, 1)

    def _resident(self, expert: nn.Module) -> nn.Module:
        if self.offload:
            other = self.low if expert is self.high else self.high
            other.to("cpu")
            expert.to(self.compute_device)
        return expert

    def velocity_and_features(
        self, x_t: Tensor, t: Tensor | float, cond: Tensor, feature_blocks: Sequence[int] = ()
    ) -> tuple[Tensor, list[Tensor]]:
        # each expert checks t itself (tmd.models.wan.as_time)
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        high = self.expert_of(t)
        if bool(high.all()) or not bool(high.any()):
            expert = self._resident(self.high if bool(high.all()) else self.low)
            return expert.velocity_and_features(x_t, t, cond, feature_blocks)
        velocity = torch.empty(x_t.shape, dtype=torch.float32, device=x_t.device)
        features: list[Tensor | None] = [None] * len(feature_blocks)
        for expert, rows in ((self.high, high), (self.low, ~high)):
            v, f = self._resident(expert).velocity_and_features(x_t[rows], t[rows], cond[rows], feature_blocks)
            velocity = velocity.index_put((rows,), v)
            for i, part in enumerate(f):
                if features[i] is None:
                    features[i] = part.new_empty((x_t.shape[0], *part.shape[1:]))
                features[i] = features[i].index_put((rows,), part)
        return velocity, features

    def velocity(self, x_t: Tensor, t: Tensor | float, cond: Tensor) -> Tensor:
        return self.velocity_and_features(x_t, t, cond)[0]

    forward = velocity


def student_expert(teacher: nn.Module, outer_steps: int, outer_shift: float) -> nn.Module:
    """What a student sampled on the outer grid (``tmd.flow.outer_grid``) is cut from: ``teacher`` itself, or for
    a :class:`DualExpertTeacher` the expert its outer times use (``DualExpertTeacher.student_source``)."""
    if not isinstance(teacher, DualExpertTeacher):
        return teacher
    with torch.device("cpu"):  # also when models are built on the meta device (memory estimates)
        return teacher.student_source(flow.outer_grid(outer_steps, outer_shift).tolist())
