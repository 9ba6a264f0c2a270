"""Training loop for the video autoencoder that defines the latent space flow matching runs in."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from tmd.world.autoencoder import AutoencoderConfig, VideoAutoencoder

VideoSampler = Callable[[int, torch.Generator], Tensor]


def train_autoencoder(
    cfg: AutoencoderConfig,
    video_sampler: VideoSampler,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    latent_noise: float = 0.1,
    l1_weight: float = 1.0,
    stat_batches: int = 4,
) -> VideoAutoencoder:
    """Train on fresh batches from ``video_sampler(batch_size, rng)``, then fit latent normalisation.

    The latent is perturbed with Gaussian noise of ``latent_noise`` x its per-channel std so the decoder
    tolerates the imperfect latents a diffusion model generates; being relative, the encoder cannot
    escape it by growing the latent. L1 on top of MSE keeps object edges sharp (MSE alone blurs them,
    as most pixels are background). Everything random derives from ``seed``, so runs are repeatable.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("stat_batches", stat_batches)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if latent_noise < 0 or l1_weight < 0:
        raise ValueError(f"latent_noise and l1_weight must be >= 0, got {latent_noise}, {l1_weight}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VideoAutoencoder(cfg)
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, min(100, steps // 10))
    # Linear warm-up, then cosine decay to 10% of lr: the late low-lr phase is what sharpens edges.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )

    model.train()
    bar = tqdm(range(steps), desc="autoencoder", disable=not progress)
    for _ in bar:
        videos = video_sampler(batch_size, rng)
        latents = model.encode_raw(videos)
        if latent_noise > 0:
            std = latents.detach().std(dim=(0, 2, 3, 4), keepdim=True)
            latents = latents + latent_noise * std * torch.randn(latents.shape, generator=rng)
        recon = model.decode_raw(latents)
        loss = F.mse_loss(recon, videos) + l1_weight * F.l1_loss(recon, videos)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        latents = torch.cat([model.encode_raw(video_sampler(batch_size, rng)) for _ in range(stat_batches)])
    dims = (0, 2, 3, 4)
    model.set_latent_stats(tuple(latents.mean(dims).tolist()), tuple(latents.std(dims).clamp_min(1e-6).tolist()))
    return model
