"""Training on the synthetic world in latent space (LFM), and scoring samplers on its benchmark.

The teacher and every student see the world through the same two frozen models: the video
autoencoder (videos <-> latents) and the tiny text encoder (prompt -> embeddings). ``WorldAssets``
loads them, with the teacher, from one folder so that every run and every table uses the same ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from tmd.config import existing_path, register_data_config
from tmd.data.source import GeneratorDataSource
from tmd.models.linear_attention import check_linearised_teacher
from tmd.models.text import TextEncoder
from tmd.models.wan import load_teacher
from tmd.world.autoencoder import VideoAutoencoder
from tmd.world.spec import WorldConfig, all_prompts, random_prompts, sample_videos
from tmd.world.text import SYNTHETIC_NEGATIVE_PROMPT

DEFAULT_ASSETS = Path(str(resources.files("tmd") / "world" / "assets"))
"""The shipped world: ``autoencoder/``, ``text_encoder/`` + ``tokenizer/``, ``teacher/``, ``world.json``."""
AUTOENCODER_DIR = "autoencoder"
TEACHER_DIR = "teacher"
METADATA_FILE = "world.json"

EVAL_SEEDS = 1
"""Videos per prompt in the benchmark's fixed prompt set. One (72 videos) keeps a 50-step CFG teacher
curve to minutes on 2 shared CPU cores; diversity then falls back to the global variance ratio
(``score_videos``), so pass 2+ where within-prompt diversity matters."""


@dataclass
class WorldDataConfig:
    """The ``data:`` section of a world run. ``assets`` null means the packaged ``assets/world``."""

    assets: Optional[str] = None
    linearised_teacher: Optional[str] = existing_path(None)
    """A linvideo run's ``student.safetensors``: distil that linearised model instead of the world teacher."""

    def __post_init__(self):
        check_linearised_teacher(self.linearised_teacher)


register_data_config("world", WorldDataConfig)


def assets_dir(path: str | Path | None = None) -> Path:
    return DEFAULT_ASSETS if path is None else Path(path)


def eval_prompts(seeds: int = EVAL_SEEDS) -> list[str]:
    """The fixed benchmark prompt set: every prompt ``seeds`` times, prompt-major."""
    return [p for p in all_prompts() for _ in range(seeds)]


class PromptEmbeddings:
    """All 72 prompt embeddings and the negative one, encoded once: the world has no other prompts."""

    def __init__(self, text_encoder: TextEncoder):
        prompts = all_prompts()
        self.index = {p: i for i, p in enumerate(prompts)}
        self.table = text_encoder.encode(prompts)
        self.negative = text_encoder.encode([SYNTHETIC_NEGATIVE_PROMPT])

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(cond, neg_cond) for ``prompts``, each (B, L, D)."""
        try:
            idx = [self.index[p] for p in prompts]
        except KeyError as e:
            raise ValueError(f"prompt {e.args[0]!r} is not one of the world's 72 prompts (see all_prompts())") from None
        cond = self.table[idx]
        return cond, self.negative.expand_as(cond).contiguous()


def world_data_source(
    autoencoder: VideoAutoencoder,
    text_encoder: TextEncoder,
    batch_size: int,
    seed: int,
    world: WorldConfig = WorldConfig(),
) -> GeneratorDataSource:
    """Batch i: fresh world videos for random prompts, seeded by (seed, i), encoded to latents.

    Keys ``x`` (B, C, F', H', W'), ``cond`` and ``neg_cond`` (B, L, D), ``prompts``.
    """
    embeddings = PromptEmbeddings(text_encoder)
    autoencoder = autoencoder.eval()

    def batch(_: int, rng: torch.Generator) -> dict[str, Any]:
        prompts = random_prompts(batch_size, rng)
        videos = sample_videos(prompts, world, rng).videos
        with torch.no_grad():
            x = autoencoder.encode(videos)
        cond, neg_cond = embeddings(prompts)
        return {"x": x, "cond": cond, "neg_cond": neg_cond, "prompts": prompts}

    return GeneratorDataSource(batch, seed)


class WorldAssets:
    """The shipped autoencoder, text encoder and (optionally) teacher, loaded from one folder."""

    def __init__(self, path: str | Path | None = None, teacher: bool = True, device: str | torch.device = "cpu"):
        self.path = assets_dir(path)
        self.device = torch.device(device)
        missing = [name for name in self.required(teacher) if not (self.path / name).exists()]
        if missing:
            raise FileNotFoundError(
                f"world assets folder {self.path} lacks {', '.join(missing)}; build them with "
                f"`tmd train-teacher --config world_teacher.yaml` (or pass the folder that holds them)"
            )
        self.autoencoder = VideoAutoencoder.from_pretrained(self.path / AUTOENCODER_DIR, map_location=self.device)
        self.text_encoder = TextEncoder.from_pretrained(self.path, device=self.device)
        self.embeddings = PromptEmbeddings(self.text_encoder)
        self.teacher = load_teacher(self.path / TEACHER_DIR, device=self.device) if teacher else None
        metadata = self.path / METADATA_FILE
        self.metadata: dict[str, Any] = json.loads(metadata.read_text()) if metadata.is_file() else {}

    @staticmethod
    def required(teacher: bool = True) -> list[str]:
        names = [AUTOENCODER_DIR, "text_encoder", "tokenizer"]
        return names + [TEACHER_DIR] if teacher else names

    def _default(self, key: str) -> float:
        if key not in self.metadata:
            raise FileNotFoundError(
                f"{self.path / METADATA_FILE} holds no {key!r}: it is written when the teacher is exported "
                f"(`tmd train-teacher ... --stage teacher`)"
            )
        return float(self.metadata[key])

    @property
    def guidance(self) -> float:
        """The world's default CFG scale (the one the teacher scored best with)."""
        return self._default("guidance")

    @property
    def shift(self) -> float:
        return self._default("shift")

    def latent_shape(self, world: WorldConfig = WorldConfig()) -> tuple[int, int, int, int]:
        _, frames, height, width = world.video_shape
        return self.autoencoder.latent_shape(frames, height, width)

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        cond, neg_cond = self.embeddings(prompts)
        return cond.to(self.device), neg_cond.to(self.device)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> videos (B, 3, F, H, W) in [-1, 1]."""
        return self.autoencoder.decode(latents.to(self.device).float())


def world_assets_of(teacher: Path) -> Path | None:
    """The world assets folder a teacher folder sits in (it holds ``world.json`` and the autoencoder), or None."""
    root = teacher.parent
    if teacher.name == TEACHER_DIR and (root / METADATA_FILE).is_file() and (root / AUTOENCODER_DIR).is_dir():
        return root
    return None
