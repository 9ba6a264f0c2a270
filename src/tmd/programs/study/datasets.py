"""A study's datasets: the world teacher's own samples, made by ``tmd synthesize`` before the runs that train
on them, with every ``--jobs`` process (``torchrun`` splits the shards), into ``WORK/data/<name>-<key>``.

``tmd synthesize`` resumes a folder shard by shard, so a stopped study loses at most one shard per process.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

from tmd.programs.study.plan import Dataset
from tmd.programs.study.schedule import minutes, worker_env

BATCH_SIZE = 16
"""Videos sampled together; also the shard size, so a process's unit of work is one batch."""
PROGRESS_EVERY_S = 60
SECONDS_PER_VIDEO_STEP = 0.5 / 50
"""About 2 videos/s per process at 50 steps and batch 16, measured on the 2-core machine (one thread each)."""


def estimate_s(dataset: Dataset, jobs: int) -> float:
    from tmd.pipelines.videos import DEFAULT_TEACHER_STEPS
    from tmd.world.spec import all_prompts

    videos = len(all_prompts()) * dataset.spec.videos_per_prompt
    return 10 + videos * (dataset.spec.steps or DEFAULT_TEACHER_STEPS) * SECONDS_PER_VIDEO_STEP / jobs


def synthesize_command(dataset: Dataset, work: Path, jobs: int, threads: int) -> list[str]:
    """``tmd synthesize`` on the world teacher of the dataset's assets, with the world's 72 prompts."""
    from tmd.world.data import TEACHER_DIR, assets_dir
    from tmd.world.spec import all_prompts

    folder = dataset.folder(work)
    prompts = folder.with_name(f"{folder.name}.prompts.txt")
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(all_prompts()) + "\n")
    spec = dataset.spec
    args = ["--model", str(assets_dir(dataset.assets) / TEACHER_DIR), "--prompts", str(prompts), "--out", str(folder)]
    args += ["--videos-per-prompt", str(spec.videos_per_prompt), "--seed", str(spec.seed), "--threads", str(threads)]
    args += ["--batch-size", str(BATCH_SIZE), "--shard-size", str(BATCH_SIZE)]
    args += ["--steps", str(spec.steps)] if spec.steps is not None else []
    args += ["--guidance", str(spec.guidance)] if spec.guidance is not None else []
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={jobs}"] if jobs > 1 else []
    return [sys.executable, *launcher, "-m", "tmd", "synthesize", *args]


def make_datasets(datasets: list[Dataset], work: Path, jobs: int, threads: int) -> bool:
    """Synthesize each dataset (resuming a partial folder); False, with the log's end printed, if one fails."""
    for dataset in datasets:
        folder = dataset.folder(work)
        log = folder.with_name(f"{folder.name}.log")
        command = synthesize_command(dataset, work, jobs, threads)
        print(
            f"synthesize dataset {dataset.name} ({dataset.key[:8]}) into {folder} with {jobs} process(es), about "
            f"{minutes(estimate_s(dataset, jobs))}; log {log}",
            flush=True,
        )
        began = time.perf_counter()
        with open(log, "w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=worker_env(threads))
            code = _wait(process, dataset, folder)
        if code != 0:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            print(f"dataset {dataset.name}: tmd synthesize FAILED (exit code {code}); log {log}:\n{tail}", flush=True)
            return False
        print(f"dataset {dataset.name} done in {minutes(time.perf_counter() - began)}", flush=True)
    return True


def _wait(process: subprocess.Popen, dataset: Dataset, folder: Path) -> int:
    """The process's exit code; meanwhile a line every ``PROGRESS_EVERY_S`` with the shards written and an ETA
    (a stopped study stops the synthesis: it resumes from the written shards)."""
    from tmd.world.spec import all_prompts

    total = math.ceil(len(all_prompts()) * dataset.spec.videos_per_prompt / BATCH_SIZE)
    written = lambda: len(list(folder.glob("shard-*.safetensors")))  # noqa: E731
    began, before, shown = time.perf_counter(), written(), time.perf_counter()
    try:
        while process.poll() is None:
            time.sleep(0.5)
            if time.perf_counter() - shown >= PROGRESS_EVERY_S:
                shown, done = time.perf_counter(), written()
                rate = (done - before) / (shown - began)
                eta = f", ETA {minutes((total - done) / rate)}" if rate > 0 else ""
                print(f"dataset {dataset.name}: {done}/{total} shards{eta}", flush=True)
    except BaseException:
        process.terminate()
        process.wait()
        raise
    return process.returncode
