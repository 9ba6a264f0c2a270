"""The layout of a student folder and its ``config.json``, read and checked.

A TMD student folder holds ``config.json`` (kind ``"tmd_student"``, the split, the transformer config
and the teacher it came from), ``transformer/`` (backbone + head, written by diffusers'
``save_pretrained`` so the keys are the teacher's diffusers names and any Wan tool can read them) and
``tmd_parts.safetensors`` (the parameters TMD adds). A plain few-step generator (DMD2, ...) is a
Wan transformer, so its folder is ``config.json`` (kind ``"few_step"``) plus ``transformer/``; an AnyFlow
student's is the same with kind ``"anyflow"`` and diffusers' ``AnyFlowTransformer3DModel`` in ``transformer/``.
``tmd.models.export`` writes them; ``TMDStudent.from_pretrained`` and ``tmd generate`` read them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tmd.files import check_safetensors

CONFIG_FILE = "config.json"
TRANSFORMER_DIR = "transformer"
PARTS_FILE = "tmd_parts.safetensors"
TMD_PARTS = ("inner_block", "fusion", "gap_embedder")
"""The TMDStudent submodules that are not part of the teacher's transformer."""
STUDENT_KINDS = ("tmd_student", "few_step", "anyflow")
STUDENT_SPLIT_KEYS = ("head_blocks", "fusion", "inner_velocity", "transition_target")
"""TMD student settings a run's method config records and a student must be rebuilt with."""
SPLIT_DEFAULTS_OF_OLD_EXPORTS = {"inner_velocity": "implied", "transition_target": "difference"}
"""What runs and folders written before a setting was recorded were trained with."""
ANYFLOW_KEYS = ("gate_value", "deltatime_type")
"""An AnyFlow student's settings that a run's method config records (``tmd.models.anyflow``)."""


def read_student_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a student folder, checked; errors say what the folder looks like instead."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"student folder {path} does not exist")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        pipeline_root = (path / "model_index.json").is_file()
        hint = " (it looks like a diffusers pipeline root: load it as a teacher)" if pipeline_root else ""
        raise FileNotFoundError(f"{path} is not a student folder: no {CONFIG_FILE}{hint}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind not in STUDENT_KINDS:
        raise ValueError(f"{config_file} has kind {kind!r}; a student folder has kind one of {list(STUDENT_KINDS)}")
    required = [TRANSFORMER_DIR] + ([PARTS_FILE] if kind == "tmd_student" else [])
    missing = [name for name in required if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(f"student folder {path} is incomplete: missing {missing}")
    if kind == "tmd_student":
        check_safetensors(path / PARTS_FILE)
    return config


def is_student_folder(path: str | Path) -> bool:
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text()).get("kind") in STUDENT_KINDS
    except (json.JSONDecodeError, AttributeError):
        return False
