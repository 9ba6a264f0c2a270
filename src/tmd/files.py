"""Files tmd reads and writes: safetensors checked before loading, output folders checked before work.

A truncated download or an interrupted copy leaves a safetensors file whose header promises more bytes
than there are; the libraries that load it fail deep inside with a message that names no file, so every
safetensors file is opened here first. Output folders are checked before a model is loaded, so a typo in
``--out`` costs a second, not a model load and a generation. safetensors writes its files with mode
0600; the files tmd writes are meant to be shared (a student, a prepared dataset), so they get the
mode every other file the user creates gets. Videos are written as H.264 mp4 named by a slug of their prompt.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path

from tmd.errors import InputFileError, OutputPathError


def check_safetensors(path: str | os.PathLike, what: str | None = None) -> Path:
    """``path`` itself, once its safetensors header and the data it describes are all there."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as e:
        prefix = f"{what}: " if what else ""
        raise InputFileError(
            f"{prefix}{path} is not a complete safetensors file ({e}); it is truncated or corrupt: copy or export it again"
        ) from None
    return path


def check_safetensors_folder(folder: str | os.PathLike) -> list[Path]:
    """The ``*.safetensors`` files of ``folder``, each checked; an error if there are none."""
    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        found = f" (found {', '.join(pickled)}: convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"no .safetensors weights in {folder}; tmd never loads pickled weights{found}")
    return [check_safetensors(p) for p in weights]


def output_dir_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be (or become) a folder to write into, or None if it can."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return f"'{path}' exists and is not a directory"
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create directory '{path}': '{parent}' is not a writable directory"
    return None


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` if it can be written into (it is not created); else an error naming ``what``."""
    problem = output_dir_problem(path)
    if problem is not None:
        raise OutputPathError(f"{what}: {problem}")
    return Path(path)


def make_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    path = check_output_dir(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a race, a read-only mount os.access could not see, a full disk
        raise OutputPathError(f"{what}: cannot create directory '{path}': {e.strerror or e}") from None
    return path


@functools.cache
def _file_mode() -> int:
    # the umask can only be read by setting it, which races with other threads creating files: read it once
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def share_like_other_files(*paths: str | os.PathLike) -> None:
    """Give files (and the files inside folders) the mode the user's umask gives new files."""
    mode = _file_mode()
    for path in map(Path, paths):
        for file in path.rglob("*") if path.is_dir() else [path]:
            if file.is_file():
                os.chmod(file, mode)


def save_safetensors(tensors: Mapping, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=metadata)
    share_like_other_files(path)
    return Path(path)


WAN_FPS = 16


def slug(prompt: str, length: int = 40) -> str:
    """A file-name-safe stem for a prompt: lower-case words joined by ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:length].strip("-") or "video"


def write_mp4(path: str | os.PathLike, frames, fps: int = WAN_FPS) -> None:
    """uint8 (F, H, W, 3) frames (a tensor) -> H.264 mp4 through imageio-ffmpeg."""
    import imageio.v2 as imageio

    with imageio.get_writer(str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8) as writer:
        for frame in frames.numpy():
            writer.append_data(frame)
