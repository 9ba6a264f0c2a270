"""Build the synthetic world's shipped assets: autoencoder, tiny text encoder, and the Wan teacher.

The teacher is flow matching (LFM) in the autoencoder's latent space, trained with the same
``Trainer`` and ``flow_matching`` method as everything else, then exported as the EMA weights in
diffusers format so it loads like any Wan2.1 transformer (``load_teacher(assets/teacher)``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tmd.config import RunConfig, save_config, to_dict
from tmd.files import share_like_other_files
from tmd.methods.flow_matching import FlowMatching
from tmd.models.wan import WanTeacher, build_transformer
from tmd.train.loop import Trainer
from tmd.world.autoencoder import AutoencoderConfig, VideoAutoencoder
from tmd.world.autoencoder_training import train_autoencoder
from tmd.world.data import (
    AUTOENCODER_DIR,
    METADATA_FILE,
    TEACHER_DIR,
    WorldAssets,
    assets_dir,
    world_data_source,
)
from tmd.world.spec import WorldConfig, random_prompts, sample_videos, world_vocabulary
from tmd.world.text import build_tiny_text_encoder

Stage = Literal["autoencoder", "decoder", "text", "teacher", "all"]


@dataclass
class TeacherModelConfig:
    """The Wan transformer's size; channels and text width follow the autoencoder and text encoder.

    64 latent tokens (8x4x8x8 latents, patch 1x2x2) at width 128 train at ~0.4-0.5 s per batch-32
    step on 2 idle CPU cores (docs/design.md, section 7); 6 blocks buy more steps in a fixed CPU budget.
    """

    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    ffn_dim: int = 512
    freq_dim: int = 64

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_attention_heads", "ffn_dim", "freq_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_head_dim < 6 or self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even and >= 6, got {self.attention_head_dim}")


@dataclass
class AutoencoderStageConfig:
    base_channels: int = 32
    latent_channels: int = 8
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    decoder_steps: int = 0
    """Extra decoder-only steps after training: they sharpen reconstructions without moving the
    encoder, so latents (and a teacher trained on them) stay valid; ``--stage decoder`` runs them alone."""
    decoder_lr: float = 5e-4
    decoder_latent_noise: float = 0.05

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or not self.decoder_lr > 0:
            raise ValueError(
                f"need steps >= 1, batch_size >= 1, lr > 0, decoder_lr > 0; "
                f"got {self.steps}, {self.batch_size}, {self.lr}, {self.decoder_lr}"
            )
        if self.decoder_steps < 0 or self.decoder_latent_noise < 0:
            raise ValueError(
                f"decoder_steps and decoder_latent_noise must be >= 0, got {self.decoder_steps}, {self.decoder_latent_noise}"
            )


@dataclass
class TextStageConfig:
    """Prompts are 5 words + ``</s>``, so 8 positions hold every prompt."""

    dim: int = 64
    layers: int = 2
    heads: int = 2
    ff: int = 128
    max_length: int = 8
    seed: int = 0


@dataclass
class SamplingConfig:
    """The world's default teacher sampling, chosen by ``tmd evaluate`` on the benchmark."""

    guidance: float = 3.5
    shift: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.guidance <= 100 or self.shift <= 0:
            raise ValueError(f"need guidance in [0, 100] and shift > 0, got {self.guidance}, {self.shift}")


@dataclass
class WorldTeacherConfig(RunConfig):
    """A flow-matching ``RunConfig`` plus what the world's assets are built from."""

    model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    autoencoder: AutoencoderStageConfig = field(default_factory=AutoencoderStageConfig)
    text: TextStageConfig = field(default_factory=TextStageConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method_name != "flow_matching" or self.data_kind != "world":
            raise ValueError(
                f"a world teacher run needs method_name: flow_matching and data_kind: world, "
                f"got {self.method_name!r} and {self.data_kind!r}"
            )


def transformer_config(cfg: WorldTeacherConfig, latent_channels: int, text_dim: int) -> dict[str, Any]:
    m = cfg.model
    return {
        "patch_size": [1, 2, 2],
        "num_attention_heads": m.num_attention_heads,
        "attention_head_dim": m.attention_head_dim,
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "text_dim": text_dim,
        "freq_dim": m.freq_dim,
        "ffn_dim": m.ffn_dim,
        "num_layers": m.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 32,
    }


def _world_videos(n: int, rng: torch.Generator) -> torch.Tensor:
    return sample_videos(random_prompts(n, rng), WorldConfig(), rng).videos


def build_autoencoder(cfg: WorldTeacherConfig, out: Path, progress: bool = True) -> None:
    a = cfg.autoencoder
    model = train_autoencoder(
        AutoencoderConfig(base_channels=a.base_channels, latent_channels=a.latent_channels),
        _world_videos,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        progress=progress,
    )
    model.save_pretrained(out / AUTOENCODER_DIR)
    if a.decoder_steps:
        finetune_decoder(cfg, out, progress)


def finetune_decoder(cfg: WorldTeacherConfig, out: Path, progress: bool = True) -> None:
    """Decoder-only training of the saved autoencoder (encoder and latent statistics frozen)."""
    from torch.nn import functional as F
    from tqdm.auto import tqdm

    a = cfg.autoencoder
    model = VideoAutoencoder.from_pretrained(out / AUTOENCODER_DIR)
    model.encoder.requires_grad_(False)
    model.decoder.train()
    rng = torch.Generator().manual_seed(a.seed + 1)
    optimizer = torch.optim.AdamW(model.decoder.parameters(), lr=a.decoder_lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, a.decoder_steps), eta_min=0.1 * a.decoder_lr)
    bar = tqdm(range(a.decoder_steps), desc="decoder", disable=not progress)
    for _ in bar:
        videos = _world_videos(a.batch_size, rng)
        with torch.no_grad():
            latents = model.encode(videos)
        latents = latents + a.decoder_latent_noise * torch.randn(latents.shape, generator=rng)
        recon = model.decode_raw(latents * model.latent_scale + model.latent_shift)
        loss = F.mse_loss(recon, videos) + F.l1_loss(recon, videos)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval().save_pretrained(out / AUTOENCODER_DIR)


def build_text_encoder(cfg: WorldTeacherConfig, out: Path) -> None:
    t = cfg.text
    encoder = build_tiny_text_encoder(
        world_vocabulary(), dim=t.dim, layers=t.layers, heads=t.heads, ff=t.ff, max_length=t.max_length, seed=t.seed
    )
    encoder.save_pretrained(out)


def train_teacher(cfg: WorldTeacherConfig, out: Path, resume: bool, command: str) -> dict[str, float]:
    """Train with the shared Trainer in ``train.out_dir``, then export the EMA transformer to ``out/teacher``."""
    assets = WorldAssets(out, teacher=False)
    config = transformer_config(cfg, assets.autoencoder.config.latent_channels, assets.text_encoder.dim)
    teacher = WanTeacher(build_transformer(config, seed=cfg.train.seed))
    method = FlowMatching(cfg.method, teacher)
    data = world_data_source(assets.autoencoder, assets.text_encoder, cfg.train.batch_size, cfg.train.seed)
    result = Trainer(method, data, cfg, resume=resume).train()

    teacher.load_state_dict(result.ema["model"])
    target = out / TEACHER_DIR
    if target.exists():
        shutil.rmtree(target)
    teacher.transformer.save_pretrained(target, safe_serialization=True)
    share_like_other_files(target)
    save_config(cfg, target / "training_config.yaml")
    write_metadata(cfg, out, command)
    return result.metrics


def write_metadata(cfg: WorldTeacherConfig, out: Path, command: str) -> None:
    """``world.json``: the defaults samplers read (CFG scale, shift) and how the assets were made."""
    metadata = {
        "guidance": cfg.sampling.guidance,
        "shift": cfg.sampling.shift,
        "command": command,
        "torch": torch.__version__,
        "config": to_dict(cfg),
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def run(cfg: WorldTeacherConfig, stage: Stage, resume: bool, command: str) -> None:
    """``all`` builds the autoencoder and text encoder only where missing, then trains the teacher;
    a named stage (re)builds just that part."""
    out = assets_dir(cfg.data.assets)
    out.mkdir(parents=True, exist_ok=True)
    if stage == "autoencoder" or (stage == "all" and not (out / AUTOENCODER_DIR).exists()):
        build_autoencoder(cfg, out, cfg.train.progress)
        print(f"autoencoder written to {out / AUTOENCODER_DIR}")
    if stage == "decoder":
        finetune_decoder(cfg, out, cfg.train.progress)
        print(f"autoencoder decoder fine-tuned in {out / AUTOENCODER_DIR}")
    if stage == "text" or (stage == "all" and not (out / "text_encoder").exists()):
        build_text_encoder(cfg, out)
        print(f"text encoder written to {out}")
    if stage in ("teacher", "all"):
        metrics = train_teacher(cfg, out, resume, command)
        loss = f" (final loss {metrics['loss/model']:.4f})" if "loss/model" in metrics else ""
        print(f"teacher written to {out / TEACHER_DIR}{loss}")
