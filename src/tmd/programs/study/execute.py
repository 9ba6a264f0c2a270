"""One task, in this process or in a worker process (``python -m tmd.programs.study.execute TASK THREADS``):
train (unless the teacher), score on the world's benchmark, write the record."""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tmd.config import RunConfig, from_dict
from tmd.programs.study.plan import Task, record_path, weights_path, write_json
from tmd.programs.study.spec import TEACHER, StudyConfig


def task_payload(task: Task, study: StudyConfig, records: Path, work: Path, command: str) -> dict[str, Any]:
    run = task.run
    config = None
    if run.config is not None:
        config = copy.deepcopy(run.config)
        # one checkpoint kept: a resume needs only the newest, and a study holds many runs' folders
        config["train"].update(
            out_dir=str(work / run.key), progress=False, checkpoint_every=study.checkpoint_every, keep_checkpoints=1
        )
        if run.parent is not None:
            config["method"]["init_from"] = str(weights_path(work, run.parent.key))
        if run.dataset is not None:
            config["data"]["path"] = str(run.dataset.folder(work))
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
        "assets": run.dataset.assets if run.dataset is not None else (study.base.get("data") or {}).get("assets"),
        "dataset": None if run.dataset is None else {"name": run.dataset.name, "key": run.dataset.key},
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


def execute(payload: dict[str, Any]) -> None:
    """Train (unless the teacher), score and write the record of one task."""
    from tmd.programs.synthesis import SETTINGS_FILE as SYNTHESIZE_SETTINGS
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
        # a run on a dataset is scored on the world whose teacher made it
        assets = WorldAssets(cfg.data.assets if cfg.data_kind == "world" else payload["assets"])
        if payload["dataset"] is not None:
            settings = json.loads((Path(cfg.data.path) / SYNTHESIZE_SETTINGS).read_text())
            record["dataset"] = {**payload["dataset"], "synthesize": settings}
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
    """``python -m tmd.programs.study.execute TASK.json THREADS``: one task, as ``--jobs`` starts it."""
    import torch

    task_file, threads = Path(argv[0]), int(argv[1])
    torch.set_num_threads(threads)
    execute(json.loads(task_file.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
