"""The Wan VAE: loading, latent normalisation and layout, decoding; shared by data preparation,
generation and the diffusers pipelines."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from tmd.files import check_safetensors_folder
from tmd.models.folder import check_wan_folder


def load_vae(pipeline: str | Path, device: str | torch.device = "cpu"):
    """``AutoencoderKLWan`` from ``pipeline/vae``, in float32 (Wan's VAE is not run in bf16)."""
    from diffusers import AutoencoderKLWan

    check_wan_folder(pipeline, experts=None)
    folder = Path(pipeline) / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no vae/config.json under {pipeline}: expected a diffusers Wan pipeline root")
    check_safetensors_folder(folder)
    vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True, use_safetensors=True)
    return vae.to(device).eval()


def _latent_stats(vae, like: Tensor) -> tuple[Tensor, Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


def normalize_latents(vae, z: Tensor) -> Tensor:
    """VAE latents -> what the transformer sees: ``(z - mean) / std`` per channel, as WanPipeline inverts."""
    mean, std = _latent_stats(vae, z)
    return (z - mean) / std


def denormalize_latents(vae, latents: Tensor) -> Tensor:
    """The inverse, exactly ``latents / (1 / std) + mean`` as in diffusers' ``WanPipeline`` before decoding."""
    mean, std = _latent_stats(vae, latents)
    return latents / (1.0 / std) + mean


def latent_shape(vae, transformer_config, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, F', H', W') of the latents of a ``frames x height x width`` video, with the sizes checked."""
    temporal, spatial = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    if frames < 1 or (frames - 1) % temporal:
        raise ValueError(f"frames must be {temporal} k + 1 for the Wan VAE (e.g. 81), got {frames}")
    _, patch_h, patch_w = transformer_config.patch_size
    for name, size, patch in (("height", height, patch_h), ("width", width, patch_w)):
        if size < 1 or size % (spatial * patch):
            raise ValueError(f"{name} must be a positive multiple of {spatial * patch} (VAE x patch size), got {size}")
    if vae.config.z_dim != transformer_config.in_channels:
        raise ValueError(
            f"the VAE has {vae.config.z_dim} latent channels but the transformer expects {transformer_config.in_channels}"
        )
    return (vae.config.z_dim, (frames - 1) // temporal + 1, height // spatial, width // spatial)


@torch.no_grad()
def decode_video(vae, latents: Tensor) -> Tensor:
    """Normalised latents (B, C, F', H', W') -> uint8 frames (B, F, H, W, 3)."""
    z = denormalize_latents(vae, latents.to(next(vae.parameters()).device, torch.float32))
    video = vae.decode(z).sample  # (B, 3, F, H, W) in [-1, 1]
    video = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu()
