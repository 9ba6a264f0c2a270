"""Real-video data preparation: videos + captions -> sharded Wan latents and UMT5 embeddings.

Training never touches pixels or the text encoder: ``tmd prepare`` decodes each captioned video once
(imageio / ffmpeg), resamples it to the training fps, resizes and center-crops it, encodes it with the
Wan VAE (posterior mean, normalised as the transformer sees latents) and its caption with UMT5, and
writes safetensors shards plus ``index.json``. Prompt embeddings are stored trimmed to the longest
true prompt of their shard (Wan's embeddings are exactly zero after the prompt) and padded back when
read. A shard is written atomically, so an interrupted run resumes at the first missing shard; the
settings a folder is resumed with are checked against ``prepare.json``, written with the first shard, so
a run that failed before it (a caption the tokenizer cannot encode, a wrong ``--model``) leaves nothing
that holds the folder to its settings. A video that cannot be decoded or is too short is skipped with its
reason, and the run goes on.

``PreparedDataset`` serves the result to the trainer as a ``DataSource``. ``--text-only`` prepares
prompts alone for data-free methods; its batches carry the latent ``shape`` instead of ``x``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from tmd.config import existing_path, register_data_config
from tmd.errors import PromptError
from tmd.files import check_output_dir, make_output_dir, save_safetensors
from tmd.models.folder import FAMILIES
from tmd.models.linear_attention import check_linearised_teacher
from tmd.models.text import WAN_NEGATIVE_PROMPT, TextEncoder, check_known_words, clean_prompt
from tmd.models.vae import latent_shape, normalize_latents
from tmd.models.vae import load_vae as load_wan_vae

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SETTINGS_FILE = "prepare.json"
NEGATIVE_FILE = "negative.safetensors"
FORMAT_VERSION = 1


@dataclass
class PreparedDataConfig:
    """The ``data:`` section of a run on prepared data: the folder ``tmd prepare`` wrote."""

    path: str = existing_path()
    teacher: Optional[str] = existing_path(None)
    """The Wan pipeline (or transformer folder) to distil; null: the model the data was prepared with."""
    linearised_teacher: Optional[str] = existing_path(None)
    """A linvideo run's ``student.safetensors`` (made from ``teacher``): distil that linearised model instead."""
    wan: Optional[str] = None
    """The teacher's family the config was written for (``tmd.models.folder.FAMILIES``); another is refused."""
    guidance_2: Optional[float] = None
    """Wan2.2 A14B: the low-noise expert's CFG scale (the method's ``guidance`` is the high-noise one's)."""

    def __post_init__(self):
        check_linearised_teacher(self.linearised_teacher)
        if self.wan is not None and self.wan not in FAMILIES:
            raise ValueError(f"wan must be one of {list(FAMILIES)}, got {self.wan!r}")


register_data_config("prepared", PreparedDataConfig)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


# ----------------------------------------------------------------------------------------------
# Inputs.


def read_captions(path: str | Path) -> list[tuple[str, str]]:
    """(video file, caption) pairs from a ``.json`` mapping ``{video: caption}`` or a ``.jsonl`` file of
    ``{"video": ..., "caption": ...}`` lines; video files are relative to the videos folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} does not exist")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"{path} must hold a mapping of video file to caption")
            pairs = list(data.items())
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            pairs = [(row["video"], row["caption"]) for row in rows]
        else:
            raise ValueError(f"caption file {path} must be .json ({{video: caption}}) or .jsonl (video, caption lines)")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read captions from {path}: {e!r}") from None
    bad = [v for v, c in pairs if not isinstance(v, str) or not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"{path}: entries without a text caption: {bad[:5]}")
    if not pairs:
        raise ValueError(f"caption file {path} holds no entries")
    return pairs


class VideoSkipped(Exception):
    """A video that cannot become a training clip; the message is the reason recorded in the index."""


def resize_crop(frames: Tensor, height: int, width: int) -> Tensor:
    """uint8 (F, h, w, 3) -> float (3, F, height, width) in [-1, 1]: scale to cover, then center-crop."""
    video = frames.permute(0, 3, 1, 2).float()
    scale = max(height / video.shape[2], width / video.shape[3])
    size = (max(height, round(video.shape[2] * scale)), max(width, round(video.shape[3] * scale)))
    video = torch.nn.functional.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    video = video[:, :, top : top + height, left : left + width]
    return (video / 127.5 - 1).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def load_clip(path: Path, frames: int, height: int, width: int, fps: float) -> Tensor:
    """The first ``frames`` frames of ``path`` resampled to ``fps``, resized and cropped."""
    import imageio.v2 as imageio

    if not path.is_file():
        raise VideoSkipped("file not found")
    try:
        reader = imageio.get_reader(str(path), format="FFMPEG")
    except Exception as e:  # imageio raises several types for unreadable files
        raise VideoSkipped(f"cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    with reader:
        source_fps = float(reader.get_meta_data().get("fps") or fps)
        wanted = [int(i * source_fps / fps + 1e-6) for i in range(frames)]  # the frame on screen at i / fps
        picked: list[np.ndarray] = []
        try:
            for index, frame in enumerate(reader):
                while len(picked) < frames and wanted[len(picked)] == index:
                    picked.append(frame)
                if len(picked) == frames:
                    break
        except Exception as e:
            raise VideoSkipped(f"decoding failed after {len(picked)} frames: {type(e).__name__}") from None
    if len(picked) < frames:
        raise VideoSkipped(f"too short: {frames} frames at {fps:g} fps need {wanted[-1] + 1} source frames at {source_fps:g} fps")
    return resize_crop(torch.from_numpy(np.stack(picked)), height, width)


# ----------------------------------------------------------------------------------------------
# Writing.


class _Encoders:
    """The VAE, the text encoder and the checked latent shape of one pipeline root."""

    def __init__(self, model: Path, frames: int, height: int, width: int, device, dtype, load_vae: bool):
        config_file = model / "transformer" / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no transformer/config.json under {model}: expected a diffusers Wan pipeline root")
        transformer = SimpleNamespace(**json.loads(config_file.read_text()))
        self.vae = load_wan_vae(model, device)
        self.shape = latent_shape(self.vae, transformer, frames, height, width)
        if not load_vae:
            self.vae = None
        self.text = TextEncoder.from_pretrained(model, device=device, dtype=dtype)
        if self.text.dim != transformer.text_dim:
            raise ValueError(f"the text encoder's width {self.text.dim} is not the transformer's text_dim {transformer.text_dim}")
        self.device = device

    def encode_text(self, prompts: list[str], strict: bool = True) -> tuple[Tensor, Tensor]:
        return trimmed_embeddings(self.text, prompts, strict)

    @torch.no_grad()
    def encode_video(self, clip: Tensor) -> Tensor:
        z = self.vae.encode(clip[None].to(self.device)).latent_dist.mode()
        return normalize_latents(self.vae, z)[0].float().cpu()


def trimmed_embeddings(text: TextEncoder, prompts: list[str], strict: bool = True) -> tuple[Tensor, Tensor]:
    """Embeddings trimmed to the longest true prompt (B, l, D), and each prompt's true length: a shard's
    ``cond`` and ``cond_lengths``."""
    if not prompts:
        return torch.zeros(0, 0, text.dim), torch.zeros(0, dtype=torch.int32)
    lengths = text.tokenize(prompts, strict=strict)[1].sum(1)
    cond = text.encode(prompts, strict=strict)[:, : int(lengths.max())]
    return cond.cpu().contiguous(), lengths.to(torch.int32)


def check_settings(out: Path, settings: dict[str, Any], file: str = SETTINGS_FILE, made: str = "prepared") -> bool:
    """True if ``out`` holds shards ``made`` with ``settings`` (a resume), False if it holds none;
    resuming with other settings would silently mix two datasets, so that is refused."""
    settings_file = out / file
    if not settings_file.is_file():
        return False
    before = json.loads(settings_file.read_text())
    changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"{out} was {made} with other settings ({diff}); use a new --out folder")
    return True


def save_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    save_safetensors(tensors, tmp, metadata=metadata)
    tmp.replace(path)


def _clip_stream(items: list[tuple[int, str, str]], videos: Path, workers: int, load):
    """(position, video, caption, clip or VideoSkipped) in order, decoding up to ``2 workers`` ahead."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        stream = iter(items)
        for item in stream:
            pending.append((item, pool.submit(load, videos / item[1])))
            if len(pending) >= 2 * workers:
                break
        while pending:
            (position, video, caption), future = pending.popleft()
            try:
                result: Tensor | VideoSkipped = future.result()
            except VideoSkipped as e:
                result = e
            next_item = next(stream, None)
            if next_item is not None:
                pending.append((next_item, pool.submit(load, videos / next_item[1])))
            yield position, video, caption, result


def prepare(
    out: str | Path,
    model: str | Path,
    *,
    videos: str | Path | None = None,
    captions: str | Path | None = None,
    prompts: list[str] | None = None,
    frames: int = 81,
    height: int = 480,
    width: int = 832,
    fps: float = 16.0,
    shard_size: int = 64,
    workers: int = 4,
    negative_prompt: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare ``videos`` + ``captions`` (or, text-only, ``prompts``) into ``out``; returns the index.

    Shards already in ``out`` are kept (resume); the index is rebuilt from all shards at the end.
    """
    from tqdm.auto import tqdm

    text_only = prompts is not None
    if text_only == (captions is not None):
        raise ValueError("give either videos with captions, or prompts (text-only), not both")
    if shard_size < 1 or workers < 1:
        raise ValueError(f"shard size and workers must be >= 1, got {shard_size} and {workers}")
    if text_only:
        entries = [("", p) for p in prompts]
        if not entries:
            raise ValueError("no prompts to prepare")
    else:
        if videos is None or not Path(videos).is_dir():
            raise FileNotFoundError(f"videos folder {videos} does not exist")
        entries = read_captions(captions)
    out, model = check_output_dir(out), Path(model)
    negative_prompt = WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
    settings = {
        "format": FORMAT_VERSION,
        "mode": "text" if text_only else "videos",
        "model": str(model.resolve()),
        "frames": frames,
        "height": height,
        "width": width,
        "fps": fps,
        "shard_size": shard_size,
        "negative_prompt": negative_prompt,
        "entries": len(entries),
        "entries_sha256": hashlib.sha256(json.dumps(entries).encode()).hexdigest(),
    }
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resuming = check_settings(out, settings)
    encoders = _Encoders(model, frames, height, width, device, dtype, load_vae=not text_only)
    try:  # before any video is decoded: one bad caption would otherwise stop the run at its shard
        check_known_words(encoders.text.tokenizer, [clean_prompt(caption) for _, caption in entries])
    except PromptError as e:
        raise PromptError(f"{'--prompts' if text_only else captions}: {e}") from None
    make_output_dir(out)
    # without prepare.json, whatever an earlier failed try left in ``out`` was made with unknown settings
    if not resuming or not (out / NEGATIVE_FILE).is_file():
        negative, _ = encoders.encode_text([negative_prompt], strict=False)
        save_atomic({"cond": negative}, out / NEGATIVE_FILE, {"prompt": negative_prompt})

    shards = math.ceil(len(entries) / shard_size)
    todo = [k for k in range(shards) if not (resuming and (out / shard_name(k)).is_file())]
    if len(todo) < shards:
        log.info("%s: %d of %d shards already written, resuming", out, shards - len(todo), shards)
    items = [(p, *entries[p]) for k in todo for p in range(k * shard_size, min((k + 1) * shard_size, len(entries)))]
    bar = tqdm(total=len(items), desc="prepare", unit="prompt" if text_only else "video", disable=not progress)

    def write_shard(k: int, kept: list[tuple[str, str]], latents: list[Tensor], skipped: list[dict[str, str]]) -> None:
        cond, lengths = encoders.encode_text([caption for _, caption in kept])
        tensors = {"cond": cond, "cond_lengths": lengths}
        if not text_only:
            tensors["latents"] = torch.stack(latents) if latents else torch.zeros(0, *encoders.shape)
        metadata = {
            "captions": json.dumps([c for _, c in kept]),
            "videos": json.dumps([v for v, _ in kept]),
            "skipped": json.dumps(skipped),
        }
        save_atomic(tensors, out / shard_name(k), metadata)
        if not (out / SETTINGS_FILE).is_file():
            (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    if text_only:
        for k in todo:
            chunk = entries[k * shard_size : (k + 1) * shard_size]
            write_shard(k, chunk, [], [])
            bar.update(len(chunk))
    else:
        load = lambda path: load_clip(path, frames, height, width, fps)  # noqa: E731
        current, kept, latents, skipped = None, [], [], []
        for position, video, caption, clip in _clip_stream(items, Path(videos), workers, load):
            k = position // shard_size
            if current is not None and k != current:
                write_shard(current, kept, latents, skipped)
                kept, latents, skipped = [], [], []
            current = k
            if isinstance(clip, VideoSkipped):
                log.warning("skipped %s: %s", video, clip)
                skipped.append({"video": video, "reason": str(clip)})
            else:
                kept.append((video, caption))
                latents.append(encoders.encode_video(clip))
            bar.update(1)
        if current is not None:
            write_shard(current, kept, latents, skipped)
    bar.close()
    return write_index(out, settings, encoders.shape, encoders.text.max_length)


def write_index(out: Path, settings: dict[str, Any], shape: tuple[int, ...], max_length: int) -> dict[str, Any]:
    """``index.json`` from the shards' own metadata, so resumed and fresh runs give the same index."""
    shards, skipped = [], []
    for k in range(math.ceil(settings["entries"] / settings["shard_size"])):
        with safe_open(str(out / shard_name(k)), framework="pt") as handle:
            metadata = handle.metadata()
        shards.append({"file": shard_name(k), "samples": len(json.loads(metadata["captions"]))})
        skipped.extend(json.loads(metadata["skipped"]))
    index = {
        "format": FORMAT_VERSION,
        "mode": settings["mode"],
        "latent_shape": list(shape),
        "text_max_length": max_length,
        "samples": sum(s["samples"] for s in shards),
        "skipped": len(skipped),
        "skipped_videos": skipped,
        "negative": NEGATIVE_FILE,
        "shards": shards,
        **{k: settings[k] for k in ("model", "frames", "height", "width", "fps")},
    }
    # atomically: a complete index is what marks a finished folder (a study's dataset, a resumed synthesize)
    tmp = out / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out / INDEX_FILE)
    return index


# ----------------------------------------------------------------------------------------------
# Reading.


class PreparedDataset:
    """A ``DataSource`` over a prepared folder: shuffled without replacement, reshuffled every epoch.

    The order of epoch e depends on (seed, e) only, so the state is just how many samples were served.
    Batches: ``x`` (B, C, F', H', W') (or ``shape`` for text-only data), ``cond`` and ``neg_cond``
    (B, L, D) zero-padded to the text encoder's length, ``prompts``; and ``noise`` (B, C, F', H', W') where
    the folder stores it (``tmd synthesize --keep-noise``: the teacher's noise-data pairs).
    """

    def __init__(self, path: str | Path, batch_size: int, seed: int = 0):
        self.path = Path(path)
        index_file = self.path / INDEX_FILE
        if not index_file.is_file():
            raise FileNotFoundError(f"no {INDEX_FILE} in {self.path}: run tmd prepare first (or let it finish)")
        self.index = json.loads(index_file.read_text())
        if self.index.get("format") != FORMAT_VERSION:
            raise ValueError(f"{index_file} has format {self.index.get('format')}, this tmd reads {FORMAT_VERSION}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.samples = [(s["file"], row) for s in self.index["shards"] for row in range(s["samples"])]
        if not self.samples:
            raise ValueError(f"{self.path} holds no samples ({self.index['skipped']} videos were skipped)")
        self.batch_size, self.seed, self.position = batch_size, seed, 0
        self.length = self.index["text_max_length"]
        self.negative = self._pad(load_file(str(self.path / self.index["negative"]))["cond"][0])
        self._handles: dict[str, Any] = {}
        self._captions: dict[str, list[str]] = {}
        self._order: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _pad(self, cond: Tensor) -> Tensor:
        return torch.nn.functional.pad(cond.float(), (0, 0, 0, self.length - cond.shape[0]))

    def _handle(self, file: str):
        if file not in self._handles:
            handle = safe_open(str(self.path / file), framework="pt")
            self._handles[file] = handle
            self._captions[file] = json.loads(handle.metadata()["captions"])
        return self._handles[file]

    def _sample_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.samples))
        if self._order is None or self._order[0] != epoch:
            mixed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0])
            self._order = (epoch, torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(mixed)))
        return int(self._order[1][offset])

    def next_batch(self) -> dict[str, Any]:
        xs, noises, conds, prompts = [], [], [], []
        for position in range(self.position, self.position + self.batch_size):
            file, row = self.samples[self._sample_at(position)]
            handle = self._handle(file)
            length = int(handle.get_slice("cond_lengths")[row : row + 1][0])
            conds.append(self._pad(handle.get_slice("cond")[row : row + 1][0, :length]))
            prompts.append(self._captions[file][row])
            if self.index["mode"] == "videos":
                xs.append(handle.get_slice("latents")[row : row + 1][0].float())
            if "noise" in handle.keys():  # tmd synthesize --keep-noise: the noise the teacher sampled x from
                noises.append(handle.get_slice("noise")[row : row + 1][0].float())
        self.position += self.batch_size
        cond = torch.stack(conds)
        batch = {"cond": cond, "neg_cond": self.negative.expand_as(cond).contiguous(), "prompts": prompts}
        if xs:
            batch["x"] = torch.stack(xs)
        if noises and len(noises) == len(xs):
            batch["noise"] = torch.stack(noises)
        else:
            batch["latent_shape"] = tuple(self.index["latent_shape"])
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "position": self.position, "samples": len(self.samples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["samples"]) != (self.seed, len(self.samples)):
            raise ValueError(
                f"checkpoint was written for data seed {state['seed']} over {state['samples']} samples; "
                f"this dataset has seed {self.seed} and {len(self.samples)} samples"
            )
        self.position = state["position"]
