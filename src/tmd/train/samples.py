"""Sample videos during training: the trainer's ``sample_fn`` for ``train.sample_every``, on any data kind.

Before the first step, every ``sample_every`` steps and after the last, the method's exported generator with
its EMA weights samples the fixed ``train.sample_prompts`` from fixed noise (``train.sample_seed``) at the
run's own step counts (``Method.run_steps``, sampled by ``Method.sampler``: TMD at its M x N, DMD2-v at its
steps), decodes through the data's decoder (the world's autoencoder, or the Wan VAE of the teacher folder)
and writes ``RUN/samples/step_NNNNNNN/<prompt-slug>.mp4`` and ``grid.gif``; TensorBoard and W&B get the
videos when they are on.

It draws no training randomness: its noise comes from a generator of its own and the global RNG states are
restored after it, so a run's weights and losses do not depend on it (tested). The EMA weights are copied
into the trained module for the samples and the training weights copied back, bit for bit: under FSDP2
(``torchrun``) the module is sharded, every rank takes part in the forward and holds its shard's training
weights on the CPU meanwhile, and only rank 0 decodes and writes. The prompts are embedded once, when the
hook is built, and the teacher folder's text encoder is freed at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from tmd.config import ConfigError, RunConfig
from tmd.data.prepare import PreparedDataset
from tmd.data.source import DataSource
from tmd.eval.report import gif_grid
from tmd.eval.samplers import run_steps, sampler
from tmd.files import WAN_FPS, slug, write_mp4
from tmd.models.text import TextEncoder
from tmd.models.vae import decode_video, load_vae
from tmd.train import checkpoint as ckpt
from tmd.train.distributed import DistContext
from tmd.train.hooks import curve_prompts
from tmd.train.logging import MetricLogger
from tmd.world.data import WorldAssets

SAMPLES_DIR = "samples"
GRID_FILE = "grid.gif"
WORLD_PROMPTS = 4
"""Sample prompts on the world when ``train.sample_prompts`` is not set: spread over its 72."""
WORLD_SCALE, WORLD_FPS = 4, 8
"""World videos are 32 x 32: enlarged nearest-neighbour for viewing, as ``tmd generate`` writes them."""
GRID_HEIGHT = 128
"""The grid GIF shows each video at most this tall: a Wan video is 480 rows, the grid one of them per prompt."""
WAN_GUIDANCE = WAN_SHIFT = 5.0
"""CFG scale and time shift for a method that samples like the teacher (LinVideo) when its config names none."""


@dataclass
class SampleInputs:
    """What sampling needs from the data kind, on the CPU until the hook moves it."""

    cond: Tensor
    """(P, L, D) embeddings of the prompts."""
    neg_cond: Tensor
    shape: tuple[int, ...]
    """(C, F', H', W') of one latent video."""
    decode: Callable[[Tensor], Tensor] | None
    """Latents (B, ...) -> uint8 frames (B, F, H, W, 3) on the CPU; None on ranks that do not write."""
    guidance: float
    shift: float
    fps: int


def frames_of(videos: Tensor, scale: int = 1) -> Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> uint8 (B, F, scale H, scale W, 3)."""
    frames = ((videos.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    return frames.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def world_inputs(assets: WorldAssets, prompts: list[str]) -> SampleInputs:
    """The world's own text encoder (any prompt made of its words) and autoencoder."""
    try:
        cond = assets.text_encoder.encode(prompts).cpu()
    except ValueError as e:
        raise ConfigError(f"train.sample_prompts: {e}") from None
    neg_cond = assets.embeddings.negative.cpu().expand_as(cond).contiguous()
    return SampleInputs(
        cond,
        neg_cond,
        assets.latent_shape(),
        lambda latents: frames_of(assets.decode(latents).cpu(), WORLD_SCALE),
        assets.guidance,
        assets.shift,
        WORLD_FPS,
    )


def prepared_inputs(cfg: RunConfig, data: PreparedDataset, prompts: list[str], device: torch.device, main: bool) -> SampleInputs:
    """The teacher folder's text encoder (freed once the prompts are embedded), the data folder's negative
    embedding and latent shape, and the teacher folder's VAE (loaded on the writing rank only)."""
    folder = Path(cfg.data.teacher or data.index["model"])
    text = TextEncoder.from_pretrained(folder, device=device)
    try:
        cond = text.encode(prompts, max_length=data.length).cpu()
    except ValueError as e:
        raise ConfigError(f"train.sample_prompts: {e} (the tokenizer of {folder})") from None
    del text
    if device.type == "cuda":
        torch.cuda.empty_cache()
    vae = load_vae(folder, device) if main else None

    def decode(latents: Tensor) -> Tensor:
        return torch.cat([decode_video(vae, latents[i : i + 1]) for i in range(len(latents))])

    return SampleInputs(
        cond,
        data.negative.expand_as(cond).contiguous(),
        tuple(data.index["latent_shape"]),
        decode if main else None,
        getattr(cfg.method, "guidance", WAN_GUIDANCE),
        getattr(cfg.method, "shift", WAN_SHIFT),
        WAN_FPS,
    )


def _local(tensor: Tensor) -> Tensor:
    """A sharded DTensor's own shard (a view: writing it writes the parameter), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _reshard(module: nn.Module) -> None:
    """Free FSDP2's gathered weights: a forward without gradients leaves the root's gathered, and the next
    forward would use them instead of the shards written here."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


@contextmanager
def ema_weights(module: nn.Module, ema: Mapping[str, Tensor]) -> Iterator[None]:
    """``module`` holds the ``ema`` state (as loaded with ``load_state_dict``) in eval mode inside the block, its
    own weights (kept on the CPU meanwhile) and mode again after it, bit for bit. Sharded modules swap shard by
    shard."""
    _reshard(module)
    current = module.state_dict()
    # entries the EMA shares with the module (a LoRA run's frozen base weights) need no swap
    swapped = [k for k, v in ema.items() if _local(v).data_ptr() != _local(current[k]).data_ptr()]
    kept = {k: _local(current[k]).to("cpu", copy=True) for k in swapped}
    training = module.training
    with torch.no_grad():
        for k in swapped:
            _local(current[k]).copy_(_local(ema[k]))
    module.eval()
    try:
        yield
    finally:
        _reshard(module)
        with torch.no_grad():
            for k in swapped:
                _local(current[k]).copy_(kept[k])
        module.train(training)


@contextmanager
def global_rng_kept() -> Iterator[None]:
    """The global RNG states (python, numpy, torch, CUDA) as they were, whatever the block drew."""
    state = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(state)


class SampleHook:
    """``sample_fn(step, ema, logger)``: the videos of the EMA generator at ``step``."""

    def __init__(
        self,
        cfg: RunConfig,
        exported: tuple[str, nn.Module],
        prompts: list[str],
        inputs: SampleInputs,
        run_dir: Path,
        dist: DistContext,
    ):
        self.name, self.module = exported  # the method's generator (``Method.exported``), sampled with its EMA weights
        tc = cfg.train
        outer, inner = run_steps(cfg.method_name, cfg.method)
        self.sample = sampler(
            cfg.method_name, cfg.method, self.module, outer, inner, tc.sample_seed, inputs.guidance, inputs.shift
        )
        noise = torch.randn(len(prompts), *inputs.shape, generator=torch.Generator().manual_seed(tc.sample_seed))
        self.noise, self.cond, self.neg_cond = (t.to(dist.device) for t in (noise, inputs.cond, inputs.neg_cond))
        self.inputs, self.dist, self.folder = inputs, dist, run_dir / SAMPLES_DIR
        self.names = _unique([slug(p) for p in prompts])
        self.bf16 = tc.precision == "bf16"
        self.steps = f"M = {outer}" + ("" if inner is None else f", N = {inner}")

    def __call__(self, step: int, ema: Mapping[str, Mapping[str, Tensor]], logger: MetricLogger) -> None:
        began = time.perf_counter()
        device = self.dist.device
        with global_rng_kept(), ema_weights(self.module, ema[self.name]), torch.no_grad():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                latents = self.sample(self.noise, self.cond, self.neg_cond).float()
        if self.dist.is_main:
            frames = self.inputs.decode(latents)
            folder = self.folder / f"step_{step:07d}"
            folder.mkdir(parents=True, exist_ok=True)
            files = {}
            for name, video in zip(self.names, frames):
                files[name] = folder / f"{name}.mp4"
                write_mp4(files[name], video, self.inputs.fps)
            gif_grid({f"step {step}": grid_videos(frames)}, folder / GRID_FILE, scale=1)
            logger.log_videos(step, dict(zip(self.names, frames)), files, self.inputs.fps)
            # through tqdm: the progress bar stays on its own line
            tqdm.write(f"samples at step {step} ({self.steps}): {folder} ({time.perf_counter() - began:.1f} s)")
        self.dist.barrier()


def grid_videos(frames: Tensor) -> Tensor:
    """uint8 (B, F, H, W, 3) -> (B, 3, F, h, w) in [-1, 1] for ``gif_grid``, at most ``GRID_HEIGHT`` rows tall."""
    videos = frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    height, width = videos.shape[-2:]
    if height > GRID_HEIGHT:
        size = (GRID_HEIGHT, max(1, round(width * GRID_HEIGHT / height)))
        videos = torch.stack([F.interpolate(v.transpose(0, 1), size=size, mode="area").transpose(0, 1) for v in videos])
    return videos


def _unique(names: list[str]) -> list[str]:
    """File names: a repeated prompt's slug gets ``-2``, ``-3``, ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def sample_hook(
    cfg: RunConfig,
    exported: tuple[str, nn.Module],
    data: DataSource,
    assets: WorldAssets | None,
    run_dir: str | Path,
    dist: DistContext,
) -> SampleHook | None:
    """The run's ``sample_fn``: None unless ``train.sample_every`` is set; the prompts are embedded here."""
    tc = cfg.train
    if not tc.sample_every:
        return None
    prompts = tc.sample_prompt_list()
    if assets is not None:  # the world's data, or `tmd synthesize --model world`'s: the world's encoders
        prompts = prompts or curve_prompts(WORLD_PROMPTS)
        inputs = world_inputs(assets, prompts)
    elif isinstance(data, PreparedDataset):
        if prompts is None:
            raise ConfigError("train.sample_every needs train.sample_prompts (a file, one prompt per line, or a list)")
        inputs = prepared_inputs(cfg, data, prompts, dist.device, dist.is_main)
    else:
        raise ConfigError(f"train.sample_every: no decoder for data kind {cfg.data_kind!r} (world and prepared have one)")
    return SampleHook(cfg, exported, prompts, inputs, Path(run_dir), dist)
