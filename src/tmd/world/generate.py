"""``tmd generate`` for the synthetic world: students of ``tmd demo`` / ``tmd train`` runs to mp4 and GIF.

The model is a world run's ``student.safetensors`` (its run folder's ``config.yaml`` names the world's
assets), a student folder ``tmd export`` made from one (its recorded teacher is the world teacher
folder), or the world teacher folder itself. Prompts are any of the world's 72 (``tmd.world.spec.all_prompts``);
videos are decoded with the world's autoencoder and written, enlarged ``SCALE`` times, as mp4 and GIF.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from tmd.files import slug, write_mp4
from tmd.methods import get_method
from tmd.methods.linvideo import load_linearised
from tmd.models.anyflow import AnyFlowStudent
from tmd.models.export import run_metadata, student_from_run
from tmd.models.fastpath import attention_kernel
from tmd.models.folder import TRANSFORMER_DIR, is_student_folder, read_student_config
from tmd.models.split import TMDStudent
from tmd.models.wan import load_teacher
from tmd.pipelines.videos import MANIFEST_FILE, resolve_sampling
from tmd.sampling import sample_teacher
from tmd.train.resume import CONFIG_FILE
from tmd.train.run import with_linear_attention
from tmd.world.data import WorldAssets, world_assets_of

SCALE = 4
"""World videos are 32 x 32: nearest-neighbour enlarged for viewing."""
GIF_FRAME_SECONDS = 0.25


@dataclass
class WorldModel:
    kind: str  # "teacher", "tmd_student", "few_step" or "anyflow"
    model: nn.Module
    assets: Any  # tmd.world.data.WorldAssets
    source: Path
    method: dict[str, Any] | None = None
    """For a few-step generator, the run's ``{"name", "config"}``: it is sampled as that method samples."""


def load_world_model(path: str | Path, device: torch.device) -> WorldModel | None:
    """The world model at ``path``, or None when ``path`` is not one (a Wan pipeline or its students)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return _from_run(path, device)
    if path.is_dir() and world_assets_of(path) is not None:
        return _from_teacher_folder(path, device)
    if is_student_folder(path):
        teacher = read_student_config(path).get("teacher")
        if teacher is not None and world_assets_of(Path(teacher)) is not None:
            return _from_export(path, Path(teacher), device)
    return None


def _assets(root: str | Path | None, device: torch.device):
    return WorldAssets(root, device=device)


def _from_teacher_folder(path: Path, device: torch.device) -> WorldModel:
    assets = _assets(world_assets_of(path), device)
    return WorldModel("teacher", assets.teacher, assets, path)


def _from_export(path: Path, teacher: Path, device: torch.device) -> WorldModel:
    assets = _assets(world_assets_of(teacher), device)
    kind = read_student_config(path)["kind"]
    if kind == "tmd_student":
        return WorldModel("tmd_student", TMDStudent.from_pretrained(path, device=device), assets, path)
    if kind == "anyflow":
        return WorldModel("anyflow", AnyFlowStudent.from_pretrained(path, device=device), assets, path)
    few_step = load_teacher(path / TRANSFORMER_DIR, device=device)
    return WorldModel("few_step", few_step, assets, path, read_student_config(path).get("method"))


def _from_run(path: Path, device: torch.device) -> WorldModel:
    config_file = path.parent / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_FILE} next to {path}: tmd generate reads a run's student.safetensors in its run folder"
        )
    config = yaml.safe_load(config_file.read_text()) or {}
    if config.get("data_kind") != "world":
        raise ValueError(
            f"{path} is from a {config.get('data_kind')!r} run, not a world one: export it first "
            "(tmd export --run RUN/student.safetensors --teacher PIPELINE --out DIR) and generate from that folder"
        )
    data = config.get("data") or {}
    assets = _assets(data.get("assets"), device)
    if run_metadata(path)["method"] == "linvideo":  # a multi-step model: sampled like the teacher, with CFG
        return WorldModel("teacher", load_linearised(assets.teacher, path, copy_model=True), assets, path)
    teacher = with_linear_attention(copy.deepcopy(assets.teacher), data.get("linearised_teacher"), copy_model=False)
    model, method_config = student_from_run(path, teacher)
    name = run_metadata(path)["method"]
    # the method decides how its generator samples: MeanFlow's has the TMD student's form but jumps as a flow map
    if get_method(name).samples_with_inner_steps:
        kind = "tmd_student"
    else:
        kind = "anyflow" if isinstance(model, AnyFlowStudent) else "few_step"
    return WorldModel(kind, model.to(device).eval(), assets, path, {"name": name, "config": method_config})


def video_frames(video: torch.Tensor) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1] -> uint8 (F, SCALE H, SCALE W, 3)."""
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    return frames.repeat_interleave(SCALE, dim=1).repeat_interleave(SCALE, dim=2)


def generate_world(
    world: WorldModel,
    prompts: list[str],
    out: str | Path,
    *,
    steps: int | None = None,
    inner_steps: int | None = None,
    guidance: float | None = None,
    shift: float | None = None,
    seed: int = 0,
    batch_size: int = 1,
    fps: int = 8,
    save_latents: bool = False,
    progress: bool = True,
    attention: str = "sdpa",
) -> list[dict[str, Any]]:
    """As ``tmd.programs.generate.generate``: one mp4 and one GIF per prompt, ``generation.json``; the teacher samples
    with the world's CFG scale and shift (Euler, the benchmark's sampler), students without CFG."""
    import imageio.v2 as imageio
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("no prompts to generate")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    kind, model, assets = world.kind, world.model, world.assets
    teacher = kind == "teacher"
    sampling = resolve_sampling(kind, world.source, steps, inner_steps, guidance, shift, assets.guidance, lambda: assets.shift)
    steps, guidance = sampling.steps, sampling.guidance
    nfe = sampling.effective_nfe(model)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = assets.device
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(prompts), desc=f"world {kind} {nfe:g} NFE", unit="video", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        seeds = [seed + start + i for i in range(len(batch))]
        noise = torch.cat([torch.randn(1, *assets.latent_shape(), generator=torch.Generator().manual_seed(s)) for s in seeds])
        noise = noise.to(device)
        began = time.perf_counter()
        cond, negative = assets.encode_prompts(batch)
        with attention_kernel(attention), torch.no_grad():
            if teacher:
                latents = sample_teacher(model, noise, cond, negative, steps, guidance, sampling.shift)
            else:
                latents = sampling.sample_student(model, world.method, noise, cond, seeds[0])
        videos = assets.decode(latents).cpu()
        seconds = (time.perf_counter() - began) / len(batch)
        for i, prompt in enumerate(batch):
            name = f"{start + i:04d}-{slug(prompt)}"
            frames = video_frames(videos[i])
            write_mp4(out / f"{name}.mp4", frames, fps)
            imageio.mimsave(out / f"{name}.gif", list(frames.numpy()), duration=GIF_FRAME_SECONDS, loop=0)
            if save_latents:
                save_file(
                    {"latents": latents[i].contiguous().cpu()}, str(out / f"{name}.safetensors"), metadata={"prompt": prompt}
                )
            records.append(
                {
                    "file": f"{name}.mp4",
                    "gif": f"{name}.gif",
                    "prompt": prompt,
                    "seed": seeds[i],
                    "effective_nfe": nfe,
                    "seconds": seconds,
                }
            )
            bar.write(f"{name}.mp4 / .gif: {nfe:g} effective NFE, {seconds:.3f} s")
        bar.update(len(batch))
    bar.close()
    _, frames, height, width = (int(s) for s in videos.shape[1:])
    settings = {
        "model": str(world.source),
        "kind": kind,
        "world": str(assets.path),
        "steps": steps,
        "inner_steps": sampling.inner_steps,
        "guidance": guidance,
        "shift": sampling.shift,
        "scheduler": "euler" if teacher else None,
        "frames": frames,
        "height": height * SCALE,
        "width": width * SCALE,
        "fps": fps,
    }
    (out / MANIFEST_FILE).write_text(json.dumps({"settings": settings, "videos": records}, indent=2) + "\n")
    return records
