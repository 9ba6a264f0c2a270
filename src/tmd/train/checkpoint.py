"""Checkpoints that survive crashes and resume bit-exactly.

Layout of ``run_dir/checkpoints``::

    step_0001000/
        <module>.safetensors        one per state module (safetensors: no pickle, loadable anywhere)
        ema/<module>.safetensors    the EMA weights, one per EMA module
        trainer_state.pt            optimizers, step, RNG states, data position (torch.save)
    latest                          name of the newest complete checkpoint, written last

A checkpoint is written into a temporary sibling directory, fsynced, then renamed into place, and
only then does ``latest`` move: a crash at any point leaves the previous checkpoint the latest one.
``trainer_state.pt`` holds only tensors and plain Python values so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
EMA_DIR = "ema"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
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
    return path


def remove_stale_temporaries(root: Path) -> None:
    """Delete half-written checkpoints a killed process left behind."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    root: Path,
    step: int,
    modules: Mapping[str, nn.Module],
    ema: Mapping[str, Mapping[str, Tensor]],
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write one checkpoint atomically, point ``latest`` at it, keep the newest ``keep``."""
    for name in [*modules, *ema]:
        if not _NAME.match(name):
            raise ValueError(f"module name {name!r} cannot be a file name (use letters, digits, _ . -)")
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}_", dir=root))
    try:
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"))
        if ema:
            (tmp / EMA_DIR).mkdir()
            for name, tensors in ema.items():
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / EMA_DIR / f"{name}.safetensors"))
        torch.save(trainer_state, tmp / TRAINER_STATE)
        _fsync_tree(tmp)
        if final.exists():  # left by a run that crashed before moving ``latest``; not the latest
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(root / LATEST, final.name)
    for _, path in list_checkpoints(root)[:-keep]:
        if path != final:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, modules: Mapping[str, nn.Module], ema: Mapping[str, dict[str, Tensor]]
) -> dict[str, Any]:
    """Load weights into ``modules`` and the EMA tensors in place; return the trainer state."""
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no weights for module {name!r} ({file.name})")
        device = next((t.device for t in module.state_dict().values()), torch.device("cpu"))
        load_model(module, str(file), strict=True, device=str(device))
    for name, tensors in ema.items():
        stored = load_file(str(path / EMA_DIR / f"{name}.safetensors"))
        if stored.keys() != tensors.keys():
            raise ValueError(f"EMA weights of {name!r} in {path} do not match the module's state keys")
        for key, value in tensors.items():
            value.copy_(stored[key])
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain values (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
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
