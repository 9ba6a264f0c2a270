"""Runs the tasks, ``--jobs`` at a time, a task once its parent's weights exist; one line per start and finish."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import tmd
from tmd.programs.study.execute import execute
from tmd.programs.study.plan import Run, Task


def minutes(seconds: float) -> str:
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
        self.line(f"[{self.done}/{self.total}] start  {task.kind:<7} {task.run.display}, about {minutes(task.estimate_s)}")

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
            f"[{self.done}/{self.total}] {status} {task.kind:<7} {task.run.display} in {minutes(seconds)}; "
            f"ETA {minutes(eta)}{note}"
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
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tmd.programs.study.execute", str(task_file), str(threads)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=worker_env(threads),
        )


def worker_env(threads: int) -> dict[str, str]:
    """A worker process's environment: ``threads`` OpenMP threads, and this tmd first on its path (not
    whichever one the environment would find first)."""
    path = os.pathsep.join(filter(None, [str(Path(tmd.__path__[0]).parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}
