"""Students as diffusers pipeline folders: ``TMDPipeline`` for TMD students, stock ``WanPipeline`` for DMD2-v,
stock ``AnyFlowPipeline`` for AnyFlow (its transformer is diffusers' own class; ``FlowMapEulerDiscreteScheduler``
with AnyFlow's shift gives our sampler's grid exactly).

A plain few-step student (DMD2-v) samples with Eq. 18's deterministic step, which is the Euler step
``x - (t - t') v``: exactly what ``FlowMatchEulerDiscreteScheduler.step`` does. What needs care is the
grid, ``tmd.flow.outer_grid`` (2 steps: 0.999, 0.909, 0), because ``WanPipeline`` only calls
``set_timesteps(num_inference_steps)`` and the scheduler's own grids start at 1:

- 1 or 2 steps: ``use_karras_sigmas`` with ``sigma_max`` and ``sigma_min`` in the scheduler config. The
  Karras conversion of ``FlowMatchEulerDiscreteScheduler`` reads those two keys from its config (diffusers
  marks it "a hack"; on load it warns that they "will be ignored", which is not so) and its end points
  are the whole grid for one or two steps: the grid is ours to the bit (tested).
- 3 or more steps: no stock setting gives it; the closest found is ``shift_terminal`` at the last
  positive time with the ``shift`` fitted to the interior points. It starts at 1 instead of 0.999;
  ``tmd_student.json`` records both grids.

Both folders take the teacher pipeline's ``vae``, ``text_encoder`` and ``tokenizer`` as they are (files
hard-linked where the file system allows, else copied).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import FlowMapEulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from tmd import flow
from tmd.files import check_output_dir
from tmd.methods import METHODS
from tmd.methods.anyflow import AnyFlow
from tmd.models.anyflow import AnyFlowStudent
from tmd.models.export import export_student, run_metadata, student_from_run
from tmd.models.split import TMDStudent
from tmd.models.wan import WanTeacher, load_teacher
from tmd.pipelines.tmd_pipeline import TMDParts, TMDPipeline

FEW_STEP_FILE = "tmd_student.json"
"""Written into a few-step student's ``WanPipeline`` folder: what ``tmd generate`` recognises it by."""
SHARED_COMPONENTS = ("vae", "text_encoder", "tokenizer")
INDEX_FILE = "model_index.json"


def few_step_scheduler(steps: int, shift: float = flow.OUTER_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """A stock ``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps(steps)`` gives the outer grid
    (exactly for 1 or 2 steps, closest found otherwise; see the module docstring)."""
    grid = flow.outer_grid(steps, shift)
    if steps <= 2:
        config = {"shift": 1.0, "use_karras_sigmas": True, "sigma_max": float(grid[0]), "sigma_min": float(grid[-2])}
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    from scipy.optimize import minimize_scalar

    def scheduler(log_shift: float) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(shift=math.exp(log_shift), shift_terminal=float(grid[-2]))

    def interior_error(log_shift: float) -> float:
        return float((scheduler_grid(scheduler(log_shift), steps)[1:-2] - grid[1:-2]).pow(2).sum())

    return scheduler(minimize_scalar(interior_error, bounds=(0.0, math.log(1e4)), method="bounded").x)


def scheduler_grid(scheduler, steps: int) -> torch.Tensor:
    """The sigmas (terminal 0 included) ``scheduler`` steps through for ``steps`` steps, in float64."""
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double()


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def export_pipeline(model, path: str | Path, teacher: str | Path, sampling: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a ``TMDStudent``, an ``AnyFlowStudent`` or a few-step ``WanTeacher``) as a diffusers pipeline folder.

    ``teacher`` is the diffusers Wan pipeline root it was distilled from. ``sampling`` holds the run's
    ``num_outer_steps`` (both kinds), ``num_inner_steps``, ``outer_shift`` and ``inner_shift`` (TMD):
    the TMD pipeline's call defaults, the few-step scheduler's grid.
    """
    sampling = dict(sampling or {})
    teacher, path = Path(teacher), Path(path)
    index_file = teacher / INDEX_FILE
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{teacher} has no {INDEX_FILE}: a pipeline export takes its vae, text_encoder and tokenizer from the "
            "teacher's diffusers Wan pipeline root"
        )
    teacher_index = json.loads(index_file.read_text())
    missing = [name for name in SHARED_COMPONENTS if name not in teacher_index or not (teacher / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"the teacher pipeline {teacher} lacks {missing}")
    if not isinstance(model, (TMDStudent, WanTeacher, AnyFlowStudent)):
        raise TypeError(
            f"can export a TMDStudent, an AnyFlowStudent or a WanTeacher-style few-step generator, got {type(model).__name__}"
        )

    path.mkdir(parents=True, exist_ok=True)
    for name in SHARED_COMPONENTS:
        shutil.copytree(teacher / name, path / name, copy_function=_link_or_copy, dirs_exist_ok=True)
    model.transformer.save_pretrained(path / "transformer", safe_serialization=True)
    shared = {name: teacher_index[name] for name in SHARED_COMPONENTS}
    if isinstance(model, AnyFlowStudent):
        return _anyflow_index(path, shared, sampling.get("outer_shift", AnyFlow.Config.outer_shift))
    transformer = ["diffusers", "WanTransformer3DModel"]
    if isinstance(model, TMDStudent):
        TMDParts.from_student(model, **sampling).save_pretrained(path / "tmd_parts")
        index = {
            "_class_name": TMDPipeline.__name__,
            "_diffusers_version": diffusers.__version__,
            **shared,
            "transformer": transformer,
            "tmd_parts": [TMDParts.__module__, TMDParts.__name__],
        }
    else:
        steps, shift = sampling.get("num_outer_steps", 2), sampling.get("outer_shift", flow.OUTER_SHIFT)
        scheduler = few_step_scheduler(steps, shift)
        scheduler.save_pretrained(path / "scheduler")
        index = {
            **teacher_index,
            **shared,
            "_class_name": "WanPipeline",
            "_diffusers_version": diffusers.__version__,
            "transformer": transformer,
            "scheduler": ["diffusers", type(scheduler).__name__],
        }
        if "transformer_2" in teacher_index:  # a Wan2.2 A14B teacher: the student is one transformer
            index.update(transformer_2=[None, None], boundary_ratio=None)
        record = {
            "kind": "few_step",
            "num_outer_steps": steps,
            "outer_shift": shift,
            "teacher": str(teacher),
            "grid": flow.outer_grid(steps, shift).tolist(),
            "scheduler_grid": scheduler_grid(scheduler, steps).tolist(),
        }
        (path / FEW_STEP_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return path


def _anyflow_index(path: Path, shared: dict[str, Any], shift: float) -> Path:
    """The rest of an ``AnyFlowPipeline`` folder: its scheduler and ``model_index.json``."""
    FlowMapEulerDiscreteScheduler(shift=shift).save_pretrained(path / "scheduler")
    index = {
        "_class_name": "AnyFlowPipeline",
        "_diffusers_version": diffusers.__version__,
        **shared,
        "transformer": ["diffusers", "AnyFlowTransformer3DModel"],
        "scheduler": ["diffusers", "FlowMapEulerDiscreteScheduler"],
    }
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return path


def is_anyflow_pipeline(path: str | Path) -> bool:
    index = Path(path) / INDEX_FILE
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "AnyFlowPipeline"


def is_few_step_pipeline(path: str | Path) -> bool:
    return (Path(path) / FEW_STEP_FILE).is_file() and (Path(path) / INDEX_FILE).is_file()


def is_tmd_pipeline(path: str | Path) -> bool:
    index = Path(path) / INDEX_FILE
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "TMDPipeline"


EXPORT_FORMATS = ("student", "pipeline")
SAMPLING_KEYS = {
    "outer_steps": "num_outer_steps",
    "inner_steps": "num_inner_steps",
    "outer_shift": "outer_shift",
    "inner_shift": "inner_shift",
}
"""Method config keys a pipeline export records as its sampling defaults (``TMDPipeline``), by their names there."""


def export_run(weights: str | Path, teacher: str | Path, path: str | Path, format: str = "student") -> Path:
    """Turn a training run's ``student.safetensors`` (``tmd.train.run``) into a student folder, or with
    ``format="pipeline"`` into a diffusers pipeline folder (``export_pipeline``)."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {list(EXPORT_FORMATS)}, got {format!r}")
    check_output_dir(path)
    method = run_metadata(weights).get("method")
    if method in METHODS and not METHODS[method].exports_student_folder:
        raise ValueError(
            f"{weights}: a {method} run has no student folder form ({METHODS[method].__name__}.exports_student_folder)"
        )
    model, method_config = student_from_run(weights, load_teacher(teacher, experts=None))
    if format == "pipeline":
        cls = METHODS.get(method)
        if isinstance(model, WanTeacher) and cls is not None and not cls.runs_in_stock_pipeline(cls.Config(**method_config)):
            raise ValueError(
                f"{weights}: a {method} student samples with fresh noise at each step ({cls.__name__}.sample), which a "
                "stock WanPipeline does not do; export it with --format student and sample it with tmd generate"
            )
        sampling = {name: method_config[key] for key, name in SAMPLING_KEYS.items() if key in method_config}
        return export_pipeline(model, path, teacher, sampling)
    return export_student(model, path, teacher_source=str(teacher), method={"name": method, "config": method_config})
