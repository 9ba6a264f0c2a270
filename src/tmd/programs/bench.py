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
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tmd import flow
from tmd.config import load_config
from tmd.eval import flops
from tmd.methods import get_method
from tmd.models.fastpath import attention_kernel, compile_blocks
from tmd.models.linear_attention import linearise, round_selection
from tmd.models.split import TMDStudent
from tmd.models.wan import (
    WAN_1_3B_CONFIG,
    WAN_1_3B_LATENT,
    WAN_TEXT_LEN,
    WanTeacher,
    cast_transformer,
    load_teacher,
    parameter_count,
)
from tmd.rng import BatchRandom
from tmd.sampling import sample_few_step, sample_teacher, sample_tmd
from tmd.world.autoencoder import AutoencoderConfig
from tmd.world.benchmark import format_table
from tmd.world.data import DEFAULT_ASSETS, TEACHER_DIR
from tmd.world.spec import WorldConfig
from tmd.world.teacher import WorldTeacherConfig, transformer_config

TEACHER_STEPS = 50
TEACHER_GUIDANCE = 5.0
TEACHER_SHIFT = 5.0
WORLD_CONFIG_FILE = "world_teacher.yaml"


@dataclass
class BenchModel:
    """A teacher to benchmark with the shapes it is used at."""

    name: str
    config: dict[str, Any] | None  # None: read from ``path`` when the teacher is loaded
    latent: tuple[int, int, int, int] | None
    text_len: int | None  # None: Wan's 512 for a 4096-wide text encoder (UMT5), else 8
    head_blocks: int | None
    weights: str
    path: str | None = None  # what ``load_teacher`` loads; None builds ``config`` with random weights


def world_model() -> BenchModel:
    """The synthetic world's teacher: the shipped one's config if built, else the shipped ``world_teacher.yaml``."""
    cfg = load_config(WorldTeacherConfig, WORLD_CONFIG_FILE)
    shipped = DEFAULT_ASSETS / TEACHER_DIR / "config.json"
    if shipped.is_file():
        config, source = json.loads(shipped.read_text()), str(shipped.parent)
    else:
        config, source = transformer_config(cfg, cfg.autoencoder.latent_channels, cfg.text.dim), WORLD_CONFIG_FILE
    down = AutoencoderConfig()
    _, frames, height, width = WorldConfig().video_shape
    latent = (config["in_channels"], frames // down.temporal_down, height // down.spatial_down, width // down.spatial_down)
    return BenchModel("world", config, latent, cfg.text.max_length, 2, f"random (architecture of {source})")


def resolve_model(spec: str) -> BenchModel:
    """``world``, ``wan1.3b``, or anything ``load_teacher`` takes (a diffusers folder, a config file, ``tiny``)."""
    if spec == "world":
        return world_model()
    if spec == "wan1.3b":
        return BenchModel("wan1.3b", dict(WAN_1_3B_CONFIG), WAN_1_3B_LATENT, WAN_TEXT_LEN, 5, "random (Wan2.1 1.3B architecture)")
    weights = f"loaded from {spec}" if Path(spec).is_dir() else "random"
    return BenchModel(spec, None, None, None, None, weights, path=spec)


# --------------------------------------------------------------------------------------------- timing


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """CUDA memory a call allocates above what was in use before it; None on CPU.

    On CPU neither glibc's heap (it keeps freed tensor buffers and reuses them, so peak RSS rises only
    past earlier rows' peaks) nor returning large buffers with mmap (the kernel's peak RSS then misses
    them) gave a per-call peak when tried, so CPU rows say n/a rather than print a misleading number.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_round_robin(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per callable; every round runs each callable once, in order."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_seconds(fn, device))
    return {name: statistics.median(values) for name, values in samples.items()}


# --------------------------------------------------------------------------------------------- linear attention

ATTENTION_TOKENS = (256, 1024, 4096)
"""Sequence lengths of the softmax-vs-linear attention table; a GPU run adds ``ATTENTION_TOKENS_GPU``."""
ATTENTION_TOKENS_GPU = (16384, 32768)


def token_grid(tokens: int) -> tuple[int, int, int]:
    """A near-cubic (frames, height, width) grid of ``tokens`` post-patch cells (a power of 2)."""
    if tokens < 1 or tokens & (tokens - 1):
        raise ValueError(f"token counts must be powers of 2, got {tokens}")
    bits = tokens.bit_length() - 1
    return 2 ** (bits // 3), 2 ** ((bits + 1) // 3), 2 ** ((bits + 2) // 3)


def attention_scaling(
    teacher, tokens: tuple[int, ...], repeats: int, warmup: int, device: torch.device, text_len: int = 8
) -> list[dict[str, Any]]:
    """Latency of one transformer block per pass (batch 1) with softmax self-attention and with LinVideo's
    linear attention, at growing sequence lengths: softmax grows as n^2, linear as n."""
    linear = linearise(teacher, copy_model=True)
    round_selection(linear, 0)
    blocks = {"softmax": teacher.transformer.blocks[0], "linear": linear.transformer.blocks[0]}
    config = teacher.config
    dim = config.num_attention_heads * config.attention_head_dim
    g = torch.Generator(device).manual_seed(0)
    rows = []
    for n in tokens:
        grid = token_grid(n)
        if max(grid) > config.rope_max_seq_len:
            raise ValueError(f"{n} tokens need a {grid} grid, beyond the model's rope_max_seq_len {config.rope_max_seq_len}")
        latent = torch.zeros(
            1, config.in_channels, *(size * patch for size, patch in zip(grid, config.patch_size)), device=device
        )
        rotary = teacher.transformer.rope(latent)
        hidden = torch.randn(1, n, dim, generator=g, device=device, dtype=teacher.dtype)
        text = torch.randn(1, text_len, dim, generator=g, device=device, dtype=teacher.dtype)
        temb = 0.1 * torch.randn(1, 6, dim, generator=g, device=device, dtype=teacher.dtype)
        with torch.no_grad():
            s = time_round_robin(
                {name: lambda b=block: b(hidden, text, temb, rotary) for name, block in blocks.items()}, repeats, warmup, device
            )
        rows.append(
            {
                "tokens": n,
                "softmax_block_ms": 1000 * s["softmax"],
                "linear_block_ms": 1000 * s["linear"],
                "linear_speedup": s["softmax"] / s["linear"],
            }
        )
    for row in rows:
        row["softmax_growth"] = row["softmax_block_ms"] / rows[0]["softmax_block_ms"]
        row["linear_growth"] = row["linear_block_ms"] / rows[0]["linear_block_ms"]
    return rows


# --------------------------------------------------------------------------------------------- benchmark


FAST_PATH_KERNELS = {"cpu": ("math",), "cuda": ("math", "efficient", "flash", "cudnn")}
"""Attention kernels timed against PyTorch's own choice (``sdpa``); ``math`` is the unfused reference."""


def fast_path_table(
    teacher,
    head_blocks: int,
    noise: Tensor,
    cond: Tensor,
    t: Tensor,
    repeats: int,
    warmup: int,
    device: torch.device,
    compile: bool,
) -> list[dict[str, Any]]:
    """The same two calls under each fast-path switch, timed round-robin in one run: SDPA's own kernel
    choice against forced kernels, bf16 weights (when the bench runs fp32), and compiled blocks."""
    import copy

    def variant(model, kernel: str = "sdpa"):
        student = TMDStudent.from_teacher(model, head_blocks=head_blocks).eval()

        def forward():
            with attention_kernel(kernel):
                return model.velocity(noise, t, cond)

        def tmd():
            with attention_kernel(kernel):
                return sample_tmd(student, noise, cond, 2, 4, torch.Generator(device).manual_seed(0))

        return forward, tmd

    dtype = str(teacher.dtype).removeprefix("torch.")
    variants = {f"{dtype} eager, sdpa (PyTorch's choice)": variant(teacher)}
    for kernel in FAST_PATH_KERNELS[device.type]:
        variants[f"{dtype} eager, {kernel} kernel"] = variant(teacher, kernel)
    if teacher.dtype == torch.float32:
        bf16 = WanTeacher(cast_transformer(copy.deepcopy(teacher.transformer), torch.bfloat16)).eval()
        variants["bfloat16 eager, sdpa"] = variant(bf16)
    if compile:
        variants[f"{dtype} compiled blocks, sdpa"] = variant(compile_blocks(copy.deepcopy(teacher)))
    fns, unsupported = {}, {}
    with torch.no_grad():
        for name, (forward, tmd) in variants.items():
            try:  # a kernel may not take this dtype or shape (flash needs half precision)
                forward()
            except RuntimeError as error:
                unsupported[name] = str(error).splitlines()[0][:80]
                continue
            fns[f"{name}|forward"], fns[f"{name}|tmd"] = forward, tmd
        seconds = time_round_robin(fns, repeats, max(warmup, 1), device)
    rows, base = [], None
    for name in variants:
        if name in unsupported:
            rows.append(
                {
                    "variant": name,
                    "forward_ms": float("nan"),
                    "tmd2x4_ms": float("nan"),
                    "forward_speedup": float("nan"),
                    "tmd2x4_speedup": float("nan"),
                    "note": unsupported[name],
                }
            )
            continue
        forward_s, tmd_s = seconds[f"{name}|forward"], seconds[f"{name}|tmd"]
        base = base or (forward_s, tmd_s)
        rows.append(
            {
                "variant": name,
                "forward_ms": 1000 * forward_s,
                "tmd2x4_ms": 1000 * tmd_s,
                "forward_speedup": base[0] / forward_s,
                "tmd2x4_speedup": base[1] / tmd_s,
                "note": "",
            }
        )
    return rows


def training_steps(method_cls, cfg, teacher, batch: dict, turns: dict[str, int]) -> dict[str, Callable[[], Any]]:
    """``training_step`` of a fresh method built from ``teacher``, backward + AdamW per update, at each
    given step index (TTUR: step 0 is the generator's turn, step 1 the critics')."""
    device = batch["x"].device
    method = method_cls.from_teacher(cfg, teacher).to(device)
    method.generator = BatchRandom(torch.Generator(device).manual_seed(0))
    optimizers = {group: torch.optim.AdamW(params, lr=1e-5) for group, params in method.parameter_groups().items()}

    def update(group, loss, terms=None):
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizers[group].step()

    return {name: lambda step=step: method.training_step(batch, step, update) for name, step in turns.items()}


def generator_step_ratio(teacher, batch: dict, repeats: int, warmup: int, inner_steps: int = 2) -> dict[str, Any]:
    """The TMD stage-2 generator step against the DMD2-v generator step, timed round-robin in one run, at the
    paper's settings: N = 2 inner steps, a head of H = L / 6 blocks (rounded), 2 outer steps, GAN 0.03.
    Both steps hold everything that differs (student sample with gradients) and everything that does not
    (real and fake scores, the GAN's teacher features, backward, AdamW)."""
    head_blocks = max(1, round(teacher.num_blocks / 6))
    shared = {"outer_steps": 2, "gan_weight": 0.03}
    steps = {
        "tmd": training_steps(
            get_method("tmd"),
            get_method("tmd").Config(head_blocks=head_blocks, inner_steps=inner_steps, **shared),
            teacher,
            batch,
            {"generator": 0},
        )["generator"],
        "dmd2": training_steps(get_method("dmd2"), get_method("dmd2").Config(**shared), teacher, batch, {"generator": 0})[
            "generator"
        ],
    }
    seconds = time_round_robin(steps, repeats, max(warmup, 1), batch["x"].device)
    ratio = seconds["tmd"] / seconds["dmd2"]
    return {
        "head_blocks": f"{head_blocks}/{teacher.num_blocks}",
        "inner_steps": inner_steps,
        "tmd_ms": 1000 * seconds["tmd"],
        "dmd2_ms": 1000 * seconds["dmd2"],
        "ratio": ratio,
        "extra_%": 100 * (ratio - 1),
    }


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
    if device.type == "cpu" and settings.model == "wan1.3b":
        raise ValueError(
            "wan1.3b is a GPU benchmark (three 1.3B-parameter copies for training, 32760 tokens per sample); "
            "pass --device cuda, or --model world on CPU"
        )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[settings.dtype]
    model = resolve_model(settings.model)
    batch = settings.batch or (1 if model.name == "wan1.3b" else 4)
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

    return {
        "meta": meta,
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
    ]
    body = [f"{title}\n{format_table(result[key])}" for title, key in sections if result.get(key)]
    return "\n\n".join([header, *body, f"peak_mib: {meta['memory']}"])


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
