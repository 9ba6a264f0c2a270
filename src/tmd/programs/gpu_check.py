"""The GPU check: the numbers tmd's claims need from real hardware, in one run of at most ten minutes.

``benchmarks/gpu_check.sh [--tiny] [--out DIR] [--budget-s S]`` runs ``python -m tmd.programs.gpu_check``. On a GPU:
Wan2.1-1.3B-shaped random weights in bf16, an 81 x 480 x 832 video (latents 16 x 21 x 60 x 104,
32760 tokens), 512 text tokens, batch 1.

1. **Latency** of the teacher 50 x 2 (CFG 5, shift 5), TMD 2 x 2 (M = 2, N = 2, head H = 5 of 30) and
   DMD2-v 2 steps, with PyTorch's SDPA kernel choice, with the fastest forced SDPA kernel, and with
   compiled blocks. The teacher's row is 50 times its measured CFG step (both branches batched); the
   default row also times the whole 50-step sampler once, which checks that product.
2. **A TMD stage-2 step** as one ``tmd train`` process runs it (fp32 weights and AdamW, bf16 autocast,
   activation checkpointing, the config's H = 5 and N = 2, GAN on): peak CUDA memory and time of the
   generator turn and of the critic turn.
3. **A 1-GPU torchrun FSDP2 smoke run** of ``wan1.3b_tmd_stage2.yaml`` (2 steps, batch 1) on a
   random prepared dataset and a random teacher folder written for it, deleted afterwards.

Results go to ``gpu_check.json`` (rewritten after every section, so a run cut short keeps what it
measured) and ``gpu_check.md``. Sections run in the order 1 (default, kernels), 2, 3, 1 (compile); one
that would start with less than its share of ``--budget-s`` left is skipped and says so. ``--tiny``
runs all of it on the CPU with the 4-block test model and tiny shapes (compile with ``aot_eager``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tmd.eval import flops
from tmd.methods import get_method
from tmd.models.fastpath import attention_kernel, compile_blocks
from tmd.models.split import TMDStudent
from tmd.models.wan import (
    parameter_count,
)
from tmd.programs.bench_measure import FAST_PATH_KERNELS
from tmd.programs.gpu_check_fsdp import fsdp_smoke
from tmd.programs.gpu_check_spec import STAGE2_CONFIG, Spec, build_teacher, inputs, make_spec
from tmd.programs.timing import free, median_seconds, peak_gib, reset_peak, sync
from tmd.rng import BatchRandom
from tmd.sampling import guided_velocity, sample_few_step, sample_teacher, sample_tmd
from tmd.train.update import UpdateStep

GUIDANCE, SHIFT = 5.0, 5.0
JSON_FILE, TABLE_FILE = "gpu_check.json", "gpu_check.md"
MIN_SECONDS = {"latency": 60, "kernels": 30, "stage2_step": 45, "fsdp_smoke": 90, "compile": 150}
"""What each section needs left of the budget on a GPU to start (about its measured or estimated cost)."""


# --------------------------------------------------------------------------------------------- 1. latency


def latency_row(variant: str, teacher, student, spec: Spec, kernel: str, full_teacher: bool = False) -> dict[str, Any]:
    """ms per video of the three samplers under one attention kernel; the teacher as 50 x its CFG step."""
    device = torch.device(spec.device)
    noise, cond, neg = inputs(spec)
    t = torch.full((1,), 0.5, device=device)
    fns = {
        "teacher_step": lambda: guided_velocity(teacher, noise, t, cond, neg, GUIDANCE),
        "tmd_2x2": lambda: sample_tmd(student, noise, cond, 2, 2, torch.Generator(device).manual_seed(0)),
        "dmd2_2step": lambda: sample_few_step(teacher, noise, cond, 2),
    }
    row: dict[str, Any] = {"variant": variant}
    with torch.no_grad(), attention_kernel(kernel):
        for name, fn in fns.items():
            row[f"{name}_ms"] = 1000 * median_seconds(fn, spec.repeats, device)
        if full_teacher:
            run = lambda: sample_teacher(teacher, noise, cond, neg, spec.teacher_steps, GUIDANCE, SHIFT)  # noqa: E731
            row["teacher_50x2_measured_ms"] = 1000 * median_seconds(run, 1, device, warmup=0)
    row["teacher_50x2_ms"] = spec.teacher_steps * row["teacher_step_ms"]
    row["speedup_tmd"] = row["teacher_50x2_ms"] / row["tmd_2x2_ms"]
    row["speedup_dmd2"] = row["teacher_50x2_ms"] / row["dmd2_2step_ms"]
    return row


def kernel_rows(teacher, spec: Spec) -> list[dict[str, Any]]:
    """One CFG step of the teacher under each forced SDPA kernel (math only on the CPU: at 32760 tokens
    it would materialise the attention matrix)."""
    device = torch.device(spec.device)
    noise, cond, neg = inputs(spec)
    t = torch.full((1,), 0.5, device=device)
    kernels = ["sdpa", *(k for k in FAST_PATH_KERNELS[device.type] if device.type == "cpu" or k != "math")]
    rows = []
    for kernel in kernels:
        try:
            with torch.no_grad(), attention_kernel(kernel):
                ms = 1000 * median_seconds(lambda: guided_velocity(teacher, noise, t, cond, neg, GUIDANCE), spec.repeats, device)
            rows.append({"kernel": kernel, "teacher_step_ms": ms, "note": ""})
        except Exception as error:  # noqa: BLE001  a kernel may not take this dtype, shape, device or torch version
            rows.append({"kernel": kernel, "teacher_step_ms": None, "note": str(error).splitlines()[0][:100]})
    return rows


# --------------------------------------------------------------------------------------------- 2. stage-2 step


def stage2_step(spec: Spec) -> dict[str, Any]:
    """The generator and the critic turn of TMD stage 2 as ``tmd train`` runs them in one process."""
    import yaml

    device = torch.device(spec.device)
    method_cfg = (yaml.safe_load(STAGE2_CONFIG.read_text()) or {})["method"]
    method_cfg = {**method_cfg, "init_from": None, "head_blocks": spec.head_blocks}
    cls = get_method("tmd")
    teacher = build_teacher(spec, torch.float32)
    teacher.activation_checkpointing = True  # as tmd.train.run sets it: the GAN's teacher pass carries gradients
    with torch.device(spec.device):
        method = cls.from_teacher(cls.Config(**method_cfg), teacher, activation_checkpointing=True)
    method.rng = BatchRandom(torch.Generator(device).manual_seed(0))
    fused = True if device.type == "cuda" else None
    optimizers = {
        g: torch.optim.AdamW(p, lr=1e-5, betas=(0.9, 0.99), weight_decay=0.01, fused=fused)
        for g, p in method.parameter_groups().items()
    }

    # as the trainer at grad_accum = 1, but timed even where the CPU's bf16 conv3d gradient is not finite (CPU_SMOKE_WHY)
    update = UpdateStep(optimizers, method.parameter_groups(), grad_clip=1.0, stop_on_nonfinite=False)
    grad_norms = update.grad_norms

    noise, cond, neg = inputs(spec)
    batch = {"x": noise, "cond": cond, "neg_cond": neg}
    result: dict[str, Any] = {
        "head_blocks": f"{spec.head_blocks}/{spec.config['num_layers']}",
        "inner_steps": method_cfg["inner_steps"],
        "precision": "fp32 weights, bf16 autocast",
        "activation_checkpointing": True,
        "weights_gib": torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    for turn, step in (("generator", 0), ("critic", 1)):
        for attempt in ("first", "second"):  # the first call also allocates AdamW's state
            reset_peak(device)
            sync(device)
            start = time.perf_counter()
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    method.training_step(batch, step, update)
            except torch.cuda.OutOfMemoryError as error:
                result[f"{turn}_{attempt}_oom"] = str(error).splitlines()[0][:300]
                free(device)
                continue
            sync(device)
            result[f"{turn}_{attempt}_s"] = time.perf_counter() - start
            result[f"{turn}_{attempt}_peak_gib"] = peak_gib(device)
    result["grad_norms"] = grad_norms  # of the second calls: a non-finite one is a bf16 problem to look at
    del method, teacher, optimizers
    free(device)
    return result


# --------------------------------------------------------------------------------------------- 3. FSDP2 smoke


# --------------------------------------------------------------------------------------------- report


def format_table(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"# tmd GPU check: {meta['device_name']}",
        "",
        f"{meta['model']} ({meta['parameters']:,} parameters), random weights in {meta['dtype']}, latent "
        f"{'x'.join(map(str, meta['latent']))} ({meta['tokens']} tokens), text {meta['text_len']} tokens, batch 1; "
        f"torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['date']}; median of {meta['repeats']} after 1 warm-up.",
        "",
    ]
    if result.get("latency"):
        lines += [
            "## Latency per video (ms)",
            "",
            "| variant | teacher 50x2 | TMD 2x2 | DMD2-v 2 steps | teacher / TMD | teacher / DMD2-v |",
            "|---|---|---|---|---|---|",
        ]
        for row in result["latency"]:
            measured = f" (whole sampler: {row['teacher_50x2_measured_ms']:.0f})" if "teacher_50x2_measured_ms" in row else ""
            lines.append(
                f"| {row['variant']} | {row['teacher_50x2_ms']:.0f}{measured} | {row['tmd_2x2_ms']:.1f} | "
                f"{row['dmd2_2step_ms']:.1f} | {row['speedup_tmd']:.1f}x | {row['speedup_dmd2']:.1f}x |"
            )
        lines.append("")
    if result.get("kernels"):
        lines += ["## SDPA kernels: one teacher CFG step (ms)", ""]
        lines += [
            f"- {r['kernel']}: " + (f"{r['teacher_step_ms']:.1f}" if r["teacher_step_ms"] is not None else f"n/a ({r['note']})")
            for r in result["kernels"]
        ]
        lines.append("")
    step = result.get("stage2_step")
    if step:

        def turn(name: str) -> str:
            if f"{name}_second_s" not in step:
                return f"out of memory ({step.get(f'{name}_second_oom') or step.get(f'{name}_first_oom')})"
            # the larger of the two calls' peaks: the first allocates AdamW's state after the backward, the
            # second holds it throughout (on the H200 the second's peak was the larger, 48.8 against 34.9 GiB)
            peaks = [step.get(f"{name}_{attempt}_peak_gib") for attempt in ("first", "second")]
            peak = None if None in peaks else f"{max(peaks):.1f} GiB"
            return f"{step[f'{name}_second_s']:.2f} s (second call), peak {peak or 'n/a'} (the larger of both calls)"

        lines += [
            f"## TMD stage-2 step (H = {step['head_blocks']}, N = {step['inner_steps']}, {step['precision']}, "
            "activation checkpointing)",
            "",
            f"- generator turn: {turn('generator')}",
            f"- critic turn: {turn('critic')}",
            "- gradient norms: " + ", ".join(f"{k} {v:.3g}" for k, v in step["grad_norms"].items()),
            "",
        ]
    smoke = result.get("fsdp_smoke")
    if smoke:
        lines += [
            "## 1-GPU torchrun FSDP2 smoke run of wan1.3b_tmd_stage2.yaml (2 steps)",
            "",
            f"- {'ok' if smoke['ok'] else 'FAILED'}: return code {smoke['returncode']}, {smoke['wall_s']:.0f} s, "
            f"{len(smoke['losses'])} logged steps, checkpoint shards {smoke['checkpoint_shards']}",
            "",
        ]
    if result["skipped"]:
        lines += ["## Skipped", "", *[f"- {s}" for s in result["skipped"]], ""]
    return "\n".join(lines)


def write(result: dict[str, Any], out: Path) -> None:
    (out / JSON_FILE).write_text(json.dumps(result, indent=2) + "\n")
    (out / TABLE_FILE).write_text(format_table(result))


def run(tiny: bool, out: Path, budget_s: float, device: str | None = None) -> dict[str, Any]:
    import diffusers

    began = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not tiny:
        raise ValueError("the GPU check of Wan2.1 1.3B needs a GPU; pass --tiny for the CPU run of the same script")
    spec = make_spec(tiny, device)
    out.mkdir(parents=True, exist_ok=True)
    # on the CPU (--tiny) every section is small, so the budget only guards the GPU run's expensive ones
    needed = {name: (0 if tiny else s) for name, s in MIN_SECONDS.items()}
    left = lambda: budget_s - (time.perf_counter() - began)  # noqa: E731
    result: dict[str, Any] = {"skipped": []}

    def section(name: str) -> bool:
        if left() >= needed[name]:
            return True
        result["skipped"].append(f"{name}: {left():.0f} s of the budget left, {needed[name]} s needed")
        return False

    teacher = build_teacher(spec, torch.bfloat16)
    student = TMDStudent.from_teacher(teacher, head_blocks=spec.head_blocks).eval()
    result["meta"] = {
        "spec": asdict(spec),
        "model": spec.name,
        "parameters": parameter_count(teacher),
        "dtype": "bfloat16",
        "latent": list(spec.latent),
        "tokens": flops.tokens(spec.config, spec.latent),
        "text_len": spec.text_len,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "repeats": spec.repeats,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "budget_s": budget_s,
    }
    result["latency"] = []
    if section("latency"):
        result["latency"].append(latency_row("default (SDPA's choice)", teacher, student, spec, "sdpa", full_teacher=True))
        write(result, out)
    if section("kernels"):
        result["kernels"] = kernel_rows(teacher, spec)
        timed = [r for r in result["kernels"] if r["teacher_step_ms"] is not None and r["kernel"] != "sdpa"]
        if timed:
            best = min(timed, key=lambda r: r["teacher_step_ms"])["kernel"]
            result["latency"].append(latency_row(f"SDPA kernel: {best}", teacher, student, spec, best))
        write(result, out)
    del student, teacher
    free(torch.device(device))
    if section("stage2_step"):
        result["stage2_step"] = stage2_step(spec)
        write(result, out)
    if section("fsdp_smoke"):
        result["fsdp_smoke"] = fsdp_smoke(spec, out / "fsdp_smoke_work", timeout_s=max(60.0, left()))
        write(result, out)
    if section("compile"):
        teacher = build_teacher(spec, torch.bfloat16)
        student = compile_blocks(
            TMDStudent.from_teacher(teacher, head_blocks=spec.head_blocks).eval(), backend=spec.compile_backend
        )
        compile_blocks(teacher, backend=spec.compile_backend)
        started = time.perf_counter()
        row = latency_row(f"compiled blocks ({spec.compile_backend}), SDPA's choice", teacher, student, spec, "sdpa")
        row["section_s_compilation_included"] = time.perf_counter() - started
        result["latency"].append(row)
    result["meta"]["wall_s"] = time.perf_counter() - began
    write(result, out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the same script on the CPU with the tiny test model")
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds the sections may use in all (default 480)")
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)
    try:
        result = run(args.tiny, args.out, args.budget_s, args.device)
    except ValueError as error:
        print(f"gpu_check: error: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"results written to {args.out / JSON_FILE} and {args.out / TABLE_FILE}")
    smoke = result.get("fsdp_smoke")
    return 1 if smoke is not None and not smoke["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
