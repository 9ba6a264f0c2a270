"""The GPU check's 1-GPU torchrun FSDP2 smoke run: a prepared-data folder in ``tmd prepare``'s format, then two
training steps of the shipped Wan2.1 1.3B stage-2 config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import tmd
from tmd.data.prepare import FORMAT_VERSION, INDEX_FILE, NEGATIVE_FILE, shard_name
from tmd.programs.gpu_check_spec import STAGE2_CONFIG, Spec, build_teacher
from tmd.programs.timing import free
from tmd.train.logging import read_metrics

CPU_SMOKE_OVERRIDES = ("train.precision=fp32",)
CPU_SMOKE_WHY = (
    "torch 2.13.0+cpu (oneDNN) returns non-finite bf16 conv3d weight gradients in about 60% of calls "
    "(the discriminator's first conv), so on the CPU the smoke run trains in fp32; a GPU runs the config's bf16"
)


def write_prepared(folder: Path, spec: Spec, samples: int = 2) -> None:
    """A random dataset in ``tmd prepare``'s layout (``tmd.data.prepare``): latents, trimmed prompt embeddings."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    dim, length = spec.config["text_dim"], spec.text_len
    tensors = {
        "latents": torch.randn(samples, *spec.latent, generator=g).to(torch.bfloat16),
        "cond": torch.randn(samples, length, dim, generator=g).to(torch.bfloat16),
        "cond_lengths": torch.full((samples,), length, dtype=torch.int64),
    }
    captions = [f"random sample {i}" for i in range(samples)]
    save_file(
        tensors,
        str(folder / shard_name(0)),
        metadata={"captions": json.dumps(captions), "videos": json.dumps(captions), "skipped": "[]"},
    )
    save_file({"cond": torch.zeros(1, 1, dim, dtype=torch.bfloat16)}, str(folder / NEGATIVE_FILE), metadata={"prompt": ""})
    index = {
        "format": FORMAT_VERSION,
        "mode": "videos",
        "latent_shape": list(spec.latent),
        "text_max_length": length,
        "samples": samples,
        "skipped": 0,
        "skipped_videos": [],
        "negative": NEGATIVE_FILE,
        "shards": [{"file": shard_name(0), "samples": samples}],
        "model": "random",
        "frames": None,
        "height": None,
        "width": None,
        "fps": None,
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def fsdp_smoke(spec: Spec, work: Path, timeout_s: float) -> dict[str, Any]:
    """``torchrun --nproc_per_node=1 -m tmd train`` on the stage-2 config, 2 steps (a generator and a critic turn)."""
    shutil.rmtree(work, ignore_errors=True)
    try:
        teacher = build_teacher(spec, torch.bfloat16)  # bf16 on disk: half the bytes; loaded back as fp32
        teacher.transformer.save_pretrained(work / "teacher", safe_serialization=True)
        del teacher
        free(torch.device(spec.device))
        write_prepared(work / "data", spec)
        run_dir = work / "run"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "-m",
            "tmd",
            "train",
            "--config",
            str(STAGE2_CONFIG),
            f"data.path={work / 'data'}",
            f"data.teacher={work / 'teacher'}",
            "method.init_from=null",
            f"method.head_blocks={spec.head_blocks}",
            "train.steps=2",
            "train.batch_size=1",
            "train.log_every=1",
            "train.checkpoint_every=1000",
            "train.keep_checkpoints=1",
            "train.progress=false",
            "train.tensorboard=false",
            f"train.out_dir={run_dir}",
            *CPU_SMOKE_OVERRIDES * (spec.device == "cpu"),
        ]
        # the torchrun workers import this tmd, wherever it is installed
        package_root = str(Path(tmd.__path__[0]).parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s, cwd=work)
            rc, log = done.returncode, done.stdout[-1500:] + done.stderr[-2500:]
        except subprocess.TimeoutExpired as error:
            rc, log = "timeout", f"killed after {timeout_s:.0f} s: {str(error.stderr or '')[-2500:]}"
        result: dict[str, Any] = {"command": " ".join(command[1:]), "returncode": rc, "wall_s": time.perf_counter() - start}
        if spec.device == "cpu":
            result["cpu_overrides"] = {"overrides": list(CPU_SMOKE_OVERRIDES), "why": CPU_SMOKE_WHY}
        metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        result["losses"] = [{k: v for k, v in r.items() if k.startswith(("loss/", "grad_norm/"))} for r in metrics]
        shards = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*/state/*.distcp"))
        result["checkpoint_shards"] = shards
        result["student_exported"] = (run_dir / "student.safetensors").is_file()
        result["ok"] = rc == 0 and len(metrics) == 2 and bool(shards) and result["student_exported"]
        if not result["ok"]:
            result["log_tail"] = log
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the checkpoint of three 1.3B models is tens of GB
