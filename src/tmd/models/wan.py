"""Wan teacher (Wan2.1, Wan2.2 TI2V-5B; an A14B expert): a diffusers ``WanTransformer3DModel`` called in tmd's time convention.

The forward pass is re-assembled here from the transformer's own parts (embedders, blocks, output
norm) instead of calling ``transformer.forward``, because the TMD student and the discriminator need
to stop after block k, start again from block k, and read intermediate features. A test holds the
re-assembled pass equal to diffusers' forward.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tmd.files import check_safetensors_folder
from tmd.models.folder import check_wan_folder

TIMESTEP_SCALE = 1000.0
"""diffusers' Wan models take ``timestep = 1000 t``; nothing outside this module uses that scale."""


def time_of_timestep(timestep: Tensor) -> Tensor:
    """tmd's time ``t`` in [0, 1] of a diffusers scheduler's ``timestep`` (what ``WanPipeline`` passes to Wan)."""
    return timestep.float() / TIMESTEP_SCALE


TINY_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 64,
}
"""A random Wan transformer small enough for unit tests (about 60k parameters)."""

WAN_1_3B_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
}
"""Wan2.1 T2V 1.3B's transformer (diffusers ``WanTransformer3DModel`` arguments)."""
WAN_1_3B_LATENT = (16, 21, 60, 104)
"""Latents of an 81 x 480 x 832 video (VAE: 4x temporal, 8x spatial)."""
WAN_TEXT_LEN = 512
"""UMT5 prompt length Wan pads to."""
WAN_14B_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
}
"""Wan2.1 T2V 14B's transformer (diffusers ``WanTransformer3DModel`` arguments); also each expert of Wan2.2 T2V-A14B."""
WAN22_5B_CONFIG: dict[str, Any] = {
    **WAN_1_3B_CONFIG,
    "num_attention_heads": 24,
    "in_channels": 48,
    "out_channels": 48,
    "ffn_dim": 14336,
}
"""Wan2.2 TI2V-5B's transformer: dim 3072 (24 heads x 128), ffn 14336, 30 blocks, 48 latent channels."""
WAN22_5B_LATENT = (48, 31, 44, 80)
"""Latents of a 121 x 704 x 1280 video, TI2V-5B's published size (Wan2.2 VAE: 4x temporal, 16x spatial)."""
WAN22_BOUNDARY = 0.875
"""Wan2.2 T2V-A14B's ``boundary_ratio``: the high-noise expert runs for t >= 0.875."""


@dataclass
class WanState:
    """Everything the blocks need, computed once per (x_t, t, text) and then carried along."""

    hidden: Tensor  # (B, tokens, dim)
    text: Tensor  # projected text embeddings (B, L, dim)
    temb: Tensor  # time embedding (B, dim), used by the output norm
    timestep_proj: Tensor  # per-block modulation (B, 6, dim)
    rotary: Any  # rotary embedding in whatever form this diffusers version uses
    grid: tuple[int, int, int]  # post-patch frames, height, width


def check_video_latents(x: Tensor, config, name: str = "latents") -> None:
    """Shape errors here, with the expected layout, rather than deep inside a Conv3d."""
    channels = config.in_channels
    if x.ndim != 5:
        raise ValueError(f"{name} must have shape (batch, {channels}, frames, height, width), got {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} have {x.shape[1]} channels but the model expects {channels} ({tuple(x.shape)})")
    for size, patch, what in zip(x.shape[2:], config.patch_size, ("frames", "height", "width")):
        if size % patch:
            raise ValueError(
                f"latent {what} = {size} is not divisible by the patch size {patch} "
                f"(patch_size={tuple(config.patch_size)}, latents {tuple(x.shape)})"
            )


def check_text_embeddings(cond: Tensor, config, batch: int, name: str = "text embeddings") -> None:
    if cond.ndim != 3:
        raise ValueError(f"{name} must have shape (batch, tokens, {config.text_dim}), got {tuple(cond.shape)}")
    if cond.shape[-1] != config.text_dim:
        raise ValueError(
            f"{name} have width {cond.shape[-1]} but the model's text_dim is {config.text_dim} "
            f"(was the prompt encoded with a different text encoder?)"
        )
    if cond.shape[0] != batch:
        raise ValueError(f"{name} have batch {cond.shape[0]} but the latents have batch {batch}")


def check_inputs(config, x_t: Tensor, cond: Tensor) -> None:
    check_video_latents(x_t, config)
    check_text_embeddings(cond, config, x_t.shape[0])


def as_time(t: Tensor | float, batch: int, device) -> Tensor:
    """Per-sample float32 times (B,), checked to lie in [0, 1]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"time must be a scalar or of shape ({batch},), got {tuple(t.shape)}")
    if torch.any(t < 0) or torch.any(t > 1):
        raise ValueError(f"time must lie in [0, 1] (t = 1 is noise), got values in [{t.min():.4g}, {t.max():.4g}]")
    return t


def time_embedding(transformer: WanTransformer3DModel, t: Tensor, like: Tensor) -> Tensor:
    """The transformer's time embedding of t in [0, 1], before the per-block projection."""
    embedder = transformer.condition_embedder
    freq = embedder.timesteps_proj(t * TIMESTEP_SCALE)
    weight_dtype = next(embedder.time_embedder.parameters()).dtype
    return embedder.time_embedder(freq.to(weight_dtype)).type_as(like)


def block_modulation(transformer: WanTransformer3DModel, temb: Tensor) -> Tensor:
    embedder = transformer.condition_embedder
    return embedder.time_proj(embedder.act_fn(temb)).unflatten(1, (6, -1))


def embed_tokens(transformer: WanTransformer3DModel, x: Tensor) -> Tensor:
    return transformer.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()


def embed(transformer: WanTransformer3DModel, x_t: Tensor, t: Tensor, cond: Tensor) -> WanState:
    p_t, p_h, p_w = transformer.config.patch_size
    grid = (x_t.shape[2] // p_t, x_t.shape[3] // p_h, x_t.shape[4] // p_w)
    text = transformer.condition_embedder.text_embedder(cond)
    temb = time_embedding(transformer, t, like=text)
    return WanState(
        hidden=embed_tokens(transformer, x_t),
        text=text,
        temb=temb,
        timestep_proj=block_modulation(transformer, temb),
        rotary=transformer.rope(x_t),
        grid=grid,
    )


CHECKPOINT_INPUT_DTYPE = "checkpoint_input_dtype"
"""The attribute ``tmd.train.distributed.shard_model`` sets on each FSDP2 block with bf16 compute: the dtype FSDP2
casts the block's floating-point inputs to. Before torch 2.13, FSDP2 skipped that cast when activation checkpointing
recomputed a block, so the recompute saw float32 where the forward had seen bf16 and torch.utils.checkpoint refused
it (found on an H200 with torch 2.11, benchmarks/RESULTS.md); :func:`run_blocks` therefore casts first."""


def checkpoint_input_dtype(block: nn.Module) -> torch.dtype | None:
    return getattr(block, CHECKPOINT_INPUT_DTYPE, None)


def cast_floating(inputs: Any, dtype: torch.dtype | None) -> Any:
    """``inputs`` with every floating-point tensor (also inside tuples and lists) cast to ``dtype``, as FSDP2's
    ``cast_forward_inputs`` does; complex and integer tensors are left alone; ``dtype=None`` returns them as given."""
    if dtype is None:
        return inputs
    if isinstance(inputs, Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(cast_floating(item, dtype) for item in inputs)
    return inputs


def checkpointed_block(block: nn.Module, *inputs: Any) -> Tensor:
    """``block(*inputs)`` under activation checkpointing, its inputs first cast to the dtype FSDP2 computes it in
    (:data:`CHECKPOINT_INPUT_DTYPE`), so the recompute sees what the forward saw on every torch version."""
    return checkpoint(block, *cast_floating(inputs, checkpoint_input_dtype(block)), use_reentrant=False)


def run_blocks(
    blocks: Sequence[nn.Module],
    hidden: Tensor,
    state: WanState,
    timestep_proj: Tensor | None = None,
    checkpointing: bool = False,
    capture: Sequence[int] = (),
    offset: int = 0,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Run ``blocks`` (global indices start at ``offset``); return the output and the captured features."""
    timestep_proj = state.timestep_proj if timestep_proj is None else timestep_proj
    features: dict[int, Tensor] = {}
    for index, block in enumerate(blocks, start=offset):
        if checkpointing and torch.is_grad_enabled():
            hidden = checkpointed_block(block, hidden, state.text, timestep_proj, state.rotary)
        else:
            hidden = block(hidden, state.text, timestep_proj, state.rotary)
        if index in capture:
            features[index] = hidden
    return hidden, features


def project_out(transformer: WanTransformer3DModel, hidden: Tensor, temb: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Output norm, projection and unpatchify: tokens (B, N, dim) -> video (B, C, F, H, W)."""
    shift, scale = (transformer.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    hidden = (transformer.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    hidden = transformer.proj_out(hidden)
    frames, height, width = grid
    p_t, p_h, p_w = transformer.config.patch_size
    hidden = hidden.reshape(hidden.shape[0], frames, height, width, p_t, p_h, p_w, -1)
    return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def unpatchify_features(hidden: Tensor, grid: tuple[int, int, int], patch: Sequence[int]) -> Tensor:
    """Token features (B, N, dim) -> (B, dim / prod(patch), F, H, W) at the latent's own resolution.

    Each token's channels are split into its patch positions, as the output projection's unpatchify does;
    the TMD paper's discriminator reads teacher features in this layout (A.3, "unpatchified").
    """
    p_t, p_h, p_w = patch
    batch, _, dim = hidden.shape
    if dim % (p_t * p_h * p_w):
        raise ValueError(f"feature width {dim} is not divisible by the patch volume {p_t * p_h * p_w}")
    cells = hidden.reshape(batch, *grid, p_t, p_h, p_w, dim // (p_t * p_h * p_w))
    return cells.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class WanModule(nn.Module):
    """What every model built around a Wan transformer (teacher, TMD student) exposes."""

    transformer: WanTransformer3DModel

    @property
    def config(self):
        return self.transformer.config

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.patch_embedding.weight.dtype


class WanTeacher(WanModule):
    """A Wan transformer answering ``velocity(x_t, t, text_embeds)`` with t in [0, 1], t = 1 noise."""

    fsdp_entry_points = ("velocity_and_features",)
    """Methods that use the model's own weights outside ``forward`` (see ``tmd.train.distributed``)."""

    def __init__(self, transformer: WanTransformer3DModel):
        super().__init__()
        if getattr(transformer.config, "image_dim", None) is not None:
            raise ValueError("this is an image-to-video Wan model (image_dim is set); tmd distils text-to-video models")
        self.transformer = transformer
        self.activation_checkpointing = False

    def velocity_and_features(
        self, x_t: Tensor, t: Tensor | float, cond: Tensor, feature_blocks: Sequence[int] = ()
    ) -> tuple[Tensor, list[Tensor]]:
        """Velocity (float32) and the hidden states after the given blocks, unpatchified to
        (B, dim / prod(patch), F, H, W) (:func:`unpatchify_features`)."""
        check_inputs(self.config, x_t, cond)
        for index in feature_blocks:
            if not 0 <= index < self.num_blocks:
                raise ValueError(f"feature block {index} out of range: the model has {self.num_blocks} blocks")
        t = as_time(t, x_t.shape[0], x_t.device)
        state = embed(self.transformer, x_t.to(self.dtype), t, cond.to(self.dtype))
        hidden, captured = run_blocks(
            self.transformer.blocks, state.hidden, state, checkpointing=self.activation_checkpointing, capture=feature_blocks
        )
        velocity = project_out(self.transformer, hidden, state.temb, state.grid).float()
        patch = self.transformer.config.patch_size
        return velocity, [unpatchify_features(captured[i], state.grid, patch) for i in feature_blocks]

    def velocity(self, x_t: Tensor, t: Tensor | float, cond: Tensor) -> Tensor:
        return self.velocity_and_features(x_t, t, cond)[0]

    forward = velocity


def _find_transformer_folder(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"model path {path} is a file; expected a diffusers folder (or a .json/.yaml config)")
    for candidate in (path / "transformer", path):
        config_file = candidate / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            name = config.get("_class_name", "WanTransformer3DModel")
            if name != "WanTransformer3DModel":
                raise ValueError(f"{config_file} describes a {name}, not a WanTransformer3DModel")
            return candidate
    raise FileNotFoundError(
        f"no model config under {path}: expected {path / 'transformer' / 'config.json'} (a diffusers pipeline root) "
        f"or {path / 'config.json'} (a transformer folder)"
    )


def _load_transformer(folder: Path, dtype: torch.dtype) -> WanTransformer3DModel:
    folder = _find_transformer_folder(folder)
    check_safetensors_folder(folder)
    return WanTransformer3DModel.from_pretrained(folder, use_safetensors=True, local_files_only=True, torch_dtype=dtype)


def _read_config_file(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of WanTransformer3DModel arguments")
    return data


def build_transformer(config: dict[str, Any], seed: int = 0) -> WanTransformer3DModel:
    """A random-initialised transformer from a config dict; unknown keys are an error, not a silent drop."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    allowed = set(WanTransformer3DModel._get_init_keys(WanTransformer3DModel))
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"unknown WanTransformer3DModel config keys {unknown}; allowed: {sorted(allowed - {'self'})}")
    heads, head_dim = config.get("num_attention_heads", 40), config.get("attention_head_dim", 128)
    if head_dim < 6 or head_dim % 2:
        raise ValueError(f"attention_head_dim must be even and >= 6 for Wan's 3D rotary embedding, got {head_dim}")
    if heads < 1:
        raise ValueError(f"num_attention_heads must be >= 1, got {heads}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**config)


def load_teacher(
    path_or_config: str | Path | dict[str, Any],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    experts: int | None = 1,
    family: str | None = None,
    purpose: str = "",
    guidance_2: float | None = None,
    offload: bool = False,
):
    """Load a Wan teacher (Wan2.1, Wan2.2 TI2V-5B, or with ``experts=None`` also a Wan2.2 A14B).

    ``path_or_config`` is a diffusers pipeline root (with ``transformer/``), a transformer folder, a
    ``.json``/``.yaml`` file of transformer arguments, a dict of them, or ``"tiny"`` for the test model.
    Configs build a random-initialised model (seeded). Folders pass :func:`tmd.models.folder.check_wan_folder`
    first (``experts``, ``family`` and ``purpose`` go to it): a two-expert folder becomes a
    :class:`tmd.models.experts.DualExpertTeacher` (``guidance_2``: the low-noise expert's CFG scale; ``offload``:
    only the expert in use on ``device``).
    """
    if isinstance(path_or_config, dict):
        transformer = build_transformer(path_or_config, seed)
    elif str(path_or_config) == "tiny":
        transformer = build_transformer(TINY_CONFIG, seed)
    else:
        path = Path(path_or_config)
        if path.is_file() and path.suffix in (".json", ".yaml", ".yml"):
            transformer = build_transformer(_read_config_file(path), seed)
        else:
            if not path.is_dir():
                _find_transformer_folder(path)  # its one-line errors for a missing path or a file
            found = check_wan_folder(path, experts=experts, family=family, purpose=purpose)
            if len(found.transformers) == 2:
                from tmd.models.experts import DualExpertTeacher

                high, low = (
                    WanTeacher(cast_transformer(_load_transformer(folder, dtype), dtype).to("cpu" if offload else device).eval())
                    for folder in found.transformers
                )
                return DualExpertTeacher(high, low, found.boundary_ratio, guidance_2, offload, device)
            transformer = _load_transformer(path, dtype)
    return WanTeacher(cast_transformer(transformer, dtype).to(device).eval())


def cast_transformer(transformer: WanTransformer3DModel, dtype: torch.dtype) -> WanTransformer3DModel:
    """Cast to ``dtype`` but keep the modules Wan needs in float32 (norms, time embedder, rope)."""
    if transformer.patch_embedding.weight.dtype == dtype:
        return transformer
    keep = set(transformer._keep_in_fp32_modules or ())
    for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
        target = torch.float32 if keep & set(name.split(".")) else dtype
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(target)
    return transformer


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
