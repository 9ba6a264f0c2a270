"""What a run folder holds besides checkpoints, and what ``--resume`` may change.

A run folder keeps the config it was started with in ``config.yaml``, never rewritten. A resume builds
its models from the config it is given, so one whose model or method differs would load the
checkpoint into another model (parameter names do not show ``head_blocks``) or continue it with
another recipe; both are refused, naming each key with both values. Keys that only say how long to
train, how often to log or checkpoint, where to report or how much memory to trade for compute
(``SAFE_TO_CHANGE``) may change; each resume appends the step it resumed from and what changed to
``config_history.jsonl``. Keys are compared as the resolved configs' flattened plain data, so a key a
later version of tmd adds is refused until it is whitelisted here.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tmd.config import save_config, to_dict
from tmd.errors import ResumeError
from tmd.train import checkpoint as ckpt

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"
CHECKPOINT_DIR = "checkpoints"

SAFE_TO_CHANGE = frozenset(
    {
        "train.steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.eval_every",
        "train.eval_videos",
        "train.sample_every",
        "train.sample_prompts",
        "train.sample_seed",
        "train.progress",
        "train.tensorboard",
        "train.wandb",
        "train.wandb_project",
        # recomputes the same activations (RNG state included) for less memory: the result is unchanged
        "train.activation_checkpointing",
        # the folder being resumed, however it is spelled (relative to another working directory, ...)
        "train.out_dir",
    }
)
"""Keys a resume may change. Not ``train.device``: the checkpoint's generator state is a CPU or a CUDA
generator's and does not load into the other, and the run would not continue the same random streams."""

_ABSENT = object()


@dataclass
class ResumePlan:
    checkpoint: Path
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Safe keys whose value differs from the run's: (the run's, the new)."""


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values; lists and empty mappings are leaves."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _show(value: Any) -> str:
    return "(not set)" if value is _ABSENT else json.dumps(value)


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's config as it stands now: ``config.yaml`` with every recorded resume's changes applied."""
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise ResumeError(
            f"{run_dir} holds checkpoints but no {CONFIG_FILE}, so a resume cannot be checked against the config "
            f"the run was started with; put its {CONFIG_FILE} back or start a new run in another train.out_dir"
        )
    current = flatten(yaml.safe_load(config_file.read_text()) or {})
    history = run_dir / HISTORY_FILE
    if history.is_file():
        for line in history.read_text().splitlines():
            if line.strip():
                current.update({key: new for key, (_, new) in json.loads(line)["changes"].items()})
    return current


def plan_run(cfg: Any, run_dir: str | Path, resume: bool) -> ResumePlan | None:
    """None for a fresh run; for a resume, the checkpoint to load and the safe changes. Raises (writing
    nothing) for a folder that holds checkpoints without ``resume``, or a resume with a changed config."""
    run_dir = Path(run_dir)
    latest = ckpt.latest_checkpoint(run_dir / CHECKPOINT_DIR)
    if latest is None:
        return None
    if not resume:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints (latest {latest.name}); "
            "resume it (resume=True / --resume) or choose another train.out_dir"
        )
    before, now = run_config(run_dir), flatten(to_dict(cfg))
    changed = {
        key: (before.get(key, _ABSENT), now.get(key, _ABSENT))
        for key in sorted(before.keys() | now.keys())
        if before.get(key, _ABSENT) != now.get(key, _ABSENT)
    }
    refused = {key: values for key, values in changed.items() if key not in SAFE_TO_CHANGE}
    if refused:
        diff = "; ".join(f"{key}: {_show(a)} in the run, {_show(b)} now" for key, (a, b) in refused.items())
        raise ResumeError(
            f"cannot resume {run_dir} with a changed config ({diff}): these change the model or the training; "
            f"resume with the run's values ({run_dir / CONFIG_FILE}) or start a new run in another train.out_dir "
            f"(a resume may change {', '.join(sorted(SAFE_TO_CHANGE))})"
        )
    return ResumePlan(latest, changed)


def start_fresh(cfg: Any, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    # a history left by an earlier start that never checkpointed describes resumes of another run
    (run_dir / HISTORY_FILE).unlink(missing_ok=True)


def record_resume(run_dir: Path, step: int, plan: ResumePlan) -> None:
    record = {
        "resumed_from_step": step,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "changes": {key: [None if a is _ABSENT else a, None if b is _ABSENT else b] for key, (a, b) in plan.changes.items()},
    }
    with open(run_dir / HISTORY_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
