"""Self-describing student folders: what ``tmd generate`` loads without the training run.

A TMD student folder holds ``config.json`` (kind ``"tmd_student"``, the split, the transformer config
and the teacher it came from), ``transformer/`` (backbone + head, written by diffusers'
``save_pretrained`` so the keys are the teacher's diffusers names and any Wan tool can read them) and
``tmd_parts.safetensors`` (the parameters TMD adds). A plain few-step generator (DMD2, ...) is a
Wan transformer, so its folder is ``config.json`` (kind ``"few_step"``) plus ``transformer/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tmd.files import check_output_dir, check_safetensors, make_output_dir, save_safetensors, share_like_other_files
from tmd.models.wan import WanTeacher

CONFIG_FILE = "config.json"
TRANSFORMER_DIR = "transformer"
PARTS_FILE = "tmd_parts.safetensors"
TMD_PARTS = ("inner_block", "fusion", "gap_embedder")
"""The TMDStudent submodules that are not part of the teacher's transformer."""
STUDENT_KINDS = ("tmd_student", "few_step")
STUDENT_SPLIT_KEYS = ("head_blocks", "fusion", "inner_velocity", "transition_target")
"""TMD student settings a run's method config records and a student must be rebuilt with."""
SPLIT_DEFAULTS_OF_OLD_EXPORTS = {"inner_velocity": "implied", "transition_target": "difference"}
"""What runs and folders written before a setting was recorded were trained with."""


def export_student(student, path: str | Path, teacher_source: str | Path | None = None) -> Path:
    """Write ``student`` (a ``TMDStudent`` or a few-step ``WanTeacher``) as a student folder at ``path``.

    ``teacher_source`` (the teacher's diffusers pipeline root) is recorded, as an absolute path so that
    generation from any working directory can find the text encoder and VAE the student was distilled with.
    """
    from tmd.models.split import TMDStudent

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
        config = {"kind": "few_step"}
    else:
        raise TypeError(f"can export a TMDStudent or a WanTeacher-style few-step generator, got {type(student).__name__}")
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


EXPORT_FORMATS = ("student", "pipeline")
SAMPLING_KEYS = {
    "outer_steps": "num_outer_steps",
    "inner_steps": "num_inner_steps",
    "outer_shift": "outer_shift",
    "inner_shift": "inner_shift",
}
"""Method config keys a pipeline export records as its sampling defaults (``tmd.pipelines``), by their names there."""


def export_run(weights: str | Path, teacher: str | Path, path: str | Path, format: str = "student") -> Path:
    """Turn a training run's ``student.safetensors`` (``tmd.train.run``) into a student folder, or with
    ``format="pipeline"`` into a diffusers pipeline folder (``tmd.pipelines.export_pipeline``)."""
    from tmd.models.wan import load_teacher

    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {list(EXPORT_FORMATS)}, got {format!r}")
    check_output_dir(path)
    model, method_config = student_from_run(weights, load_teacher(teacher))
    if format == "pipeline":
        from tmd.pipelines import export_pipeline

        sampling = {name: method_config[key] for key, name in SAMPLING_KEYS.items() if key in method_config}
        return export_pipeline(model, path, teacher, sampling)
    return export_student(model, path, teacher_source=str(teacher))


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

    The run's metadata decides the kind: a method config with ``head_blocks`` made a TMD student; any
    other generator must be a plain Wan transformer of the teacher's shape (a few-step generator).
    """
    from tmd.methods.common import load_student_weights
    from tmd.models.split import TMDStudent

    metadata = run_metadata(weights)
    method_config = json.loads(metadata["method_config"])
    split = {k: method_config[k] for k in STUDENT_SPLIT_KEYS if k in method_config}
    if "head_blocks" in split:
        split = {**SPLIT_DEFAULTS_OF_OLD_EXPORTS, **split}
    model = TMDStudent.from_teacher(teacher, **split) if "head_blocks" in split else teacher
    try:
        load_student_weights(model, str(weights), split)
    except ValueError as e:
        raise ValueError(f"cannot use the {metadata.get('method')!r} run: {e}") from None
    return model, method_config


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
