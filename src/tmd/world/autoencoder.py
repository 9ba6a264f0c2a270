"""Small Conv3d video autoencoder so flow matching runs on few latent tokens (LFM, Dao et al. 2023).

Pixels (B, 3, T, H, W) map to latents (B, C_z, T / temporal_down, H / spatial_down, W / spatial_down).
Conv3d backward on CPU is slow, so the design spends almost no compute at pixel resolution:
- the encoder starts with a lossless space-to-depth to the latent grid and works there;
- the decoder works on the latent grid, upsamples 2x spatially once, and ends with a pixel shuffle
  (depth-to-space), which places sharp anti-aliased edges without full-resolution convolutions;
- most kernels are (1, 3, 3): the space-to-depth already packs ``temporal_down`` frames into one
  latent frame, and only the convolutions next to the latent mix neighbouring latent frames.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from tmd.files import save_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_NORM_GROUPS = 8


def _as_stat(value: float | list[float] | tuple[float, ...], name: str, channels: int) -> float | tuple[float, ...]:
    """Normalise a scalar or per-channel statistic to float / tuple so the config is JSON- and compare-friendly."""
    if isinstance(value, (int, float)):
        return float(value)
    values = tuple(float(v) for v in value)
    if len(values) != channels:
        raise ValueError(f"{name} must be a scalar or have latent_channels={channels} entries, got {len(values)}")
    return values


@dataclass
class AutoencoderConfig:
    """Architecture plus the latent normalisation found after training.

    ``base_channels`` is the width of the half-resolution decoder stage; the latent-grid stages use
    twice that. ``latent_shift``/``latent_scale`` (scalar or one value per latent channel) make encoded
    latents roughly zero-mean, unit-std, which is what a flow-matching prior with N(0, I) noise expects.
    """

    in_channels: int = 3
    latent_channels: int = 8
    base_channels: int = 32
    temporal_down: int = 2
    spatial_down: int = 4
    latent_shift: float | tuple[float, ...] = 0.0
    latent_scale: float | tuple[float, ...] = 1.0

    def __post_init__(self) -> None:
        for name in ("in_channels", "latent_channels", "base_channels", "temporal_down"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.base_channels % _NORM_GROUPS:
            raise ValueError(f"base_channels must be a multiple of {_NORM_GROUPS} (GroupNorm), got {self.base_channels}")
        if not isinstance(self.spatial_down, int) or self.spatial_down < 2 or self.spatial_down % 2:
            raise ValueError(f"spatial_down must be an even int >= 2, got {self.spatial_down!r}")
        self.latent_shift = _as_stat(self.latent_shift, "latent_shift", self.latent_channels)
        self.latent_scale = _as_stat(self.latent_scale, "latent_scale", self.latent_channels)
        scales = self.latent_scale if isinstance(self.latent_scale, tuple) else (self.latent_scale,)
        if not all(math.isfinite(s) and s > 0 for s in scales):
            raise ValueError(f"latent_scale must be finite and > 0, got {self.latent_scale}")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_NORM_GROUPS, channels)


def _conv(cin: int, cout: int, temporal: bool = False) -> nn.Conv3d:
    kernel = (3 if temporal else 1, 3, 3)
    return nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel))


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _norm(channels),
            nn.SiLU(),
            _conv(channels, channels),
            _norm(channels),
            nn.SiLU(),
            _conv(channels, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def _space_to_depth(x: Tensor, f: tuple[int, int, int]) -> Tensor:
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // f[0], f[0], h // f[1], f[1], w // f[2], f[2])
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * f[0] * f[1] * f[2], t // f[0], h // f[1], w // f[2])


def _depth_to_space(x: Tensor, f: tuple[int, int, int]) -> Tensor:
    b, cf, t, h, w = x.shape
    c = cf // (f[0] * f[1] * f[2])
    x = x.reshape(b, c, f[0], f[1], f[2], t, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, t * f[0], h * f[1], w * f[2])


class VideoAutoencoder(nn.Module):
    """Deterministic video autoencoder; ``encode`` returns normalised latents, ``decode`` inverts that."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        c, wide, zc = config.base_channels, 2 * config.base_channels, config.latent_channels
        td, sd = config.temporal_down, config.spatial_down
        self._patch = (td, sd, sd)
        self._shuffle = (td, sd // 2, sd // 2)
        self.encoder = nn.Sequential(
            _conv(config.in_channels * td * sd * sd, wide),
            ResBlock(wide),
            _norm(wide),
            nn.SiLU(),
            _conv(wide, zc, temporal=True),
        )
        self.decoder = nn.Sequential(
            _conv(zc, wide, temporal=True),
            ResBlock(wide),
            ResBlock(wide),
            _norm(wide),
            nn.SiLU(),
            nn.Upsample(scale_factor=(1, 2, 2), mode="nearest"),
            _conv(wide, c),
            nn.SiLU(),
            _conv(c, config.in_channels * td * (sd // 2) ** 2),
        )

        shape = (1, zc, 1, 1, 1)
        self.register_buffer("latent_shift", torch.empty(shape), persistent=False)
        self.register_buffer("latent_scale", torch.empty(shape), persistent=False)
        self.set_latent_stats(config.latent_shift, config.latent_scale)

    def set_latent_stats(self, shift: float | tuple[float, ...], scale: float | tuple[float, ...]) -> None:
        """Store normalisation in the config (so it is saved) and in the buffers (so it is applied)."""
        cfg = self.config
        checked = replace(cfg, latent_shift=shift, latent_scale=scale)  # validates before anything changes
        cfg.latent_shift, cfg.latent_scale = checked.latent_shift, checked.latent_scale
        channels = cfg.latent_channels
        with torch.no_grad():
            self.latent_shift.copy_(torch.as_tensor(cfg.latent_shift).float().expand(channels).reshape(self.latent_shift.shape))
            self.latent_scale.copy_(torch.as_tensor(cfg.latent_scale).float().expand(channels).reshape(self.latent_scale.shape))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        cfg = self.config
        return cfg.latent_channels, frames // cfg.temporal_down, height // cfg.spatial_down, width // cfg.spatial_down

    def _check(self, x: Tensor, what: str, channels: int, multiples: tuple[int, int, int]) -> None:
        expected = f"(B, {channels}, T, H, W) with T % {multiples[0]} == 0 and H % {multiples[1]} == W % {multiples[2]} == 0"
        if x.ndim != 5 or x.shape[1] != channels or any(s % m for s, m in zip(x.shape[2:], multiples)) or 0 in x.shape:
            raise ValueError(f"{what} must have shape {expected}, got {tuple(x.shape)}")

    def encode_raw(self, videos: Tensor) -> Tensor:
        """Unnormalised latents (what the decoder is trained on)."""
        self._check(videos, "videos", self.config.in_channels, self._patch)
        return self.encoder(_space_to_depth(videos, self._patch))

    def decode_raw(self, latents: Tensor) -> Tensor:
        """Reconstruction from unnormalised latents, unclamped (the training target is the raw output)."""
        self._check(latents, "latents", self.config.latent_channels, (1, 1, 1))
        return _depth_to_space(self.decoder(latents), self._shuffle)

    def encode(self, videos: Tensor) -> Tensor:
        return (self.encode_raw(videos) - self.latent_shift) / self.latent_scale

    def decode(self, latents: Tensor) -> Tensor:
        self._check(latents, "latents", self.config.latent_channels, (1, 1, 1))
        return self.decode_raw(latents * self.latent_scale + self.latent_shift).clamp(-1.0, 1.0)

    def forward(self, videos: Tensor) -> Tensor:
        return self.decode(self.encode(videos))

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_safetensors({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> VideoAutoencoder:
        path = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"autoencoder checkpoint is missing {path / name}")
        model = cls(AutoencoderConfig(**json.loads((path / CONFIG_NAME).read_text())))
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME), device=str(map_location)))
        return model.to(map_location).eval()
