import json
import re

import pytest
import torch

from tmd.world.autoencoder import CONFIG_NAME, WEIGHTS_NAME, AutoencoderConfig, VideoAutoencoder
from tmd.world.autoencoder_training import train_autoencoder

TINY = dict(base_channels=8, latent_channels=4)


def blob_videos(n: int, generator: torch.Generator, frames: int = 4, size: int = 16) -> torch.Tensor:
    """Coloured Gaussian blobs moving linearly on black: a stand-in for the world that needs no renderer."""
    colour = torch.rand(n, 3, generator=generator) * 2 - 1
    start = torch.rand(n, 2, generator=generator) * size
    velocity = torch.randn(n, 2, generator=generator)
    t = torch.arange(frames, dtype=torch.float32)
    centre = start[:, None] + velocity[:, None] * t[None, :, None]  # (n, F, 2)
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    d2 = (grid[None, None, None, :] - centre[..., 0, None, None]) ** 2 + (
        grid[None, None, :, None] - centre[..., 1, None, None]
    ) ** 2
    alpha = torch.exp(-d2 / 8.0)[:, None]  # (n, 1, F, H, W)
    return -1 + alpha * (colour[:, :, None, None, None] + 1)


def test_shapes_and_clamped_decode():
    model = VideoAutoencoder(AutoencoderConfig()).eval()
    videos = blob_videos(2, torch.Generator().manual_seed(0), frames=8, size=32)
    with torch.no_grad():
        latents = model.encode(videos)
        recon = model.decode(latents * 100)
    assert latents.shape == (2, 8, 4, 8, 8) == (2, *model.latent_shape(8, 32, 32))
    assert recon.shape == videos.shape
    assert recon.min() >= -1 and recon.max() <= 1


def test_latent_normalisation_is_applied_and_inverted():
    model = VideoAutoencoder(AutoencoderConfig(**TINY)).eval()
    videos = blob_videos(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = model.encode_raw(videos)
        model.set_latent_stats((0.5, -1.0, 0.0, 2.0), 3.0)
        z = model.encode(videos)
        torch.testing.assert_close(z, (raw - torch.tensor([0.5, -1.0, 0.0, 2.0]).view(1, 4, 1, 1, 1)) / 3.0)
        torch.testing.assert_close(model.decode(z), model.decode_raw(raw).clamp(-1, 1))
    assert model.config.latent_scale == 3.0 and model.config.latent_shift == (0.5, -1.0, 0.0, 2.0)


def test_save_load_round_trip(tmp_path):
    model = VideoAutoencoder(AutoencoderConfig(**TINY)).eval()
    model.set_latent_stats((0.1, 0.2, 0.3, 0.4), (1.0, 2.0, 3.0, 4.0))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["latent_scale"] == [1.0, 2.0, 3.0, 4.0]
    loaded = VideoAutoencoder.from_pretrained(tmp_path)
    assert loaded.config == model.config
    videos = blob_videos(3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.encode(videos), model.encode(videos))
        assert torch.equal(loaded(videos), model(videos))


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_from_pretrained_names_missing_file(tmp_path, missing):
    VideoAutoencoder(AutoencoderConfig(**TINY)).save_pretrained(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        VideoAutoencoder.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "shape",
    [(3, 8, 32, 32), (1, 4, 8, 32, 32), (1, 3, 7, 32, 32), (1, 3, 8, 30, 32), (1, 3, 8, 32, 30), (0, 3, 8, 32, 32)],
)
def test_encode_rejects_bad_video_shapes(shape):
    model = VideoAutoencoder(AutoencoderConfig(**TINY))
    with pytest.raises(ValueError, match=r"videos must have shape \(B, 3, T, H, W\).*got " + re.escape(str(shape))):
        model.encode(torch.zeros(shape))


def test_decode_rejects_wrong_latent_channels():
    model = VideoAutoencoder(AutoencoderConfig(**TINY))
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 4, .*got \(1, 8, 4, 8, 8\)"):
        model.decode(torch.zeros(1, 8, 4, 8, 8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(base_channels=12), "multiple of 8"),
        (dict(latent_channels=0), "latent_channels"),
        (dict(spatial_down=3), "spatial_down"),
        (dict(temporal_down=0), "temporal_down"),
        (dict(latent_scale=0.0), "latent_scale"),
        (dict(latent_shift=(0.0, 1.0)), "latent_shift .*=8 entries, got 2"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderConfig(**kwargs)


def _recon_mse(model: VideoAutoencoder, videos: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.mean((model.decode_raw(model.encode_raw(videos)) - videos) ** 2).item()


def test_short_training_reduces_loss_and_normalises_latents():
    eval_videos = blob_videos(32, torch.Generator().manual_seed(123))
    torch.manual_seed(0)
    untrained = VideoAutoencoder(AutoencoderConfig(**TINY))
    cfg = AutoencoderConfig(**TINY)
    model = train_autoencoder(cfg, blob_videos, steps=30, batch_size=8, lr=3e-3, seed=0, progress=False)
    assert model.config is cfg and isinstance(cfg.latent_scale, tuple)
    assert _recon_mse(model, eval_videos) < 0.5 * _recon_mse(untrained, eval_videos)
    with torch.no_grad():
        z = model.encode(eval_videos)
    per_channel_mean, per_channel_std = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
    assert per_channel_mean.abs().max() < 0.5 and ((per_channel_std > 0.5) & (per_channel_std < 2)).all()


def test_training_is_deterministic_in_seed():
    def run(seed: int) -> VideoAutoencoder:
        return train_autoencoder(
            AutoencoderConfig(**TINY), blob_videos, steps=3, batch_size=4, lr=1e-3, seed=seed, progress=False
        )

    a, b, c = run(0), run(0), run(1)
    assert a.config == b.config
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.encoder[0].weight, c.encoder[0].weight)


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(batch_size=0), dict(lr=0.0)])
def test_train_rejects_bad_arguments(kwargs):
    args = dict(steps=1, batch_size=2, lr=1e-3, seed=0) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        train_autoencoder(AutoencoderConfig(**TINY), blob_videos, progress=False, **args)
