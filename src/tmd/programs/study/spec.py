"""The study file: its runs, seeds, evaluation and pairs, typed and checked (``tmd study --config``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from tmd.config import ConfigError, find_config, from_dict

TEACHER = "teacher"
# Set by the study for every run, so a run's ``config`` may not set them.
_STUDY_SET = ("method_name", "train.seed", "train.out_dir", "method.init_from")


@dataclass
class EvalSpec:
    noise_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Each seeds the noise of all 72 prompts: every row is scored on the same ``72 x len`` videos."""

    def __post_init__(self):
        if not self.noise_seeds or len(set(self.noise_seeds)) != len(self.noise_seeds):
            raise ValueError(f"noise_seeds must be distinct and at least one, got {self.noise_seeds}")


@dataclass
class DatasetSpec:
    """The world teacher's own samples (``tmd synthesize --model world``) for runs to train on: the paper's
    data (Sec. 4.1) in place of the world's. Every one of the world's 72 prompts ``videos_per_prompt`` times;
    the study makes it before the first run that needs it."""

    videos_per_prompt: int
    seed: int = 0
    """Sample i starts from noise seeded by ``seed + i``: keep it clear of the benchmark's noise seeds."""
    steps: Optional[int] = None
    """Teacher sampling steps; null: ``tmd synthesize``'s default (50)."""
    guidance: Optional[float] = None
    """CFG scale; null: the world's."""

    def __post_init__(self):
        if self.videos_per_prompt < 1:
            raise ValueError(f"videos_per_prompt must be >= 1, got {self.videos_per_prompt}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass
class RunSpec:
    method: str
    """A registered method name, or ``teacher`` (the world's teacher with its CFG, nothing trained)."""
    score: list[tuple[int, Optional[int]]] = field(default_factory=list)
    """Samplers to score, ``[M, N]`` (N null for methods without inner steps); empty: a stage that is only a parent."""
    config: dict[str, Any] = field(default_factory=dict)
    """Overrides of the study's ``base`` run config (nested mappings, like a ``tmd train`` YAML file)."""
    parent: Optional[str] = None
    """The run whose exported weights this one starts from (``method.init_from``), trained with the same seed."""
    seeds: Optional[list[int]] = None
    """Training seeds; default the study's."""
    label: Optional[str] = None
    """How tables and plots name the run (default its name)."""
    series: Optional[str] = None
    """Rows of one series are joined by a line in the quality-vs-NFE plot (default: the label)."""
    data: Optional[str] = None
    """A dataset of the study's ``datasets`` to train on (as ``data_kind: prepared``) in place of the world's data."""

    def __post_init__(self):
        from tmd.methods import METHODS

        if self.method != TEACHER and self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not registered; registered: {', '.join(sorted(METHODS))}, or 'teacher'")
        if self.method == TEACHER and (self.config or self.parent or self.seeds or self.data):
            raise ValueError("a teacher run takes only 'score' (the world's guidance and shift; nothing is trained)")
        if self.data is not None and "data_kind" in self.config:
            raise ValueError("config may not set data_kind where 'data' names a dataset: the run trains on that dataset")
        if self.method == TEACHER and not self.score:
            raise ValueError("a teacher run needs 'score': the step counts to evaluate, e.g. [[50, null], [4, null]]")
        for outer, inner in self.score:
            if outer < 1 or (inner is not None and inner < 1):
                raise ValueError(f"score entries are [M >= 1, N >= 1 or null], got [{outer}, {inner}]")
        if len(set(self.score)) != len(self.score):
            raise ValueError(f"score lists a sampler twice: {self.score}")
        for key in _STUDY_SET:
            section, _, name = key.partition(".")
            if (name and name in (self.config.get(section) or {})) or (not name and section in self.config):
                raise ValueError(f"config may not set {key}: the study sets it (seeds: 'seeds', stage 1 weights: 'parent')")


@dataclass
class PairSpec:
    a: str
    b: str
    """Row names; the report gives ``a - b`` paired by training seed."""


@dataclass
class StudyConfig:
    name: str
    runs: dict[str, RunSpec]
    description: str = ""
    version: int = 1
    """Part of every key: raise it to retrain everything after a code change that no config value shows."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval: EvalSpec = field(default_factory=EvalSpec)
    base: dict[str, Any] = field(default_factory=dict)
    """The run config every trained run starts from (``data_kind``, ``train``, shared ``method`` keys)."""
    paired: list[PairSpec] = field(default_factory=list)
    report_dir: str = "docs/study"
    seconds_per_sample: dict[str, float] = field(default_factory=dict)
    """Training seconds per iteration per batch element, by method: the dry run's and the ETA's estimate
    until this study's own records measure it."""
    checkpoint_every: int = 250
    """Iterations between a run's checkpoints, what an interrupted run resumes from (not part of any key)."""
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    """Teacher-sampled datasets by name, for runs' ``data``."""

    def __post_init__(self):
        if not self.runs:
            raise ValueError("a study needs at least one run")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        for name, spec in self.runs.items():
            if spec.data is not None and spec.data not in self.datasets:
                known = ", ".join(self.datasets) or "none"
                raise ValueError(f"runs.{name}.data {spec.data!r} is not one of the study's datasets ({known})")
            if spec.parent is not None and spec.parent not in self.runs:
                raise ValueError(f"runs.{name}.parent {spec.parent!r} is not a run of this study")
            if spec.parent is not None and self.runs[spec.parent].method == TEACHER:
                raise ValueError(f"runs.{name}.parent: the teacher is not trained and has no weights to start from")
            missing = set(self.run_seeds(name)) - set(self.run_seeds(spec.parent)) if spec.parent else set()
            if missing:
                raise ValueError(f"runs.{name} has seeds {sorted(missing)} that its parent {spec.parent!r} does not")
        rows = row_names(self)
        for pair in self.paired:
            for side in (pair.a, pair.b):
                if side not in rows:
                    raise ValueError(f"paired: {side!r} is not a row; rows: {', '.join(rows)}")
                if rows[side][0].method == TEACHER:
                    raise ValueError(f"paired: {side!r} is a teacher row, which has no training seeds to pair by")

    def run_seeds(self, name: str) -> list[int | None]:
        spec = self.runs[name]
        return [None] if spec.method == TEACHER else list(spec.seeds or self.seeds)


def row_names(study: StudyConfig) -> dict[str, tuple[RunSpec, str, tuple[int, int | None]]]:
    """Every scored sampler by row name: the run's name, or ``name@M`` / ``name@MxN`` when it scores several."""
    rows = {}
    for name, spec in study.runs.items():
        for outer, inner in spec.score:
            row = name if len(spec.score) == 1 else f"{name}@{outer}" + (f"x{inner}" if inner is not None else "")
            rows[row] = (spec, name, (outer, inner))
    return rows


def load_study(path: str | Path) -> tuple[StudyConfig, Path]:
    path = find_config(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return from_dict(StudyConfig, data or {}, source=str(path)), path
