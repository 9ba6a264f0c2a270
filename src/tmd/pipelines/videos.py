"""What a generation writes, for Wan models (``tmd.programs.generate``) and the world's (``tmd.world.generate``)
alike: one mp4 per prompt named by its index and a slug of the prompt, and ``generation.json``; and the
step counts both default to."""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

DEFAULT_TEACHER_STEPS = 50
DEFAULT_STUDENT_STEPS = 2
DEFAULT_INNER_STEPS = 4
MANIFEST_FILE = "generation.json"
WAN_FPS = 16


def slug(prompt: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:length].strip("-") or "video"


def write_mp4(path: str | Path, frames: Tensor, fps: int = WAN_FPS) -> None:
    """uint8 (F, H, W, 3) frames -> H.264 mp4 through imageio-ffmpeg."""
    import imageio.v2 as imageio

    with imageio.get_writer(str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8) as writer:
        for frame in frames.numpy():
            writer.append_data(frame)
