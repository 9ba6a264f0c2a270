"""``tmd synthesize``: a teacher's own samples from a prompt list, written as a ``tmd prepare`` folder.

The paper does not train on a video dataset but on videos its teacher generated from prompts (Sec. 4.1,
Table 7), and warms one-step students up on teacher noise-data pairs (Table 4). This writes such data in
exactly ``tmd prepare``'s layout and with its writers (``tmd.data.prepare``: latent shards with trimmed
prompt embeddings, ``negative.safetensors``, ``index.json``), so ``data_kind: prepared`` trains on either.
On top of it: ``synthesize.json`` (the teacher, sampler and video size; a resume is held to them), a
``noise`` tensor per shard with ``keep_noise`` (what DMD2-v's KD warm-up regresses from), and
``previews/`` with ``decode``.

Sample i is prompt ``i // videos_per_prompt`` sampled from noise seeded by ``seed + i``, as ``tmd
generate``'s video i: a shard's content depends on the settings alone, not on which process made it or
when. The shard is the unit of work: under ``torchrun`` each rank takes every ``world_size``-th missing
shard; a shard is written atomically after its last sample, so a killed run resumes with the missing ones.
Work runs in two passes: the text encoder embeds the prompts of this process's missing shards into
``.embeddings/`` and is freed, then the teacher samples them shard by shard.

The teacher is a diffusers Wan pipeline root, sampled as ``tmd generate`` samples a teacher (its
scheduler, CFG against the negative prompt), or the synthetic world's teacher folder (``world``: the
shipped one), sampled as ``tmd.world.generate`` does (Euler, the world's CFG scale and shift); world
latents are the world autoencoder's, and the folder's recorded model is the teacher folder itself, which
``load_teacher`` reads as it reads a pipeline root.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoTokenizer

from tmd import flow
from tmd.data.prepare import (
    FORMAT_VERSION,
    INDEX_FILE,
    NEGATIVE_FILE,
    check_settings,
    save_atomic,
    shard_name,
    trimmed_embeddings,
    write_index,
)
from tmd.data.prepare import SETTINGS_FILE as PREPARE_SETTINGS_FILE
from tmd.errors import OutputPathError, PromptError
from tmd.files import WAN_FPS, check_output_dir, make_output_dir, slug, write_mp4
from tmd.models.folder import is_student_folder
from tmd.models.text import WAN_NEGATIVE_PROMPT, TextEncoder, check_known_words, clean_prompt
from tmd.models.vae import decode_video, latent_shape, load_vae
from tmd.models.wan import load_teacher
from tmd.pipelines.export import is_few_step_pipeline, is_tmd_pipeline
from tmd.pipelines.videos import DEFAULT_TEACHER_STEPS
from tmd.programs.generate import DEFAULT_GUIDANCE, load_scheduler, teacher_shift
from tmd.sampling import sample_teacher, sample_with_scheduler
from tmd.train.distributed import init_distributed
from tmd.world.data import DEFAULT_ASSETS, TEACHER_DIR
from tmd.world.generate import WorldModel, load_world_model, video_frames
from tmd.world.spec import WorldConfig
from tmd.world.text import SYNTHETIC_NEGATIVE_PROMPT

log = logging.getLogger(__name__)

SETTINGS_FILE = "synthesize.json"
EMBEDDINGS_DIR = ".embeddings"
PREVIEWS_DIR = "previews"
WORLD = "world"
"""``--model world``: the shipped world teacher."""
WORLD_FPS = 8  # tmd.world.generate's frame rate
DEFAULT_SHARD_SIZE = 16
WAN_SIZE = (81, 480, 832)


# ----------------------------------------------------------------------------------------------
# Inputs.


def check_prompts(tokenizer, prompts: list[str], source: str) -> None:
    """Every prompt encodes as written: refused here, before a sample is made, naming ``source``."""
    cleaned = [clean_prompt(p) for p in prompts]
    empty = [i + 1 for i, p in enumerate(cleaned) if not p]
    if empty:
        raise PromptError(f"{source}: prompt(s) {empty[:10]} are empty once cleaned (html entities, whitespace)")
    try:
        check_known_words(tokenizer, cleaned)
    except PromptError as e:
        raise PromptError(f"{source}: {e}") from None


def check_out(out: Path) -> None:
    """``out`` is new, empty, or a synthesize folder (resumed); anything else would be mixed into."""
    if not out.is_dir() or (out / SETTINGS_FILE).is_file() or not any(out.iterdir()):
        return
    what = "a tmd prepare folder" if (out / PREPARE_SETTINGS_FILE).is_file() else "files"
    raise FileExistsError(f"--out {out} holds {what} and no {SETTINGS_FILE}, so it is not a tmd synthesize folder: use a new one")


# ----------------------------------------------------------------------------------------------
# Teachers.


@dataclass
class Teacher:
    kind: str  # "wan" or "world"
    path: Path
    """The model the index records: what a training run on the folder loads as its teacher."""
    text_root: Path
    """The folder holding ``text_encoder/`` and ``tokenizer/``."""
    size: tuple[int, int, int]  # frames, height, width
    shape: tuple[int, ...]  # (C, F', H', W')
    guidance: float
    shift: float
    negative_prompt: str
    fps: int
    world: WorldModel | None = None


def check_wan_pipeline(path: Path) -> None:
    if is_tmd_pipeline(path) or is_few_step_pipeline(path) or is_student_folder(path):
        raise ValueError(
            f"--model {path} is a distilled student; tmd synthesize samples a teacher (a diffusers Wan pipeline root)"
        )
    missing = [
        f"{part}/config.json" for part in ("transformer", "vae", "text_encoder") if not (path / part / "config.json").is_file()
    ]
    missing += [] if (path / "tokenizer").is_dir() else ["tokenizer/"]
    if missing:
        raise FileNotFoundError(
            f"--model {path} is not a diffusers Wan pipeline root: it lacks {', '.join(missing)} "
            "(tmd synthesize needs the teacher's transformer, VAE and text encoder)"
        )


def _config(path: Path) -> SimpleNamespace:
    try:
        return SimpleNamespace(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path} is not a JSON object: {e}") from None


def find_teacher(model: str | Path, frames: int | None, height: int | None, width: int | None, device) -> Teacher:
    """The teacher at ``model`` with its video size checked; only the world's (tiny) models are loaded yet."""
    path = DEFAULT_ASSETS / TEACHER_DIR if str(model) == WORLD else Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder (a diffusers Wan pipeline root, or '{WORLD}')")
    world = load_world_model(path, device)
    if world is not None:
        if world.kind != "teacher":
            raise ValueError(f"--model {path} is a world {world.kind}; tmd synthesize samples a teacher")
        _, *size = WorldConfig().video_shape
        given = {"--frames": frames, "--height": height, "--width": width}
        wrong = {k: v for (k, v), s in zip(given.items(), size) if v is not None and v != s}
        if wrong:
            raise ValueError(
                f"{', '.join(f'{k} {v}' for k, v in wrong.items())}: the world's videos are {' x '.join(map(str, size))}"
            )
        assets = world.assets
        return Teacher(
            "world", path.resolve(), assets.path, tuple(size), assets.latent_shape(), assets.guidance, assets.shift,
            SYNTHETIC_NEGATIVE_PROMPT, WORLD_FPS, world,
        )  # fmt: skip
    check_wan_pipeline(path)
    size = tuple(d if v is None else v for v, d in zip((frames, height, width), WAN_SIZE))
    transformer = _config(path / "transformer" / "config.json")
    shape = latent_shape(SimpleNamespace(config=_config(path / "vae" / "config.json")), transformer, *size)
    text_dim = getattr(_config(path / "text_encoder" / "config.json"), "d_model", None)
    if text_dim != getattr(transformer, "text_dim", None):
        raise ValueError(
            f"--model {path}: the text encoder's width {text_dim} is not the transformer's text_dim {transformer.text_dim}"
        )
    return Teacher("wan", path.resolve(), path, size, shape, DEFAULT_GUIDANCE, teacher_shift(path), WAN_NEGATIVE_PROMPT, WAN_FPS)


@dataclass
class Sampler:
    """The loaded teacher and how it samples and decodes."""

    model: nn.Module
    scheduler: Any  # a diffusers scheduler, or None: tmd's Euler sampler
    shift: float
    decoder: Callable[[Tensor], Tensor] | None
    """Normalised latents (B, ...) -> uint8 frames (B, F, H, W, 3); None without previews."""

    def sample(self, noise: Tensor, cond: Tensor, negative: Tensor | None, steps: int, guidance: float) -> Tensor:
        if self.scheduler is not None:
            return sample_with_scheduler(self.model, noise, cond, negative, self.scheduler, steps, guidance)
        return sample_teacher(self.model, noise, cond, negative, steps, guidance, self.shift)


def load_sampler(
    teacher: Teacher, shift: float, dtype: torch.dtype, device: torch.device, decode: bool, guidance_2: float | None = None
) -> Sampler:
    if teacher.world is not None:
        assets = teacher.world.assets
        decoder = (lambda z: torch.stack([video_frames(v) for v in assets.decode(z).cpu()])) if decode else None
        return Sampler(teacher.world.model, None, shift, decoder)
    # a Wan2.2 A14B teacher samples with both experts, as WanPipeline does; on a GPU only the one in use stays there
    model = load_teacher(
        teacher.path, dtype=dtype, device=device, experts=None, guidance_2=guidance_2, offload=device.type != "cpu"
    )
    vae = load_vae(teacher.path, device) if decode else None
    decoder = (lambda z: decode_video(vae, z)) if decode else None
    return Sampler(model, load_scheduler(teacher.path, shift), shift, decoder)


def scheduler_name(teacher: Teacher) -> str:
    if teacher.world is not None:
        return "euler"
    config = teacher.path / "scheduler" / "scheduler_config.json"
    return str(json.loads(config.read_text()).get("_class_name")) if config.is_file() else "euler"


# ----------------------------------------------------------------------------------------------
# The two passes.


def _write(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_atomic``, with a full disk (or any write error) as one line and no partial file left."""
    try:
        save_atomic(tensors, path, metadata)
    except OSError as e:
        path.with_suffix(".tmp").unlink(missing_ok=True)
        raise OutputPathError(
            f"--out {path.parent}: cannot write {path.name} ({e.strerror or e}); the shards written so far are kept: "
            "rerun the same command to resume"
        ) from None


def _rows(k: int, shard_size: int, total: int) -> range:
    return range(k * shard_size, min((k + 1) * shard_size, total))


def embed_prompts(
    out: Path, teacher: Teacher, captions: list[str], shards: list[int], shard_size: int, negative: str | None, dtype, device
) -> None:
    """Pass 1: each shard's trimmed prompt embeddings into ``.embeddings/`` (and the negative one where
    ``negative`` is given); the text encoder is loaded only if something is missing, and freed after."""
    staged = out / EMBEDDINGS_DIR
    todo = [k for k in shards if not (staged / shard_name(k)).is_file()]
    if not todo and negative is None:
        return
    text = TextEncoder.from_pretrained(teacher.text_root, device=device, dtype=dtype)
    if negative is not None:
        cond, _ = trimmed_embeddings(text, [negative], strict=False)
        _write({"cond": cond}, out / NEGATIVE_FILE, {"prompt": negative, "text_max_length": str(text.max_length)})
    staged.mkdir(exist_ok=True)
    for k in todo:
        rows = [captions[i] for i in _rows(k, shard_size, len(captions))]
        unique = list(dict.fromkeys(rows))
        cond, lengths = trimmed_embeddings(text, unique)
        which = torch.tensor([unique.index(r) for r in rows])
        _write({"cond": cond[which].contiguous(), "cond_lengths": lengths[which].contiguous()}, staged / shard_name(k), {})
    del text  # freed before the teacher is loaded: UMT5-XXL alone is 11 GB in bf16
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _padded(cond: Tensor, length: int) -> Tensor:
    return torch.nn.functional.pad(cond.float(), (0, 0, 0, length - cond.shape[-2]))


def synthesize(
    out: str | Path,
    model: str | Path,
    prompts: list[str],
    *,
    source: str = "prompts",
    steps: int | None = None,
    guidance: float | None = None,
    guidance_2: float | None = None,
    shift: float | None = None,
    negative_prompt: str | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    videos_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    dtype: torch.dtype = torch.float32,
    keep_noise: bool = False,
    decode: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample ``videos_per_prompt`` latents per prompt from the teacher ``model`` into ``out``; returns the index.

    Shards already in ``out`` are kept (resume). ``source`` names the prompts in error messages.
    """
    from tqdm.auto import tqdm

    for name, value in (("--videos-per-prompt", videos_per_prompt), ("--batch-size", batch_size), ("--shard-size", shard_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not prompts:
        raise ValueError(f"{source}: no prompts")
    out = check_output_dir(out)
    check_out(out)
    ctx = init_distributed(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    teacher = find_teacher(model, frames, height, width, ctx.device)
    if teacher.world is not None and dtype != torch.float32:
        raise ValueError("--dtype: the world teacher runs in fp32")
    check_prompts(AutoTokenizer.from_pretrained(teacher.text_root / "tokenizer", local_files_only=True), prompts, source)
    steps = DEFAULT_TEACHER_STEPS if steps is None else steps
    flow.check_steps(steps, "--steps")
    guidance = teacher.guidance if guidance is None else guidance
    flow.check_guidance(guidance)
    if guidance_2 is not None:
        if teacher.world is not None or not (teacher.path / "transformer_2").is_dir():
            raise ValueError(
                f"--guidance-2 is the low-noise expert's scale of a Wan2.2 A14B teacher; {model} has one transformer"
            )
        flow.check_guidance(guidance_2)
    shift = teacher.shift if shift is None else shift
    negative_prompt = teacher.negative_prompt if negative_prompt is None else negative_prompt
    captions = [p for p in prompts for _ in range(videos_per_prompt)]
    settings = {
        "format": FORMAT_VERSION,
        "mode": "videos",
        "teacher": teacher.kind,
        "model": str(teacher.path),
        "scheduler": scheduler_name(teacher),
        "steps": steps,
        "guidance": guidance,
        "guidance_2": guidance_2,
        "shift": shift,
        "negative_prompt": negative_prompt,
        "dtype": str(dtype).removeprefix("torch."),
        "frames": teacher.size[0],
        "height": teacher.size[1],
        "width": teacher.size[2],
        "fps": teacher.fps,
        "latent_shape": list(teacher.shape),
        "seed": seed,
        "videos_per_prompt": videos_per_prompt,
        "keep_noise": keep_noise,
        "shard_size": shard_size,
        "entries": len(captions),
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
    }
    resuming = check_settings(out, settings, SETTINGS_FILE, "synthesized")
    ctx.barrier()  # every rank has read the settings before rank 0 writes them
    if ctx.is_main:
        make_output_dir(out)
        if not resuming:
            (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    ctx.barrier()
    shards = math.ceil(len(captions) / shard_size)
    todo = [k for k in range(shards) if not (out / shard_name(k)).is_file()]
    mine = todo[ctx.rank :: ctx.world_size]
    if ctx.is_main and len(todo) < shards:
        log.info("%s: %d of %d shards already written, resuming", out, shards - len(todo), shards)
    negative = negative_prompt if ctx.is_main and not (resuming and (out / NEGATIVE_FILE).is_file()) else None
    embed_prompts(out, teacher, captions, mine, shard_size, negative, dtype, ctx.device)
    ctx.barrier()  # the negative embedding is written

    with safe_open(str(out / NEGATIVE_FILE), framework="pt") as handle:
        max_length = int(handle.metadata()["text_max_length"])
        negative_cond = _padded(handle.get_tensor("cond"), max_length).to(ctx.device)
    sampler = load_sampler(teacher, shift, dtype, ctx.device, decode, guidance_2)
    if decode:
        (out / PREVIEWS_DIR).mkdir(exist_ok=True)
    total = sum(len(_rows(k, shard_size, len(captions))) for k in mine)
    desc = "synthesize" if ctx.world_size == 1 else f"synthesize (rank {ctx.rank})"
    bar = tqdm(total=total, desc=desc, unit="video", disable=not (progress and ctx.is_main))
    for k in mine:
        staged = out / EMBEDDINGS_DIR / shard_name(k)
        text = load_file(str(staged))
        rows = _rows(k, shard_size, len(captions))
        latents, noises, previews = [], [], []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            noise = torch.cat([torch.randn(1, *teacher.shape, generator=torch.Generator().manual_seed(seed + i)) for i in batch])
            cond = _padded(text["cond"][start : start + len(batch)], max_length).to(ctx.device)
            negative_batch = negative_cond.expand(len(batch), -1, -1) if guidance != 1.0 else None
            with torch.no_grad():
                x = sampler.sample(noise.to(ctx.device), cond, negative_batch, steps, guidance).float()
            latents.append(x.cpu())
            noises.append(noise)
            if sampler.decoder is not None:
                frames_uint8 = sampler.decoder(x)
                for i, video in zip(batch, frames_uint8):
                    previews.append(f"{PREVIEWS_DIR}/{i:06d}-{slug(captions[i])}.mp4")
                    write_mp4(out / previews[-1], video, teacher.fps)
            bar.update(len(batch))
        tensors = {"cond": text["cond"], "cond_lengths": text["cond_lengths"], "latents": torch.cat(latents)}
        if keep_noise:
            tensors["noise"] = torch.cat(noises)
        metadata = {
            "captions": json.dumps([captions[i] for i in rows]),
            "videos": json.dumps(previews or [""] * len(rows)),
            "skipped": "[]",
            "seeds": json.dumps([seed + i for i in rows]),
        }
        _write(tensors, out / shard_name(k), metadata)
        staged.unlink()
    bar.close()
    ctx.barrier()
    if ctx.is_main:
        write_index(out, settings, teacher.shape, max_length)
        shutil.rmtree(out / EMBEDDINGS_DIR, ignore_errors=True)
    ctx.barrier()
    return json.loads((out / INDEX_FILE).read_text())
