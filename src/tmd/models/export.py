"""A student written as a self-describing folder (``tmd.models.folder``), and a training run's weights
read back into the model they came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tmd import flow
from tmd.files import check_safetensors, make_output_dir, save_safetensors, share_like_other_files
from tmd.models.anyflow import AnyFlowStudent
from tmd.models.experts import student_expert
from tmd.models.folder import (
    ANYFLOW_KEYS,
    CONFIG_FILE,
    PARTS_FILE,
    SPLIT_DEFAULTS_OF_OLD_EXPORTS,
    STUDENT_SPLIT_KEYS,
    TMD_PARTS,
    TRANSFORMER_DIR,
)
from tmd.models.split import TMDStudent
from tmd.models.wan import WanTeacher


def export_student(
    student, path: str | Path, teacher_source: str | Path | None = None, method: dict[str, Any] | None = None
) -> Path:
    """Write ``student`` (a ``TMDStudent`` or a few-step ``WanTeacher``) as a student folder at ``path``.

    ``teacher_source`` (the teacher's diffusers pipeline root) is recorded, as an absolute path so that
    generation from any working directory can find the text encoder and VAE the student was distilled with.
    ``method`` (``{"name": ..., "config": {...}}`` of the run) is recorded for a few-step generator: methods
    that train one sample it differently (rCM's stochastic steps on its own times), so generation asks the
    method that trained it rather than assuming DMD2-v's deterministic steps.
    """
    path = Path(path)
    if isinstance(student, TMDStudent):
        config: dict[str, Any] = {
            "kind": "tmd_student",
            "head_blocks": student.head_blocks,
            "fusion": student.fusion_kind,
            "inner_velocity": student.inner_velocity,
            "transition_target": student.transition_target,
        }
    elif isinstance(student, WanTeacher):
        config = {"kind": "few_step", "method": method}
    elif isinstance(student, AnyFlowStudent):
        config = {"kind": "anyflow"}
    else:
        raise TypeError(
            f"can export a TMDStudent, an AnyFlowStudent or a WanTeacher-style few-step generator, got {type(student).__name__}"
        )
    make_output_dir(path)
    student.transformer.save_pretrained(path / TRANSFORMER_DIR, safe_serialization=True)
    share_like_other_files(path / TRANSFORMER_DIR)
    if config["kind"] == "tmd_student":
        parts = {
            f"{name}.{key}": value.detach().contiguous().cpu()
            for name in TMD_PARTS
            for key, value in getattr(student, name).state_dict().items()
        }
        save_safetensors(parts, path / PARTS_FILE)
    config["transformer"] = {k: v for k, v in student.transformer.config.items() if not k.startswith("_")}
    config["teacher"] = None if teacher_source is None else str(Path(teacher_source).resolve())
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def save_run_weights(path: str | Path, state: dict[str, Tensor], method: str, method_config: dict[str, Any]) -> None:
    """Write a run's generator weights as ``tmd train`` exports them, read back by :func:`run_metadata` and
    :func:`student_from_run`: the split (head_blocks, fusion) is not visible in the parameter names, so
    it travels as metadata with the method's name and config."""
    metadata = {"method": method, "method_config": json.dumps(method_config)}
    save_safetensors({k: v.detach().contiguous() for k, v in state.items()}, path, metadata=metadata)


def run_metadata(weights: str | Path) -> dict[str, str]:
    """The metadata ``tmd train`` writes into ``student.safetensors`` (method name and config)."""
    from safetensors import safe_open

    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"no student weights at {weights}")
    check_safetensors(weights)
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "method_config" not in metadata:
        raise ValueError(f"{weights} has no method_config metadata: it was not written by tmd train")
    return metadata


def student_from_run(weights: str | Path, teacher: WanTeacher) -> tuple[WanTeacher, dict[str, Any]]:
    """The generator a run trained, rebuilt around ``teacher`` (consumed: it becomes the student) with the
    run's weights, and the run's method config.

    The run's metadata decides the kind: a method config with ``head_blocks`` made a TMD student, one with
    AnyFlow's ``gate_value`` and ``deltatime_type`` an AnyFlow student; any other generator must be a plain Wan transformer of the teacher's shape (a few-step generator).
    """
    metadata = run_metadata(weights)
    method_config = json.loads(metadata["method_config"])
    split = {k: method_config[k] for k in STUDENT_SPLIT_KEYS if k in method_config}
    if "head_blocks" in split:
        split = {**SPLIT_DEFAULTS_OF_OLD_EXPORTS, **split}
    # a Wan2.2 A14B teacher: the student was cut from the expert of its outer times (tmd.models.experts)
    teacher = student_expert(teacher, method_config.get("outer_steps", 2), method_config.get("outer_shift", flow.OUTER_SHIFT))
    if "head_blocks" in split:
        model = TMDStudent.from_teacher(teacher, **split)
    elif all(key in method_config for key in ANYFLOW_KEYS):
        split = {key: method_config[key] for key in ANYFLOW_KEYS}
        model = AnyFlowStudent.from_teacher(teacher, **split)
    else:
        model = teacher
    try:
        load_student_weights(model, str(weights), split)
    except ValueError as e:
        raise ValueError(f"cannot use the {metadata.get('method')!r} run: {e}") from None
    return model, method_config


def load_student_weights(student: nn.Module, path: str, expect: dict | None = None) -> None:
    """Initialise from an earlier stage's exported weights (safetensors only), naming what does not fit.

    ``expect`` holds settings the export must have been made with (e.g. head_blocks): they are not
    visible in parameter names, so the export carries them as metadata.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as handle:
        exported = json.loads((handle.metadata() or {}).get("method_config", "{}"))
    exported = {**SPLIT_DEFAULTS_OF_OLD_EXPORTS, **exported} if "head_blocks" in exported else exported
    for key, value in (expect or {}).items():
        if key in exported and exported[key] != value:
            raise ValueError(f"{path} was trained with {key}={exported[key]!r}, this student has {key}={value!r}")
    state, own = load_file(path), student.state_dict()
    # load_state_dict reports these as a RuntimeError listing every tensor; one line that names the file reads better
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path} does not fit this student: shapes differ (file vs model) for {wrong[:3]}")
    result = student.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit this student: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
