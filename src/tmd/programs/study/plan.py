"""Every (run, training seed) of a study keyed by what decides its record; its record; what remains to run here."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tmd.config import ConfigError, RunConfig, from_dict, to_dict
from tmd.programs.study.spec import TEACHER, DatasetSpec, RunSpec, StudyConfig

# Left out of a run's key: where it is written and how it shows progress change nothing it records.
# init_from is replaced by the parent's key, data.assets by the assets' fingerprint.
_UNKEYED = {
    "train": (
        "out_dir",
        "progress",
        "tensorboard",
        "wandb",
        "wandb_project",
        "checkpoint_every",
        "keep_checkpoints",
        # sample videos change no weight (tested), and runs keyed before they existed keep their keys
        "sample_every",
        "sample_prompts",
        "sample_seed",
    ),
    "method": ("init_from",),
    "data": ("assets",),
}


@dataclass
class Dataset:
    """A study dataset as the plan resolves it: keyed by its settings, the study's version and the world's
    assets, whose teacher samples it."""

    name: str
    key: str
    spec: DatasetSpec
    assets: str | None

    def folder(self, work: Path) -> Path:
        return work / "data" / f"{self.name}-{self.key}"


@dataclass
class Run:
    name: str
    seed: int | None
    key: str
    spec: RunSpec
    config: dict[str, Any] | None
    """The resolved run config as plain data, without init_from and out_dir (None for the teacher); a run on
    a dataset has ``data_kind: prepared`` and ``data.path`` null until the work folder is known."""
    parent: Optional[Run] = None
    dataset: Optional[Dataset] = None

    @property
    def display(self) -> str:
        seed = "" if self.seed is None else f" seed {self.seed}"
        return f"{self.name}{seed} ({self.key[:8]})"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else copy.deepcopy(v)
    return merged


def assets_fingerprint(path: str | Path | None) -> str:
    """Hash of every file of the world assets folder: a retrained teacher or autoencoder changes every key."""
    from tmd.world.data import assets_dir

    root = assets_dir(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _keyed(config: dict[str, Any]) -> dict[str, Any]:
    keyed = copy.deepcopy(config)
    for section, names in _UNKEYED.items():
        for name in names:
            (keyed.get(section) or {}).pop(name, None)
    return keyed


def _hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def plan(study: StudyConfig, source: str = "study") -> list[Run]:
    """Every (run, seed) of the study, parents before children; runs with equal keys are one run."""
    fingerprints: dict[Any, str] = {}
    runs: dict[tuple[str, int | None], Run] = {}
    datasets: dict[tuple[str, Any], Dataset] = {}
    evaluation = {"noise_seeds": study.eval.noise_seeds}

    def fingerprint(assets: str | None) -> str:
        if assets not in fingerprints:
            fingerprints[assets] = assets_fingerprint(assets)
        return fingerprints[assets]

    def dataset(name: str, assets: str | None) -> Dataset:
        if (name, assets) not in datasets:
            spec = study.datasets[name]
            payload = {"version": study.version, "dataset": dataclasses.asdict(spec), "assets": fingerprint(assets)}
            datasets[(name, assets)] = Dataset(name, _hash(payload), spec, assets)
        return datasets[(name, assets)]

    def build(name: str, seed: int | None) -> Run:
        if (name, seed) in runs:
            return runs[(name, seed)]
        spec = study.runs[name]
        parent = build(spec.parent, seed) if spec.parent else None
        payload: dict[str, Any] = {"version": study.version, "eval": {**evaluation, "score": [list(s) for s in spec.score]}}
        config, data_set = None, None
        if spec.method == TEACHER:
            assets = (study.base.get("data") or {}).get("assets")
            payload["teacher"] = True
        else:
            data = _merge(study.base, spec.config)
            data["method_name"] = spec.method
            data.setdefault("train", {})["seed"] = seed
            config = to_dict(from_dict(RunConfig, data, source=f"{source} runs.{name}"))
            if config["data_kind"] != "world":
                raise ConfigError(
                    f"{source} runs.{name}: a study scores on the world's benchmark; data_kind must be 'world' "
                    "(a run trains on the teacher's samples with 'data: <one of datasets>')"
                )
            assets = config["data"]["assets"]
            if spec.data is not None:
                data_set = dataset(spec.data, assets)
                config["data_kind"] = "prepared"
                config["data"] = {"path": None, "linearised_teacher": config["data"]["linearised_teacher"]}
                payload["dataset"] = data_set.key
            payload.update(config=_keyed(config), parent=parent.key if parent else None)
        payload["assets"] = fingerprint(assets)
        runs[(name, seed)] = Run(name, seed, _hash(payload), spec, config, parent, data_set)
        return runs[(name, seed)]

    for name in study.runs:
        for seed in study.run_seeds(name):
            build(name, seed)
    return list(runs.values())


def datasets_to_make(todo: list[Task], work: Path) -> list[Dataset]:
    """The datasets the tasks train on that this machine lacks (complete: its ``index.json`` is written last)."""
    from tmd.data.prepare import INDEX_FILE

    needed = {t.run.dataset.key: t.run.dataset for t in todo if t.run.dataset is not None}
    return [d for d in needed.values() if not (d.folder(work) / INDEX_FILE).is_file()]


def record_path(records: Path, key: str) -> Path:
    return records / f"{key}.json"


def read_records(records: Path, keys: list[str]) -> dict[str, dict[str, Any]]:
    return {k: json.loads(record_path(records, k).read_text()) for k in keys if record_path(records, k).is_file()}


def write_json(path: Path, data: Any) -> None:
    """Atomically: a killed study never leaves a half-written record that would read as finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


@dataclass
class Task:
    run: Run
    kind: str
    """``train`` (train, score, record), ``weights`` (retrain a recorded parent for a child; its record is
    kept) or ``teacher`` (score the teacher, record)."""
    estimate_s: float


def weights_path(work: Path, key: str) -> Path:
    from tmd.train.run import STUDENT_FILE

    return work / key / STUDENT_FILE


def tasks(runs: list[Run], records: Path, work: Path, estimate) -> list[Task]:
    """What remains, in the order to start it. A recorded run needs nothing, unless a child still to train
    needs its weights and this machine lacks them."""
    todo: dict[str, Task] = {}
    for run in runs:
        if run.key not in todo and not record_path(records, run.key).is_file():
            todo[run.key] = Task(run, TEACHER if run.spec.method == TEACHER else "train", 0.0)

    def needweights_path(run: Run) -> None:
        parent = run.parent
        if parent is None or parent.key in todo or weights_path(work, parent.key).is_file():
            return
        todo[parent.key] = Task(parent, "weights", 0.0)
        needweights_path(parent)

    for task in list(todo.values()):
        needweights_path(task.run)
    order: dict[str, int] = {}
    for i, run in enumerate(runs):
        order.setdefault(run.key, i)
    # parents first: they hold up their children, and a study whose last runs wait on a stage 1 idles a job
    parents = {t.run.parent.key for t in todo.values() if t.run.parent is not None}
    pending = sorted(todo.values(), key=lambda t: (t.run.key not in parents, order[t.run.key]))
    for task in pending:
        task.estimate_s = estimate(task)
    return pending


def estimator(study: StudyConfig, records: dict[str, dict[str, Any]]):
    """Seconds a task will take: training from seconds per sample (measured by this study's records where
    there are some, else the study file's ``seconds_per_sample``), scoring and start-up from rough constants."""
    measured: dict[str, list[float]] = {}
    for rec in records.values():
        if rec.get("method") != TEACHER and rec["wall_seconds"].get("train"):
            train = rec["config"]["train"]
            measured.setdefault(rec["method"], []).append(rec["wall_seconds"]["train"] / (train["steps"] * train["batch_size"]))
    rates = {**study.seconds_per_sample, **{m: sum(v) / len(v) for m, v in measured.items()}}
    fallback = max(rates.values(), default=0.04)

    def estimate(task: Task) -> float:
        spec, noise = task.run.spec, len(study.eval.noise_seeds)
        if spec.method == TEACHER:
            return sum(noise * 72 * 0.008 * steps for steps, _ in spec.score)  # ~8 ms per video per CFG step, batch 72
        train = task.run.config["train"]
        seconds = 10 + train["steps"] * train["batch_size"] * rates.get(spec.method, fallback)
        if train.get("eval_every"):
            seconds += (train["steps"] // train["eval_every"] + 1) * 1.5
        return seconds if task.kind == "weights" else seconds + 2.0 * noise * len(spec.score)

    return estimate


def select(runs: list[Run], only: list[str] | None, study: StudyConfig, seeds: list[int] | None = None) -> list[Run]:
    """The runs ``--only`` names (default all) at the training seeds ``--seeds`` names (default all; the
    teacher has none and stays), with the parents they start from."""
    if not only and not seeds:
        return runs
    unknown = [n for n in only or [] if n not in study.runs]
    if unknown:
        raise ConfigError(f"--only: {', '.join(unknown)} not in the study; runs: {', '.join(study.runs)}")
    foreign = [s for s in seeds or [] if s not in study.seeds]
    if foreign:
        raise ConfigError(f"--seeds: {', '.join(map(str, foreign))} not among the study's seeds {study.seeds}")
    keep: set[str] = set()
    for run in runs:
        if (not only or run.name in only) and (not seeds or run.seed is None or run.seed in seeds):
            while run is not None:
                keep.add(run.key)
                run = run.parent
    return [r for r in runs if r.key in keep]
