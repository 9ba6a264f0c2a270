"""Text-to-video generation from a Wan teacher or an exported student, decoded to mp4 files.

``model`` is either a diffusers Wan pipeline root (the teacher: its own scheduler, UniPC for the published
Wan2.1 pipelines, with CFG; or tmd's Euler sampler with ``scheduler="euler"``), a student folder from
``tmd.models.export`` or a pipeline folder from ``tmd.pipelines`` (TMD or plain few-step; sampled
without CFG). The text encoder and the VAE always come from a pipeline root: the teacher's own, the
pipeline folder's, or for a student folder the one recorded in its ``config.json`` (``pipeline``
overrides it). Models of the synthetic world (a world run's ``student.safetensors``, its export, the
world teacher) go to ``tmd.world.generate``, which decodes with the world's autoencoder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tmd.files import WAN_FPS, check_output_dir, make_output_dir, save_safetensors, slug, write_mp4
from tmd.models.anyflow import AnyFlowStudent
from tmd.models.fastpath import attention_kernel, compile_blocks
from tmd.models.folder import TRANSFORMER_DIR, is_student_folder, read_student_config, refuse_image
from tmd.models.split import TMDStudent
from tmd.models.text import WAN_NEGATIVE_PROMPT, TextEncoder
from tmd.models.vae import decode_video, latent_shape, load_vae
from tmd.models.wan import load_teacher
from tmd.pipelines.export import is_anyflow_pipeline, is_few_step_pipeline, is_tmd_pipeline
from tmd.pipelines.tmd_pipeline import load_student
from tmd.pipelines.videos import MANIFEST_FILE, resolve_sampling
from tmd.sampling import sample_teacher, sample_with_scheduler
from tmd.world.generate import generate_world, load_world_model

DEFAULT_GUIDANCE = 5.0
DEFAULT_SHIFT = 5.0
"""Teacher time shift when the pipeline's scheduler config names none."""


# ----------------------------------------------------------------------------------------------
# Models.


@dataclass
class GenerationModel:
    kind: str  # "teacher" or one of tmd.models.folder.STUDENT_KINDS
    model: nn.Module
    pipeline: Path
    """The pipeline root the text encoder and VAE are loaded from."""
    method: dict[str, Any] | None = None
    """A few-step student folder's ``{"name", "config"}`` of the run that trained it (``export_student``)."""


def load_generation_model(
    path: str | Path,
    pipeline: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    guidance_2: float | None = None,
) -> GenerationModel:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if is_tmd_pipeline(path):
        return GenerationModel("tmd_student", load_student(path, dtype, device), Path(pipeline or path))
    if is_few_step_pipeline(path):
        return GenerationModel("few_step", load_teacher(path, dtype=dtype, device=device), Path(pipeline or path))
    if is_anyflow_pipeline(path):
        return GenerationModel("anyflow", AnyFlowStudent.from_pretrained(path, dtype, device), Path(pipeline or path))
    if not is_student_folder(path):
        # a Wan2.2 A14B teacher: both experts, the one not in use off the GPU
        teacher = load_teacher(
            path, dtype, device, experts=None, guidance_2=guidance_2, offload=torch.device(device).type != "cpu"
        )
        return GenerationModel("teacher", teacher, Path(pipeline or path))
    config = read_student_config(path)
    if pipeline is None:
        pipeline = config.get("teacher")
        if pipeline is None:
            raise ValueError(f"{path} does not record its teacher pipeline; pass --pipeline PATH (a Wan pipeline root)")
        if not Path(pipeline).is_dir():
            raise FileNotFoundError(
                f"{path} records its teacher pipeline as {pipeline}, which does not exist here; pass --pipeline PATH "
                "(the Wan pipeline root the student was distilled from)"
            )
    if config["kind"] == "tmd_student":
        model = TMDStudent.from_pretrained(path, dtype=dtype, device=device)
    elif config["kind"] == "anyflow":
        model = AnyFlowStudent.from_pretrained(path, dtype, device)
    else:
        model = load_teacher(path / TRANSFORMER_DIR, dtype=dtype, device=device)
    return GenerationModel(config["kind"], model, Path(pipeline), config.get("method"))


SCHEDULERS = ("pipeline", "euler")
"""How a teacher samples: the scheduler its pipeline ships (as ``WanPipeline`` does), or tmd's Euler sampler."""


def load_scheduler(pipeline: Path, shift: float | None = None):
    """The diffusers scheduler in ``pipeline/scheduler`` (None if there is none), its time shift set to
    ``shift`` when given (``shift`` or UniPC's ``flow_shift``, whichever it has)."""
    import diffusers

    config_file = pipeline / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"{config_file} names {config.get('_class_name')!r}, not a diffusers scheduler")
    overrides = {key: shift for key in ("shift", "flow_shift") if shift is not None and key in config}
    return cls.from_config(config, **overrides)


def teacher_shift(pipeline: Path) -> float:
    """The time shift the pipeline's scheduler was saved with (``shift`` or UniPC's ``flow_shift``)."""
    config_file = pipeline / "scheduler" / "scheduler_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for key in ("shift", "flow_shift"):
            if config.get(key) is not None:
                return float(config[key])
    return DEFAULT_SHIFT


# ----------------------------------------------------------------------------------------------
# Generation.


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def generate(
    model_path: str | Path,
    prompts: list[str],
    out: str | Path,
    *,
    pipeline: str | Path | None = None,
    steps: int | None = None,
    inner_steps: int | None = None,
    guidance: float | None = None,
    shift: float | None = None,
    seed: int = 0,
    frames: int = 81,
    height: int = 480,
    width: int = 832,
    batch_size: int = 1,
    fps: int = WAN_FPS,
    negative_prompt: str | None = None,
    save_latents: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    progress: bool = True,
    attention: str = "sdpa",
    compile: bool = False,
    scheduler: str = "pipeline",
    guidance_2: float | None = None,
    image: Any = None,
) -> list[dict[str, Any]]:
    """Generate one mp4 per prompt into ``out``; returns (and writes to ``generation.json``) one record each.

    Video i starts from noise seeded by ``seed + i`` whatever the batch size; a student's inner noise
    is drawn per batch. The wall-clock per video covers text encoding, sampling and decoding (a batch's
    time split evenly), not model loading. ``attention`` picks the SDPA kernel and ``compile`` compiles the
    transformer blocks (``tmd.models.fastpath``; the first batch then includes compilation). ``scheduler``
    (teachers) is ``pipeline`` (the pipeline's own scheduler; Euler where it ships none) or ``euler``.
    ``guidance_2`` is a Wan2.2 A14B teacher's low-noise CFG scale (diffusers' ``guidance_scale_2``); ``image``
    (TI2V's image-to-video) is refused.
    """
    refuse_image(image)
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
    world = load_world_model(model_path, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if world is not None:
        return generate_world(
            world,
            prompts,
            out,
            steps=steps,
            inner_steps=inner_steps,
            guidance=guidance,
            shift=shift,
            seed=seed,
            batch_size=batch_size,
            fps=fps,
            save_latents=save_latents,
            progress=progress,
            attention=attention,
        )
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("no prompts to generate")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    out = check_output_dir(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_generation_model(model_path, pipeline, dtype, device, guidance_2)
    if guidance_2 is not None and not hasattr(loaded.model, "guidance_at"):
        raise ValueError(
            f"--guidance-2 is the low-noise expert's scale of a Wan2.2 A14B teacher; {model_path} has one transformer"
        )
    if compile:
        compile_blocks(loaded.model)
    teacher = loaded.kind == "teacher"
    sampling = resolve_sampling(
        loaded.kind, model_path, steps, inner_steps, guidance, shift, DEFAULT_GUIDANCE, lambda: teacher_shift(loaded.pipeline)
    )
    steps, guidance = sampling.steps, sampling.guidance
    sampler = load_scheduler(loaded.pipeline, shift) if teacher and scheduler == "pipeline" else None
    nfe = sampling.effective_nfe(loaded.model)

    vae = load_vae(loaded.pipeline, device)
    shape = latent_shape(vae, loaded.model.config, frames, height, width)
    text_encoder = TextEncoder.from_pretrained(loaded.pipeline, device=device, dtype=dtype)
    text_encoder.tokenize(prompts)  # a prompt that cannot be encoded fails here, not after the videos before it
    negative = None
    if teacher and guidance != 1.0:
        negative_prompt = WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        negative = text_encoder.encode([negative_prompt], strict=False)

    make_output_dir(out)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(prompts), desc=f"{loaded.kind} {nfe:g} NFE", unit="video", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        seeds = [seed + start + i for i in range(len(batch))]
        noise = torch.cat([torch.randn(1, *shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
        began = time.perf_counter()
        cond = text_encoder.encode(batch)
        with attention_kernel(attention):
            if sampler is not None:
                latents = sample_with_scheduler(loaded.model, noise, cond, negative, sampler, steps, guidance)
            elif teacher:
                latents = sample_teacher(loaded.model, noise, cond, negative, steps, guidance, sampling.shift)
            else:
                latents = sampling.sample_student(loaded.model, loaded.method, noise, cond, seeds[0])
        videos = torch.cat([decode_video(vae, latents[i : i + 1]) for i in range(len(batch))])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - began) / len(batch)
        for i, prompt in enumerate(batch):
            name = f"{start + i:04d}-{slug(prompt)}"
            write_mp4(out / f"{name}.mp4", videos[i], fps)
            if save_latents:
                tensors = {"latents": latents[i].contiguous().cpu()}
                save_safetensors(tensors, out / f"{name}.safetensors", metadata={"prompt": prompt})
            records.append({"file": f"{name}.mp4", "prompt": prompt, "seed": seeds[i], "effective_nfe": nfe, "seconds": seconds})
            bar.write(f"{name}.mp4: {nfe:g} effective NFE, {seconds:.2f} s")
        bar.update(len(batch))
    bar.close()
    settings = {
        "model": str(model_path),
        "kind": loaded.kind,
        "pipeline": str(loaded.pipeline),
        "steps": steps,
        "inner_steps": sampling.inner_steps,
        "guidance": guidance,
        "shift": sampling.shift,
        "scheduler": type(sampler).__name__ if sampler is not None else ("euler" if teacher else None),
        "frames": frames,
        "height": height,
        "width": width,
        "fps": fps,
        "dtype": str(dtype).removeprefix("torch."),
    }
    (out / MANIFEST_FILE).write_text(json.dumps({"settings": settings, "videos": records}, indent=2) + "\n")
    return records
