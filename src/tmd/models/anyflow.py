"""AnyFlow's flow-map student: diffusers' ``AnyFlowTransformer3DModel`` built from a Wan2.1 teacher.

The student is the teacher with a second time input (AnyFlow, arXiv 2605.13724; NVlabs/AnyFlow): its time
embedding is ``(1 - g) TimeEmb(1000 t) + g DeltaEmb(1000 r)`` with a fixed gate ``g`` (0.25), and it predicts
the mean velocity ``u(x_t, t, r)`` of the flow map ``x_r = x_t - (t - r) u``. Every other weight has the Wan
name and shape, so the teacher's state dict loads as it is; ``DeltaEmb`` starts as a copy of the time
embedder (the official code's initialisation), which makes the student at ``r = t`` the teacher exactly
(``deltatime_type = "r"``). Being diffusers' own class, the trained student is what ``AnyFlowPipeline`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AnyFlowTransformer3DModel
from torch import Tensor

from tmd.files import check_safetensors_folder
from tmd.models.wan import (
    TIMESTEP_SCALE,
    WanModule,
    WanTeacher,
    as_time,
    cast_transformer,
    check_inputs,
    checkpointed_block,
)

DELTATIME_TYPES = ("r", "t-r")
WAN_ONLY_KEYS = ("qk_norm", "added_kv_proj_dim", "pos_embed_seq_len")
"""WanTransformer3DModel arguments AnyFlowTransformer3DModel does not take (it always normalises q and k across heads)."""


def anyflow_config(teacher_config: Any, gate_value: float, deltatime_type: str) -> dict[str, Any]:
    """The ``AnyFlowTransformer3DModel`` arguments of a student of a teacher with ``teacher_config``."""
    if deltatime_type not in DELTATIME_TYPES:
        raise ValueError(f"deltatime_type must be one of {list(DELTATIME_TYPES)}, got {deltatime_type!r}")
    if not 0 <= gate_value <= 1:
        raise ValueError(f"gate_value must lie in [0, 1], got {gate_value}")
    config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    if config.get("qk_norm") != "rms_norm_across_heads" or config.get("added_kv_proj_dim") is not None:
        raise ValueError(
            "AnyFlowTransformer3DModel has Wan2.1 T2V's attention (qk_norm=rms_norm_across_heads, no added kv); "
            f"this teacher has qk_norm={config.get('qk_norm')!r}, added_kv_proj_dim={config.get('added_kv_proj_dim')!r}"
        )
    config = {k: v for k, v in config.items() if k not in WAN_ONLY_KEYS}
    return {**config, "gate_value": gate_value, "deltatime_type": deltatime_type}


class AnyFlowStudent(WanModule):
    """``mean_velocity(x_t, t, r, text_embeds)`` in tmd's convention (t = 1 noise, times in [0, 1], latents
    (B, C, F, H, W)); ``velocity`` is the flow map's instantaneous velocity, ``r = t``."""

    fsdp_entry_points = ("mean_velocity", "velocity")
    """Methods that use the model's own weights outside ``forward`` (see ``tmd.train.distributed``)."""

    def __init__(self, transformer: AnyFlowTransformer3DModel):
        super().__init__()
        self.transformer = transformer

    @classmethod
    def from_teacher(cls, teacher: WanTeacher, gate_value: float = 0.25, deltatime_type: str = "r") -> AnyFlowStudent:
        source = teacher.transformer
        with torch.random.fork_rng(devices=[]):  # every weight is overwritten below; keep the global stream untouched
            transformer = AnyFlowTransformer3DModel(**anyflow_config(source.config, gate_value, deltatime_type))
        missing = transformer.load_state_dict(source.state_dict(), strict=False).missing_keys
        if any(not key.startswith("condition_embedder.delta_embedder.") for key in missing):
            raise ValueError(f"the teacher lacks AnyFlow transformer weights {missing[:5]}")
        embedder = transformer.condition_embedder
        embedder.delta_embedder.load_state_dict(embedder.time_embedder.state_dict())
        ref = source.patch_embedding.weight
        student = cls(cast_transformer(transformer.to(ref.device), ref.dtype))
        student.activation_checkpointing = getattr(teacher, "activation_checkpointing", False)
        return student

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> AnyFlowStudent:
        """The student in an ``AnyFlowPipeline`` root or a student folder (both hold ``transformer/``) or a
        transformer folder itself."""
        path = Path(path)
        folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no AnyFlow transformer under {path}: expected {path / 'transformer' / 'config.json'}")
        check_safetensors_folder(folder)
        transformer = AnyFlowTransformer3DModel.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
        return cls(transformer.to(device).eval())

    @property
    def activation_checkpointing(self) -> bool:
        return self.transformer.gradient_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.transformer.enable_gradient_checkpointing(checkpointed_block)
        else:
            self.transformer.disable_gradient_checkpointing()

    def mean_velocity(self, x_t: Tensor, t: Tensor | float, r: Tensor | float, cond: Tensor) -> Tensor:
        """The mean velocity over [r, t] (float32): diffusers' forward with per-frame timesteps ``1000 t``, ``1000 r``."""
        check_inputs(self.config, x_t, cond)
        batch, frames = x_t.shape[0], x_t.shape[2]
        t = as_time(t, batch, x_t.device)
        r = as_time(r, batch, x_t.device)
        out = self.transformer(
            hidden_states=x_t.to(self.dtype).transpose(1, 2),
            timestep=(t * TIMESTEP_SCALE)[:, None].expand(batch, frames),
            r_timestep=(r * TIMESTEP_SCALE)[:, None].expand(batch, frames),
            encoder_hidden_states=cond.to(self.dtype),
            return_dict=False,
        )[0]
        return out.transpose(1, 2).float()

    def velocity(self, x_t: Tensor, t: Tensor | float, cond: Tensor) -> Tensor:
        return self.mean_velocity(x_t, t, t, cond)

    forward = mean_velocity
