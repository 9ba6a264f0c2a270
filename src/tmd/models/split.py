"""The TMD student: a Wan teacher split into a main backbone and a small flow head.

Backbone = patch embedding, condition embedder and blocks ``0 .. L-H-1``, run once per outer step.
Head = blocks ``L-H .. L-1`` plus output norm/projection, run once per inner step on the inner state
``y_s``. Three new parts let the head see ``y_s`` and the inner step, each initialised so that the
student's first head evaluation equals the teacher's forward:

- ``InnerStateBlock``: ``y_s`` is embedded with the (shared) patch embedding and refined by one
  AdaLN-MLP block with a gated residual, conditioned on the inner time ``s``.
- fusion with the backbone features ``m``: gated, ``m + sigmoid(a) * W z`` with W zero-initialised
  [inferred: the paper's text gives the global gate, not where the zero sits], or concat,
  ``W [m; z]`` with W initialised to ``[I, 0]``.
- time conditioning of the head: the teacher's embedding of ``s`` plus a new zero-initialised
  embedding of ``s - r`` (minus its value at 0, so it vanishes at ``r = s``).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.embeddings import TimestepEmbedding
from torch import Tensor, nn

from tmd import flow
from tmd.models.folder import PARTS_FILE, SPLIT_DEFAULTS_OF_OLD_EXPORTS, TMD_PARTS, TRANSFORMER_DIR, read_student_config
from tmd.models.wan import (
    TIMESTEP_SCALE,
    WanModule,
    WanState,
    WanTeacher,
    as_time,
    block_modulation,
    cast_transformer,
    check_inputs,
    embed,
    embed_tokens,
    load_teacher,
    project_out,
    run_blocks,
    time_embedding,
)

Fusion = Literal["gated", "concat"]


OLD_GAP_BIAS = "gap_embedder.linear_2.bias"
"""Exports and pipelines written before the gap embedder lost its output bias hold this key; the bias
cancelled in ``gap_embedding``, so dropping it loads them unchanged."""


def gap_embedder(freq_dim: int, dim: int) -> TimestepEmbedding:
    """The embedder of ``s - r``: a Wan timestep embedding whose output layer has no bias. ``gap_embedding``
    subtracts the embedding at 0, which would cancel an output bias exactly, so its gradient would be zero
    by construction and AdamW would turn that zero's float noise into steps of about the learning rate."""
    embedder = TimestepEmbedding(freq_dim, dim)
    # removed rather than built without: the global RNG then draws what it always drew, so every module
    # initialised after this one (fake score, discriminator) starts from the same weights as before
    embedder.linear_2.bias = None
    return embedder


class InnerStateBlock(nn.Module):
    """AdaLN-MLP block with a gated residual; the gate starts at zero so the block starts as identity."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        # hidden width = dim, not 4 dim: the block runs once per inner step, and its job (embed y_s) is small
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.modulation = nn.Linear(dim, 3 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, z: Tensor, temb: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(nn.functional.silu(temb)).unsqueeze(1).chunk(3, dim=-1)
        return z + gate * self.mlp(self.norm(z) * (1 + scale) + shift)


class GatedFusion(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gate_logit = nn.Parameter(torch.zeros(1))  # 1-D, not a scalar: FSDP2 cannot shard 0-d parameters
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, m: Tensor, z: Tensor) -> Tensor:
        return m + torch.sigmoid(self.gate_logit) * self.proj(z)


class ConcatFusion(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :dim].copy_(torch.eye(dim))
            self.proj.bias.zero_()

    def forward(self, m: Tensor, z: Tensor) -> Tensor:
        return self.proj(torch.cat([m, z], dim=-1))


FUSIONS = {"gated": GatedFusion, "concat": ConcatFusion}


class TMDStudent(WanModule):
    """Backbone/flow-head student built from a Wan teacher; implements ``TransitionModel``."""

    fsdp_entry_points = ("backbone", "head")
    """Methods that use the model's own weights outside ``forward`` (see ``tmd.train.distributed``)."""

    def __init__(
        self,
        teacher: WanTeacher,
        head_blocks: int = 5,
        fusion: Fusion = "gated",
        inner_velocity: str = "noise",
        transition_target: str = "difference",
    ):
        super().__init__()
        flow.check_inner_velocity(inner_velocity)
        flow.check_transition_target(transition_target)
        num_blocks = teacher.num_blocks
        if not 1 <= head_blocks < num_blocks:
            raise ValueError(
                f"head_blocks must be in [1, {num_blocks - 1}] for a teacher with {num_blocks} blocks, got {head_blocks} "
                "(the backbone needs at least one block)"
            )
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {sorted(FUSIONS)}")
        # a student trains whatever the teacher it was cut from is set to (teachers are often frozen)
        self.transformer = copy.deepcopy(teacher.transformer).requires_grad_(True)
        self.head_blocks = head_blocks
        self.fusion_kind = fusion
        self.inner_velocity = inner_velocity
        """How the head's output becomes the inner flow's average velocity (``tmd.flow.INNER_VELOCITIES``)."""
        self.transition_target = transition_target
        """What the head estimates (``tmd.flow.TRANSITION_TARGETS``)."""
        dim = self.transformer.config.num_attention_heads * self.transformer.config.attention_head_dim
        dtype = teacher.dtype
        self.inner_block = InnerStateBlock(dim, eps=self.transformer.config.eps).to(dtype)
        self.fusion = FUSIONS[fusion](dim).to(dtype)
        self.gap_embedder = gap_embedder(self.transformer.config.freq_dim, dim)
        nn.init.zeros_(self.gap_embedder.linear_2.weight)
        self.activation_checkpointing = False

    @classmethod
    def from_teacher(cls, teacher: WanTeacher, **split: Any) -> TMDStudent:
        """``TMDStudent(teacher, **split)`` on the teacher's device. The constructor makes its new modules on
        the default device instead: ``from_pretrained`` builds it around a meta skeleton and loads real
        weights into them."""
        return cls(teacher, **split).to(teacher.transformer.device)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> TMDStudent:
        """Load a folder written by ``tmd.models.export.export_student`` (no teacher or run needed).

        The split is built around a weightless (meta) copy of the transformer, then the saved one is
        put in its place, so a large model is never held twice in memory.
        """
        from safetensors.torch import load_file

        path = Path(path)
        config = read_student_config(path)
        if config["kind"] != "tmd_student":
            raise ValueError(f"{path} holds a {config['kind']} generator, not a TMD student; load it with load_teacher")
        with torch.device("meta"):
            skeleton = WanTransformer3DModel.from_config(config["transformer"])
        inner_flow = {**SPLIT_DEFAULTS_OF_OLD_EXPORTS, **{k: config[k] for k in SPLIT_DEFAULTS_OF_OLD_EXPORTS if k in config}}
        student = cls(WanTeacher(cast_transformer(skeleton, dtype)), config["head_blocks"], config["fusion"], **inner_flow)
        student.transformer = load_teacher(path / TRANSFORMER_DIR, dtype=dtype).transformer
        parts = load_file(str(path / PARTS_FILE))
        parts.pop(OLD_GAP_BIAS, None)
        result = nn.ModuleDict({name: getattr(student, name) for name in TMD_PARTS}).load_state_dict(parts, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{path / PARTS_FILE} does not fit a {config['fusion']} student: "
                f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
        return student.to(device).eval()

    @classmethod
    def from_modules(
        cls,
        transformer: WanTransformer3DModel,
        parts: dict[str, nn.Module],
        head_blocks: int,
        fusion: Fusion = "gated",
        inner_velocity: str = "noise",
        transition_target: str = "difference",
    ) -> TMDStudent:
        """A student around existing modules, shared rather than copied (``tmd.pipelines.TMDPipeline`` keeps
        them as its components): the split is built on a weightless (meta) skeleton, then ``transformer``
        and the ``TMD_PARTS`` modules in ``parts`` are put in its place."""
        with torch.device("meta"):
            skeleton = WanTeacher(WanTransformer3DModel.from_config(transformer.config))
            student = cls(skeleton, head_blocks, fusion, inner_velocity, transition_target)
        student.transformer = transformer
        for name in TMD_PARTS:
            setattr(student, name, parts[name])
        return student

    @property
    def split_index(self) -> int:
        return self.num_blocks - self.head_blocks

    def backbone(self, x_t: Tensor, t: Tensor | float, cond: Tensor) -> WanState:
        """Features ``m`` of the outer state; computed once per outer step and reused by every head step."""
        check_inputs(self.config, x_t, cond)
        t = as_time(t, x_t.shape[0], x_t.device)
        state = embed(self.transformer, x_t.to(self.dtype), t, cond.to(self.dtype))
        hidden, _ = run_blocks(
            self.transformer.blocks[: self.split_index], state.hidden, state, checkpointing=self.activation_checkpointing
        )
        return dataclasses.replace(state, hidden=hidden)

    def gap_embedding(self, gap: Tensor) -> Tensor:
        """Embedding of ``s - r``, exactly zero at ``r = s`` whatever the weights: plain transition matching
        (always r = s) then leaves it untouched, so its flow map is the Euler step of the learnt velocity."""
        project = self.transformer.condition_embedder.timesteps_proj
        both = self.gap_embedder(project(torch.cat([gap, torch.zeros_like(gap)]) * TIMESTEP_SCALE))
        at_gap, at_zero = both.chunk(2)
        return at_gap - at_zero

    def head(self, y_s: Tensor, s: Tensor | float, r: Tensor | float, features: WanState) -> Tensor:
        """``y_hat``, the estimate of ``y = x1 - x``, from the inner state ``y_s`` at inner time ``s``."""
        batch = features.hidden.shape[0]
        if y_s.shape[0] != batch or y_s.ndim != 5 or y_s.shape[1] != self.config.in_channels:
            raise ValueError(f"inner state of shape {tuple(y_s.shape)} does not match the outer latents' layout")
        s = as_time(s, batch, y_s.device)
        r = as_time(r, batch, y_s.device)
        temb = time_embedding(self.transformer, s, like=features.text) + self.gap_embedding(s - r).type_as(features.text)
        z = self.inner_block(embed_tokens(self.transformer, y_s.to(self.dtype)), temb)
        hidden = self.fusion(features.hidden, z)
        hidden, _ = run_blocks(
            self.transformer.blocks[self.split_index :],
            hidden,
            features,
            timestep_proj=block_modulation(self.transformer, temb),
            checkpointing=self.activation_checkpointing,
            offset=self.split_index,
        )
        return project_out(self.transformer, hidden, temb, features.grid).float()
