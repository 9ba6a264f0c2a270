"""``tmd study``: a declared table of training runs, each trained once, scored alike, and reported with intervals.

A study file (``src/tmd/configs/study_*.yaml``) declares named runs: a method (any registered one, or
``teacher``), config overrides on the study's ``base`` run config, the training seeds, the (M, N) samplers
to score and, for a stage-2 run, the ``parent`` whose exported weights become its ``method.init_from``.
Each (run, training seed) is keyed by a hash of everything that decides its record: the resolved config
(paths and display settings left out), its parent's key, the evaluation spec, the world assets' bytes and
the study's ``version``. Equal keys are one run, so stage-2 runs whose stage-1 configs are identical share it.

A run is finished when ``<records>/<key>.json`` exists (committed: config, scores per evaluation noise
seed, the training curve, wall time, machine, git commit); weights stay in ``<work>/<key>/``. So a stopped
study resumes, a finished run is never retrained, and a study that still has to train a stage-2 run on a
machine without its stage-1 weights retrains that stage 1 for its weights (keeping its record). A run in
flight checkpoints every ``checkpoint_every`` iterations into ``<work>/<key>/checkpoints`` and continues
from its last checkpoint the next time the study starts, to the same weights and record as an
uninterrupted run (the trainer resumes bit-exactly): a killed study loses at most ``checkpoint_every``
iterations of each run in flight. Checkpoints live in the work folder, never in the records: on another
machine an unfinished run starts again from scratch. ``--jobs J`` trains J runs at a
time, each in its own process with ``--threads`` torch threads; ``--jobs 1`` trains in this process.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

import tmd
from tmd.config import ConfigError, RunConfig, find_config, from_dict, to_dict

TEACHER = "teacher"

# Left out of a run's key: where it is written and how it shows progress change nothing it records.
# init_from is replaced by the parent's key, data.assets by the assets' fingerprint.
_UNKEYED = {
    "train": ("out_dir", "progress", "tensorboard", "wandb", "wandb_project", "checkpoint_every", "keep_checkpoints"),
    "method": ("init_from",),
    "data": ("assets",),
}
# Set by the study for every run, so a run's ``config`` may not set them.
_STUDY_SET = ("method_name", "train.seed", "train.out_dir", "method.init_from")


# ----------------------------------------------------------------------------------------------
# The study file.


@dataclass
class EvalSpec:
    noise_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Each seeds the noise of all 72 prompts: every row is scored on the same ``72 x len`` videos."""

    def __post_init__(self):
        if not self.noise_seeds or len(set(self.noise_seeds)) != len(self.noise_seeds):
            raise ValueError(f"noise_seeds must be distinct and at least one, got {self.noise_seeds}")


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

    def __post_init__(self):
        from tmd.methods import METHODS

        if self.method != TEACHER and self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not registered; registered: {', '.join(sorted(METHODS))}, or 'teacher'")
        if self.method == TEACHER and (self.config or self.parent or self.seeds):
            raise ValueError("a teacher run takes only 'score' (the world's guidance and shift; nothing is trained)")
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

    def __post_init__(self):
        if not self.runs:
            raise ValueError("a study needs at least one run")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        for name, spec in self.runs.items():
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


# ----------------------------------------------------------------------------------------------
# Runs and their keys.


@dataclass
class Run:
    name: str
    seed: int | None
    key: str
    spec: RunSpec
    config: dict[str, Any] | None
    """The resolved run config as plain data, without init_from and out_dir (None for the teacher)."""
    parent: Optional[Run] = None

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
    evaluation = {"noise_seeds": study.eval.noise_seeds}

    def build(name: str, seed: int | None) -> Run:
        if (name, seed) in runs:
            return runs[(name, seed)]
        spec = study.runs[name]
        parent = build(spec.parent, seed) if spec.parent else None
        payload: dict[str, Any] = {"version": study.version, "eval": {**evaluation, "score": [list(s) for s in spec.score]}}
        config = None
        if spec.method == TEACHER:
            assets = (study.base.get("data") or {}).get("assets")
            payload["teacher"] = True
        else:
            data = _merge(study.base, spec.config)
            data["method_name"] = spec.method
            data.setdefault("train", {})["seed"] = seed
            config = to_dict(from_dict(RunConfig, data, source=f"{source} runs.{name}"))
            if config["data_kind"] != "world":
                raise ConfigError(f"{source} runs.{name}: a study scores on the world's benchmark; data_kind must be 'world'")
            assets = config["data"]["assets"]
            payload.update(config=_keyed(config), parent=parent.key if parent else None)
        if assets not in fingerprints:
            fingerprints[assets] = assets_fingerprint(assets)
        payload["assets"] = fingerprints[assets]
        runs[(name, seed)] = Run(name, seed, _hash(payload), spec, config, parent)
        return runs[(name, seed)]

    for name in study.runs:
        for seed in study.run_seeds(name):
            build(name, seed)
    return list(runs.values())


def record_path(records: Path, key: str) -> Path:
    return records / f"{key}.json"


def read_records(records: Path, keys: list[str]) -> dict[str, dict[str, Any]]:
    return {k: json.loads(record_path(records, k).read_text()) for k in keys if record_path(records, k).is_file()}


# ----------------------------------------------------------------------------------------------
# Tasks: what a run still needs on this machine.


@dataclass
class Task:
    run: Run
    kind: str
    """``train`` (train, score, record), ``weights`` (retrain a recorded parent for a child; its record is
    kept) or ``teacher`` (score the teacher, record)."""
    estimate_s: float


def _weights(work: Path, key: str) -> Path:
    from tmd.train.run import STUDENT_FILE

    return work / key / STUDENT_FILE


def tasks(runs: list[Run], records: Path, work: Path, estimate) -> list[Task]:
    """What remains, in the order to start it. A recorded run needs nothing, unless a child still to train
    needs its weights and this machine lacks them."""
    todo: dict[str, Task] = {}
    for run in runs:
        if run.key not in todo and not record_path(records, run.key).is_file():
            todo[run.key] = Task(run, TEACHER if run.spec.method == TEACHER else "train", 0.0)

    def need_weights(run: Run) -> None:
        parent = run.parent
        if parent is None or parent.key in todo or _weights(work, parent.key).is_file():
            return
        todo[parent.key] = Task(parent, "weights", 0.0)
        need_weights(parent)

    for task in list(todo.values()):
        need_weights(task.run)
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


# ----------------------------------------------------------------------------------------------
# Executing one task (in this process or in a worker process).


def _task_payload(task: Task, study: StudyConfig, records: Path, work: Path, command: str) -> dict[str, Any]:
    run = task.run
    config = None
    if run.config is not None:
        config = copy.deepcopy(run.config)
        # one checkpoint kept: a resume needs only the newest, and a study holds many runs' folders
        config["train"].update(
            out_dir=str(work / run.key), progress=False, checkpoint_every=study.checkpoint_every, keep_checkpoints=1
        )
        if run.parent is not None:
            config["method"]["init_from"] = str(_weights(work, run.parent.key))
    return {
        "kind": task.kind,
        "key": run.key,
        "name": run.name,
        "label": run.spec.label or run.name,
        "seed": run.seed,
        "method": run.spec.method,
        "parent": run.parent.key if run.parent else None,
        "config": config,
        "score": [list(s) for s in run.spec.score],
        "noise_seeds": study.eval.noise_seeds,
        "study": study.name,
        "assets": (study.base.get("data") or {}).get("assets"),
        "record": str(record_path(records, run.key)),
        "command": command,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _number(value: float) -> float | str:
    """JSON has no inf/NaN (a collapsed tiny student's Frechet distance is inf): written as strings."""
    return value if value == value and abs(value) != float("inf") else str(value)


def _scores(
    assets, method_name: str, method_cfg: Any, module, score: list[list[int | None]], noise_seeds: list[int]
) -> list[dict[str, Any]]:
    from tmd.eval.samplers import effective_nfe, evaluate_sampler, sampler
    from tmd.world.data import eval_prompts

    prompts, guidance, shift = eval_prompts(1), assets.guidance, assets.shift
    nfe = {(m, n): effective_nfe(method_name, method_cfg, m, n, assets.teacher.num_blocks, guidance) for m, n in score}
    rows = []
    for outer, inner in score:
        for seed in noise_seeds:
            fn = sampler(method_name, method_cfg, module, outer, inner, seed, guidance, shift)
            result = evaluate_sampler(assets, fn, prompts, seed=seed)
            rows.append(
                {
                    "outer_steps": outer,
                    "inner_steps": inner,
                    "noise_seed": seed,
                    "videos": len(prompts),
                    "effective_nfe": nfe[(outer, inner)],
                    "seconds_per_video": result.seconds_per_video,
                    **{k: _number(v) for k, v in result.result.as_dict().items()},
                }
            )
    return rows


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def git_commit() -> dict[str, Any]:
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def write_json(path: Path, data: Any) -> None:
    """Atomically: a killed study never leaves a half-written record that would read as finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def execute(payload: dict[str, Any]) -> None:
    """Train (unless the teacher), score and write the record of one task."""
    from tmd.train.checkpoint import latest_checkpoint
    from tmd.train.logging import read_metrics
    from tmd.train.resume import CHECKPOINT_DIR, HISTORY_FILE
    from tmd.train.run import train_run
    from tmd.world.data import WorldAssets

    began, machine_start, code = time.perf_counter(), machine(), git_commit()  # the code as it was imported
    record: dict[str, Any] = {k: payload[k] for k in ("key", "study", "name", "label", "method", "seed", "parent")}
    wall: dict[str, float] = {}
    if payload["kind"] == TEACHER:
        assets = WorldAssets(payload["assets"])
        record["config"] = {"guidance": assets.guidance, "shift": assets.shift}
        method_name, method_cfg, module = TEACHER, None, assets.teacher
    else:
        cfg = from_dict(RunConfig, payload["config"], source=f"study run {payload['name']} ({payload['key']})")
        assets = WorldAssets(cfg.data.assets)
        run_dir = Path(cfg.train.out_dir)
        resume = latest_checkpoint(run_dir / CHECKPOINT_DIR) is not None
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)  # a start that never checkpointed left nothing to keep
        trained = train_run(cfg, assets=assets, resume=resume)
        wall["train"] = time.perf_counter() - began  # this process's share when the run was resumed
        history = run_dir / HISTORY_FILE
        if history.is_file():
            lines = history.read_text().splitlines()
            record["resumed_from_steps"] = [json.loads(line)["resumed_from_step"] for line in lines if line.strip()]
        if payload["kind"] == "weights":
            return
        metrics = read_metrics(run_dir)
        record.update(
            config=payload["config"],
            weights_sha256=_sha256(trained.weights),
            parent_weights_sha256=_sha256(Path(cfg.method.init_from)) if payload["parent"] else None,
            final_metrics=next((m for m in reversed(metrics) if "time" in m), {}),
            curve=[{k.removeprefix("eval/"): v for k, v in m.items()} for m in metrics if "eval/total" in m],
        )
        method_name, method_cfg, module = cfg.method_name, cfg.method, trained.generator
    scoring = time.perf_counter()
    record["scores"] = _scores(assets, method_name, method_cfg, module, payload["score"], payload["noise_seeds"])
    wall["score"] = time.perf_counter() - scoring
    record.update(
        wall_seconds=wall,
        machine={**machine_start, "load_average_end": machine()["load_average"]},
        git=code,
        command=payload["command"],
        finished=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    write_json(Path(payload["record"]), record)


def worker_main(argv: list[str]) -> int:
    """``python -m tmd.programs.study TASK.json THREADS``: one task, as ``--jobs`` starts it."""
    import torch

    task_file, threads = Path(argv[0]), int(argv[1])
    torch.set_num_threads(threads)
    execute(json.loads(task_file.read_text()))
    return 0


# ----------------------------------------------------------------------------------------------
# The scheduler.


def _minutes(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


class Progress:
    """One line per started and finished task, with an ETA from the estimates scaled by how far off they were."""

    def __init__(self, todo: list[Task], jobs: int):
        self.total, self.jobs = len(todo), jobs
        self.remaining = {t.run.key: t.estimate_s for t in todo}
        self.estimated = self.actual = 0.0
        self.done = 0

    def line(self, text: str) -> None:
        print(text, flush=True)

    def started(self, task: Task) -> None:
        self.line(f"[{self.done}/{self.total}] start  {task.kind:<7} {task.run.display}, about {_minutes(task.estimate_s)}")

    def skipped(self, task: Task) -> None:
        self.remaining.pop(task.run.key)
        self.line(f"skipped {task.run.display}: its parent failed")

    def finished(self, task: Task, seconds: float, ok: bool, note: str = "") -> None:
        self.done += 1
        self.estimated += self.remaining.pop(task.run.key)
        self.actual += seconds
        scale = self.actual / self.estimated if self.estimated > 0 else 1.0
        eta = scale * sum(self.remaining.values()) / self.jobs
        status = "done  " if ok else "FAILED"
        self.line(
            f"[{self.done}/{self.total}] {status} {task.kind:<7} {task.run.display} in {_minutes(seconds)}; "
            f"ETA {_minutes(eta)}{note}"
        )


def _blocked(run: Run, failed: set[str]) -> bool:
    parent = run.parent
    return parent is not None and (parent.key in failed or _blocked(parent, failed))


class _Finished:
    """What ``--jobs 1`` hands the scheduler in place of a worker process: the task already ran here."""

    def __init__(self, returncode: int):
        self.returncode = returncode

    def poll(self) -> int:
        return self.returncode


def run_tasks(
    todo: list[Task], payloads: dict[str, dict[str, Any]], work: Path, jobs: int, threads: int, progress: Progress
) -> list[Task]:
    """Run every task, ``jobs`` at a time; a task starts once its parent's weights exist. Returns the failed."""
    waiting, running, failed = list(todo), {}, []
    failed_keys: set[str] = set()

    def ready(task: Task) -> bool:
        parent = task.run.parent
        return parent is None or (parent.key not in {t.run.key for t in waiting} and parent.key not in running)

    try:
        while waiting or running:
            for task in [t for t in waiting if _blocked(t.run, failed_keys)]:
                waiting.remove(task)
                failed.append(task)
                failed_keys.add(task.run.key)
                progress.skipped(task)
            while len(running) < jobs and any(ready(t) for t in waiting):
                task = next(t for t in waiting if ready(t))
                waiting.remove(task)
                progress.started(task)
                began = time.perf_counter()
                running[task.run.key] = (task, _start(task, payloads[task.run.key], work, jobs, threads), began)
            finished = [key for key, (_, proc, _) in running.items() if proc.poll() is not None]
            if not finished:
                time.sleep(0.5)
                continue
            for key in finished:
                task, proc, began = running.pop(key)
                ok = proc.returncode == 0
                log = log_path(work, key)
                note = "" if ok else f"; log {log}:\n" + "\n".join(log.read_text().splitlines()[-15:])
                if not ok:
                    failed.append(task)
                    failed_keys.add(key)
                progress.finished(task, time.perf_counter() - began, ok, note)
    except BaseException:
        for task, proc, _ in running.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            progress.line(f"stopped {task.run.display}: it resumes from its last checkpoint next time")
        raise
    return failed


def log_path(work: Path, key: str) -> Path:
    """Next to the run's folder, not in it: training starts by wiping that."""
    return work / f"{key}.log"


def _start(task: Task, payload: dict[str, Any], work: Path, jobs: int, threads: int):
    """A worker process, or with ``jobs == 1`` the task run here (its output in its log all the same)."""
    work.mkdir(parents=True, exist_ok=True)
    log = log_path(work, task.run.key)
    if jobs == 1:
        with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                execute(payload)
            except Exception:
                traceback.print_exc()
                return _Finished(1)
        return _Finished(0)
    task_file = work / f"{task.run.key}.task.json"
    task_file.write_text(json.dumps(payload, indent=1))
    # the worker must import this tmd, not whichever one the environment would find first
    path = os.pathsep.join(filter(None, [str(Path(tmd.__path__[0]).parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tmd.programs.study", str(task_file), str(threads)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


# ----------------------------------------------------------------------------------------------
# The command.


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


def dry_run(runs: list[Run], todo: list[Task], records: Path, jobs: int) -> None:
    kinds = {t.run.key: t for t in todo}
    for run in runs:
        task = kinds.get(run.key)
        status = "done" if task is None else {"train": "pending", TEACHER: "pending", "weights": "weights"}[task.kind]
        estimate = "" if task is None else f"  ~{_minutes(task.estimate_s)}"
        print(f"{run.key}  {status:<7}  {run.name:<28} seed {'-' if run.seed is None else run.seed}{estimate}")
    keys = {r.key for r in runs}
    recorded = len(keys) - sum(t.kind != "weights" for t in todo)
    print(
        f"{recorded} of {len(keys)} runs recorded in {records}; {len(todo)} tasks to run ('weights': a recorded "
        f"stage 1 retrained here for its weights), about {_minutes(sum(t.estimate_s for t in todo) / jobs)} "
        f"with --jobs {jobs}"
    )


def main(args, write_report: Callable[..., Path]) -> int:
    """``tmd study`` (``tmd.programs.cli``): train what is missing, then write the report; ``--report`` only reports.

    ``write_report`` is ``tmd.programs.study_report.write_report``, handed in from above: the report reads this
    module's runs and records, so it sits in the layer above it.
    """
    study, path = load_study(args.config)
    records, work = Path(args.records), Path(args.work)
    everything = plan(study, str(path))
    report = lambda: write_report(study, path, everything, records, readme=args.readme)  # noqa: E731
    if args.report:
        print(f"report written to {report()}")
        return 0
    runs = select(everything, args.only, study, args.seeds)
    todo = tasks(runs, records, work, estimator(study, read_records(records, [r.key for r in everything])))
    if args.dry_run:
        dry_run(runs, todo, records, args.jobs)
        return 0
    command = shlex.join(["tmd", *args.argv])
    payloads = {t.run.key: _task_payload(t, study, records, work, command) for t in todo}
    failed = run_tasks(todo, payloads, work, args.jobs, args.threads or 1, Progress(todo, args.jobs))
    print(f"report written to {report()}" + (f"; {len(failed)} tasks failed (logs in {work})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
