"""Checkpoints that survive crashes, resume bit-exactly and reshard to any number of processes.

Layout of ``run_dir/checkpoints``::

    step_0001000/
        state/                      torch.distributed.checkpoint (DCP): module weights, EMA weights and
                                    AdamW states by name, each rank writing its own shards
        trainer_state.pt            step, generator and RNG states, data position (torch.save)
    latest                          name of the newest complete checkpoint, written last

DCP stores every tensor with its global shape, so a run saved by 8 processes resumes on 4 or on 1 (and
the other way round). A checkpoint is written into a temporary sibling directory, fsynced, then renamed
into place, and only then does ``latest`` move: a crash at any point leaves the previous checkpoint the
latest one. ``trainer_state.pt`` holds only tensors and plain Python values so it loads with
``weights_only=True``. DCP's own ``.metadata`` index is pickled: a checkpoint directory is the run's own
training state, never a file to accept from someone else (share ``student.safetensors`` instead).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
STATE_DIR = "state"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")
TMP_PREFIX = ".tmp_"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` sorted by step (temporary directories are not listed)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one (renames are atomic), else None."""
    pointer = root / LATEST
    if not pointer.is_file():
        found = list_checkpoints(root)
        return found[-1][1] if found else None
    path = root / pointer.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    if not (path / STATE_DIR).is_dir():
        raise FileNotFoundError(
            f"{path} has no {STATE_DIR}/ folder: it was written by an older tmd in another layout; "
            "start a new run (another train.out_dir)"
        )
    return path


def remove_stale_temporaries(root: Path) -> None:
    """Delete half-written checkpoints a killed process left behind."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def _single_process_quietly(fn: Callable[[], Any]) -> Any:
    # DCP warns that it runs without a process group; for a one-process run that is the intent
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*process group.*|.*single process.*|.*distributed is disabled.*")
        return fn()


def save_checkpoint(
    root: Path,
    step: int,
    state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write one checkpoint atomically, point ``latest`` at it, keep the newest ``keep``.

    ``state`` (tensors, possibly sharded DTensors) is written by every rank; ``trainer_state`` and the
    renames by the main rank alone. Every rank must call this, with the same ``step``.
    """
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        _single_process_quietly(lambda: dcp.save(state, checkpoint_id=str(tmp / STATE_DIR)))
        barrier()
        if is_main:
            torch.save(trainer_state, tmp / TRAINER_STATE)
            _fsync_tree(tmp)
            if final.exists():  # left by a run that crashed before moving ``latest``; not the latest
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            _write_atomic(root / LATEST, final.name)
            for _, path in list_checkpoints(root)[:-keep]:
                if path != final:
                    shutil.rmtree(path, ignore_errors=True)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    return final


def read_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)


def load_sharded_state(path: Path, state: dict[str, Any]) -> None:
    """Load the tensors of ``state`` in place, resharded to this run's layout."""
    try:
        _single_process_quietly(lambda: dcp.load(state, checkpoint_id=str(path / STATE_DIR)))
    except Exception as error:  # DCP names the missing key deep inside a CheckpointException
        raise ValueError(
            f"checkpoint {path} does not fit this run ({type(error).__name__}: {str(error)[:500]}); "
            "was it written by another method or model size?"
        ) from error


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain values (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; directories cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
