"""``tmd bench``: latency, memory and throughput of every sampler and training step, in one process.

Effective NFE is the cost model every table in tmd reports; this checks it against the clock on the
same shapes, next to what the analytic FLOP model (``tmd.eval.flops``) predicts, so that a gap can be
read as either the sampler's overhead or the cost model's optimism. Weights are random (timing does
not depend on them) unless a diffusers folder is given; students are untrained copies of the teacher.

Repeats are taken round-robin over the rows (row A, row B, ..., then again), so that load drifting on
a shared machine hits every row alike and the speed-up ratios stay comparable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tmd import flow
from tmd.eval import flops
from tmd.methods import get_method
from tmd.models.split import TMDStudent
from tmd.models.wan import (
    WAN_1_3B_CONFIG,
    WAN_TEXT_LEN,
    load_teacher,
    parameter_count,
)
from tmd.programs.bench_measure import (
    ATTENTION_TOKENS,
    ATTENTION_TOKENS_GPU,
    FAST_PATH_KERNELS,
    TEACHER_GUIDANCE,
    TEACHER_SHIFT,
    TEACHER_STEPS,
    attention_scaling,
    fast_path_table,
    generator_step_ratio,
    resolve_model,
    training_steps,
)
from tmd.programs.timing import peak_mib, time_round_robin
from tmd.sampling import sample_few_step, sample_teacher, sample_tmd
from tmd.train.memory import stage2_memory_table
from tmd.world.benchmark import format_table


@dataclass
class BenchSettings:
    model: str = "world"
    latent: tuple[int, int, int, int] | None = None
    batch: int | None = None  # None: 1 for wan1.3b, 4 otherwise
    repeats: int = 5
    warmup: int = 2
    device: str = "cpu"
    dtype: str = "fp32"
    head_blocks: int | None = None
    quick: bool = False
    fast_path: bool = False  # add the before/after table of the inference fast path
    generator_step_only: bool = False  # only the TMD-vs-DMD2-v generator step (the paper's training-cost claim)
    compile: bool = False  # include torch.compile in it (minutes of compilation on a CPU)


def _scaling_latents(latent: tuple[int, ...], config: dict[str, Any], sizes: int) -> list[tuple[int, ...]]:
    """The base latent, then 2x frames, then 2x height and width; halved instead for video-sized
    latents (over 8192 tokens), whose doubling would not fit a benchmark."""
    c, f, h, w = latent
    pt, ph, pw = config["patch_size"]
    if flops.tokens(config, latent) > 8192:
        half = lambda size, patch: max(patch, size // 2 // patch * patch)  # noqa: E731
        variants = [(c, half(f, pt), h, w), (c, f, half(h, ph), half(w, pw))]
    else:
        variants = [(c, 2 * f, h, w), (c, f, 2 * h, 2 * w)]
    return [tuple(latent), *variants][:sizes]


def run_bench(settings: BenchSettings, progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """All tables as lists of row dicts, plus the settings they were measured with (``meta``)."""
    device = torch.device(settings.device)
    if device.type == "cpu" and settings.model in ("wan1.3b", "wan2.2-5b"):
        raise ValueError(
            f"{settings.model} is a GPU benchmark (three copies of the model for training, ~30k tokens per sample); "
            "pass --device cuda, or --model world on CPU"
        )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[settings.dtype]
    model = resolve_model(settings.model)
    batch = settings.batch or (1 if model.name in ("wan1.3b", "wan2.2-5b") else 4)
    teacher = load_teacher(model.path or model.config, dtype=dtype, device=device)
    config = dict(teacher.config)
    blocks = teacher.num_blocks
    latent = tuple(settings.latent or model.latent or (config["in_channels"], 4, 8, 8))
    head_blocks = settings.head_blocks or model.head_blocks or max(1, round(blocks / 6))
    text_len = model.text_len or (WAN_TEXT_LEN if config["text_dim"] == WAN_1_3B_CONFIG["text_dim"] else 8)
    student = TMDStudent.from_teacher(teacher, head_blocks=head_blocks).eval()
    repeats, warmup = settings.repeats, settings.warmup

    g = torch.Generator(device).manual_seed(0)
    noise = torch.randn(batch, *latent, generator=g, device=device)
    cond = torch.randn(batch, text_len, config["text_dim"], generator=g, device=device)
    neg_cond = torch.randn(batch, text_len, config["text_dim"], generator=g, device=device)
    train_batch = {"x": torch.randn(batch, *latent, generator=g, device=device), "cond": cond, "neg_cond": neg_cond}
    seeded = lambda: torch.Generator(device).manual_seed(0)  # noqa: E731
    meta = {
        "model": model.name,
        "weights": model.weights,
        "students": "untrained copies of the teacher",
        "parameters": parameter_count(teacher),
        "blocks": blocks,
        "head_blocks": head_blocks,
        "latent": list(latent),
        "tokens": flops.tokens(config, latent),
        "text_len": text_len,
        "batch": batch,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": settings.dtype,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "quick": settings.quick,
        "torch": torch.__version__,
        "compile": settings.compile,
        "memory": "CUDA max_memory_allocated above the call's start" if device.type == "cuda" else "n/a on CPU",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    progress("generator step: TMD stage 2 (N = 2, H = L / 6) against DMD2-v")
    generator_step = [generator_step_ratio(teacher, train_batch, repeats, warmup)]
    if settings.generator_step_only:
        return {"meta": meta, "generator_step": generator_step}

    def forward_gflop(latent_shape) -> float:
        return flops.forward_flops(config, latent_shape, text_len) * batch / 1e9

    # ---- sampling: each sampler's cost model and its callable
    teacher_nfe = flow.teacher_effective_nfe(TEACHER_STEPS, TEACHER_GUIDANCE)
    samplers: dict[str, tuple[float, float, Callable[[], Any]]] = {
        f"teacher {TEACHER_STEPS}x2 (CFG batched)": (
            teacher_nfe,
            TEACHER_STEPS * 2 * forward_gflop(latent),
            lambda: sample_teacher(teacher, noise, cond, neg_cond, TEACHER_STEPS, TEACHER_GUIDANCE, TEACHER_SHIFT),
        )
    }
    for steps in (1, 2) if settings.quick else (1, 2, 4):
        samplers[f"dmd2 {steps} step{'s' if steps > 1 else ''}"] = (
            float(steps),
            steps * forward_gflop(latent),
            lambda s=steps: sample_few_step(teacher, noise, cond, s, seeded()),
        )
    for outer in (1, 2) if settings.quick else (1, 2, 4):
        for inner in (2, 4):
            samplers[f"tmd {outer}x{inner} (H={head_blocks})"] = (
                flow.tmd_effective_nfe(outer, inner, head_blocks, blocks),
                flops.tmd_sample_flops(config, latent, text_len, head_blocks, outer, inner) * batch / 1e9,
                lambda m=outer, n=inner: sample_tmd(student, noise, cond, m, n, seeded()),
            )
    progress(f"sampling: {len(samplers)} samplers x {repeats} repeats")
    seconds = time_round_robin({name: fn for name, (_, _, fn) in samplers.items()}, repeats, warmup, device)
    teacher_name = next(iter(samplers))
    teacher_gflop, teacher_s = samplers[teacher_name][1], seconds[teacher_name]
    sampling = []
    for name, (nfe, gflop, _) in samplers.items():
        predicted = teacher_nfe / nfe
        measured = teacher_s / seconds[name]
        sampling.append(
            {
                "sampler": name,
                "eff_nfe": nfe,
                "nfe_speedup": predicted,
                "flop_speedup": teacher_gflop / gflop,
                "ms": 1000 * seconds[name],
                "speedup": measured,
                "measured/nfe": measured / predicted,
                "gflop": gflop,
                "tflop/s": gflop / seconds[name] / 1000,
            }
        )

    # ---- components: what one call of each part costs against one teacher forward of the same batch
    doubled = lambda x: torch.cat([x, x])  # noqa: E731
    t_mid = torch.full((batch,), 0.5, device=device)
    with torch.no_grad():
        features = student.backbone(noise, t_mid, cond)
    parts = {
        "teacher forward, batch 2B (CFG)": (
            2.0,
            2 * forward_gflop(latent),
            lambda: teacher.velocity(doubled(noise), doubled(t_mid), doubled(cond)),
        ),
        "teacher forward, batch B": (1.0, forward_gflop(latent), lambda: teacher.velocity(noise, t_mid, cond)),
        "tmd backbone, batch B": (
            (blocks - head_blocks) / blocks,
            flops.backbone_flops(config, latent, text_len, head_blocks) * batch / 1e9,
            lambda: student.backbone(noise, t_mid, cond),
        ),
        "tmd head step, batch B": (
            head_blocks / blocks,
            flops.head_flops(config, latent, text_len, head_blocks) * batch / 1e9,
            lambda: student.head(noise, 0.5, 0.25, features),
        ),
    }
    progress("components")
    with torch.no_grad():
        part_s = time_round_robin({name: fn for name, (_, _, fn) in parts.items()}, repeats, warmup, device)
    forward_s = part_s["teacher forward, batch B"]
    components = [
        {
            "part": name,
            "nfe_cost": nfe,
            "flop_cost": gflop / forward_gflop(latent),
            "measured_cost": part_s[name] / forward_s,
            "ms": 1000 * part_s[name],
            "gflop": gflop,
            "tflop/s": gflop / part_s[name] / 1000,
        }
        for name, (nfe, gflop, _) in parts.items()
    ]

    # ---- training: one training_step with backward + AdamW per update
    trainers: dict[str, Callable[[], Any]] = {}
    for name in ("tm", "tmd", "dmd2"):
        method_cls = get_method(name)
        cfg = method_cls.Config(head_blocks=head_blocks) if name in ("tm", "tmd") else method_cls.Config()
        turns = {"": 0} if name == "tm" else {" (generator turn)": 0, " (critic turn)": 1}
        trainers.update(
            {f"{name}{suffix}": fn for suffix, fn in training_steps(method_cls, cfg, teacher, train_batch, turns).items()}
        )
    progress(f"training: {len(trainers)} steps x {repeats} repeats")
    train_s = time_round_robin(trainers, repeats, max(warmup, 1), device)
    training = [{"step": name, "ms": 1000 * s} for name, s in train_s.items()]

    # ---- scaling with frames and resolution
    scaling = []
    for shape in _scaling_latents(latent, config, 2 if settings.quick else 3):
        x = torch.randn(batch, *shape, generator=g, device=device)
        fns = {
            "forward": lambda x=x: teacher.velocity(x, t_mid, cond),
            "tmd": lambda x=x: sample_tmd(student, x, cond, 2, 4, seeded()),
        }
        progress(f"scaling: latent {shape}")
        with torch.no_grad():
            s = time_round_robin(fns, repeats, warmup, device)
        tmd_gflop = flops.tmd_sample_flops(config, shape, text_len, head_blocks, 2, 4) * batch / 1e9
        scaling.append(
            {
                "latent": "x".join(map(str, shape)),
                "tokens": flops.tokens(config, shape),
                "forward_ms": 1000 * s["forward"],
                "forward_tflop/s": forward_gflop(shape) / s["forward"] / 1000,
                "tmd2x4_ms": 1000 * s["tmd"],
                "tmd2x4_tflop/s": tmd_gflop / s["tmd"] / 1000,
            }
        )
    base = scaling[0]
    for row in scaling:
        row["forward_growth"] = row["forward_ms"] / base["forward_ms"]
        row["tmd2x4_growth"] = row["tmd2x4_ms"] / base["tmd2x4_ms"]

    # ---- softmax against linear attention (LinVideo), one block per pass
    attention_tokens = ATTENTION_TOKENS + (ATTENTION_TOKENS_GPU if device.type == "cuda" and not settings.quick else ())
    progress(f"attention: tokens {attention_tokens}")
    attention = attention_scaling(teacher, attention_tokens, repeats, warmup, device)

    fast_path = []
    if settings.fast_path:
        progress("fast path: " + ", ".join(FAST_PATH_KERNELS[device.type]) + (", compile" if settings.compile else ""))
        fast_path = fast_path_table(teacher, head_blocks, noise, cond, t_mid, repeats, warmup, device, settings.compile)

    # ---- peak memory, one more call per row after all timing
    with torch.no_grad():
        for row in sampling:
            row["peak_mib"] = peak_mib(samplers[row["sampler"]][2], device)
    for row in training:
        row["peak_mib"] = peak_mib(trainers[row["step"]], device)

    # ---- what the shipped Wan stage-2 configs hold per process (built on the meta device, no weights)
    progress("memory: shipped stage-2 configs at 8 and 16 processes")
    memory = [] if settings.quick else stage2_memory_table()

    return {
        "meta": meta,
        "memory": memory,
        "sampling": sampling,
        "components": components,
        "training": training,
        "generator_step": generator_step,
        "scaling": scaling,
        "attention": attention,
        "fast_path": fast_path,
    }


def format_report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    header = (
        f"model {meta['model']} ({meta['parameters']:,} parameters, {meta['blocks']} blocks, head H={meta['head_blocks']}), "
        f"weights: {meta['weights']}; students: {meta['students']}\n"
        f"latent {'x'.join(map(str, meta['latent']))} ({meta['tokens']} tokens), text {meta['text_len']} tokens, "
        f"batch {meta['batch']}, {meta['device']} ({meta['device_name']}), {meta['dtype']}, {meta['threads']} threads, "
        f"median of {meta['repeats']} after {meta['warmup']} warm-up, torch {meta['torch']}, {meta['date']}"
    )
    sections = [
        ("Sampling (speed-up vs the teacher; measured/nfe = measured speed-up / effective-NFE speed-up)", "sampling"),
        ("Components (cost in units of one teacher forward at batch B: effective-NFE price, FLOP model, measured)", "components"),
        ("Training step (backward + AdamW per update)", "training"),
        ("Generator step at the paper's settings, TMD stage 2 against DMD2-v (the paper: under 17% extra)", "generator_step"),
        ("Scaling with frames and resolution (teacher forward at batch B; TMD 2x4 sampler)", "scaling"),
        ("Softmax vs linear self-attention (LinVideo): one transformer block per pass, batch 1", "attention"),
        ("Fast path (teacher forward at batch B and the TMD 2x4 sampler; speed-up against the first row)", "fast_path"),
        (
            "Memory per process of the shipped TMD stage-2 configs (GiB, FSDP-sharded weights + AdamW; activations extra)",
            "memory",
        ),
    ]
    body = [f"{title}\n{format_table(result[key])}" for title, key in sections if result.get(key)]
    return "\n\n".join([header, *body, f"peak_mib: {meta['memory']}"])


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
