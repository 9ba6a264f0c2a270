"""One distillation run: config -> teacher and data -> method -> trainer -> export of the EMA generator.

Data is the synthetic world (``data_kind: world``, the shipped teacher) or a ``tmd prepare`` folder
(``data_kind: prepared``, the Wan pipeline it was prepared with). With ``data.linearised_teacher`` (a
linvideo run's ``student.safetensors``) any method distils that linearised model instead of the teacher.

``tmd train`` and ``tmd demo`` both go through :func:`train_run`, so a demo row is exactly what the
same config gives on the command line. Under ``torchrun`` it shards the teacher and every trained module
with FSDP2 (``tmd.train.distributed``) and only rank 0 writes the exported weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tmd.config import ConfigError, RunConfig, to_dict
from tmd.data.prepare import PreparedDataset
from tmd.data.source import DataSource
from tmd.files import check_safetensors
from tmd.methods import METHODS, get_method
from tmd.methods.linvideo import load_linearised
from tmd.models.experts import DualExpertTeacher
from tmd.models.export import save_run_weights
from tmd.models.lora import add_lora, merged_state_dict
from tmd.models.wan import load_teacher
from tmd.train.distributed import init_distributed, shard_modules
from tmd.train.hooks import eval_hook
from tmd.train.loop import Trainer, resolve_device, seed_everything
from tmd.train.memory import describe, estimate_state_memory
from tmd.train.resume import flatten, plan_run
from tmd.train.samples import sample_hook
from tmd.world.data import WorldAssets, world_assets_of, world_data_source

STUDENT_FILE = "student.safetensors"
"""The EMA weights of the trained generator, what a later stage or ``tmd evaluate`` loads (a LoRA run's
adapters merged in: ``tmd.models.lora``)."""


def teacher_and_data(
    cfg: RunConfig, assets: WorldAssets | None = None, device: torch.device | None = None
) -> tuple[torch.nn.Module, DataSource]:
    """The frozen teacher (on the training device: the trainer moves only what it trains) and the data source
    of the global batch ``train.batch_size``."""
    device = device if device is not None else resolve_device(cfg.train.device)
    if cfg.data_kind == "world":
        # the world's autoencoder encodes CPU-made videos, so the assets stay on the CPU; only the teacher moves
        assets = assets if assets is not None else WorldAssets(cfg.data.assets)
        data = world_data_source(assets.autoencoder, assets.text_encoder, cfg.train.batch_size, cfg.train.seed)
        # linearised on a copy: the assets' teacher may be shared (``tmd demo`` samples it as the teacher row)
        return with_linear_attention(assets.teacher.to(device), cfg.data.linearised_teacher, copy_model=True), data
    if cfg.data_kind == "prepared":
        data = PreparedDataset(cfg.data.path, cfg.train.batch_size, cfg.train.seed)
        # a Wan2.2 A14B teacher comes with both experts (tmd.models.experts); FSDP shards each
        source, wan, guidance_2 = cfg.data.teacher or data.index["model"], cfg.data.wan, cfg.data.guidance_2
        teacher = load_teacher(source, device=device, experts=None, family=wan, guidance_2=guidance_2)
        if isinstance(teacher, DualExpertTeacher) and not get_method(cfg.method_name).trains_on_two_experts:
            # the others form CFG from two teacher calls with one scale, or copy the teacher whole: not built for it
            trained = ", ".join(sorted(name for name, cls in METHODS.items() if cls.trains_on_two_experts))
            raise ConfigError(
                f"method_name {cfg.method_name!r} is not built for a two-expert (Wan2.2 A14B) teacher {source}; "
                f"methods that are: {trained}"
            )
        # in place: this teacher is the run's own, and a copy would hold a Wan model twice on the device
        return with_linear_attention(teacher, cfg.data.linearised_teacher, copy_model=False), data
    raise ValueError(f"tmd train knows data kinds 'world' and 'prepared', got {cfg.data_kind!r}")


def synthesized_world(cfg: RunConfig, data: PreparedDataset) -> WorldAssets | None:
    """The world's assets when ``tmd synthesize --model world`` made the prepared data (its teacher sits in
    them): evaluation and sample videos then use the world's benchmark, text encoder and autoencoder."""
    root = world_assets_of(Path(cfg.data.teacher or data.index["model"]))
    return WorldAssets(root) if root is not None else None


def with_linear_attention(teacher: torch.nn.Module, weights: str | None, copy_model: bool) -> torch.nn.Module:
    """``teacher`` itself, or, when ``data.linearised_teacher`` names a linvideo run's export, that
    linearised model (frozen) built on it: every method then distils it in place of the teacher."""
    if weights is None:
        return teacher
    try:
        return load_linearised(teacher, weights, copy_model=copy_model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.linearised_teacher: {e}") from None


def check_weight_files(cfg: RunConfig) -> None:
    """Every config value naming a ``.safetensors`` file (``method.init_from``, ...) names a complete one;
    the loaders deep inside a method would fail on a truncated one without naming it."""
    for key, value in flatten(to_dict(cfg)).items():
        if isinstance(value, str) and value.endswith(".safetensors") and Path(value).is_file():
            check_safetensors(value, key)


@dataclass
class TrainedRun:
    weights: Path
    """``run_dir/student.safetensors``: the EMA generator, with the method config as metadata."""
    generator: torch.nn.Module
    """The trained generator module holding its EMA weights, in eval mode and frozen: ready to sample
    (sharded across ranks in a ``torchrun`` run)."""


def train_run(
    cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False, assets: WorldAssets | None = None
) -> TrainedRun:
    """Train ``cfg`` and export the EMA generator to ``run_dir/student.safetensors``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # before the teacher is loaded (minutes for Wan): a refused resume or a broken weights file fails at once
    plan_run(cfg, run_dir if run_dir is not None else cfg.train.out_dir, resume)
    check_weight_files(cfg)
    ctx = init_distributed(resolve_device(cfg.train.device))
    if cfg.data_kind == "world" and assets is None:
        assets = WorldAssets(cfg.data.assets)  # loaded here because evaluation during training scores on it too
    teacher, data = teacher_and_data(cfg, assets, ctx.device)
    if assets is None and isinstance(data, PreparedDataset):
        assets = synthesized_world(cfg, data)
    # new modules (discriminator, TMD head parts) draw their initial weights from the global RNG; FSDP
    # shards each rank's own copy, so every rank must draw the same ones
    seed_everything(cfg.train.seed)
    # the frozen teacher's passes carry gradients too (the GAN reads its features of the student's sample);
    # its copies (fake scores) inherit the setting. Checkpointing only acts where gradients are recorded.
    teacher.activation_checkpointing = cfg.train.activation_checkpointing
    method = get_method(cfg.method_name).from_teacher(cfg.method, teacher, cfg.train.activation_checkpointing)
    lora = cfg.train.lora
    if lora.enabled:
        add_lora(method.state_modules(), lora)
    if ctx.is_main:
        print(describe(estimate_state_memory(method, teacher, ctx.world_size)), flush=True)
    eval_fn = eval_hook(cfg, method.exported(), assets, ctx.enabled)
    # prompts embedded (and a prompt the tokenizer rejects refused) before any training
    sample_fn = sample_hook(cfg, method.exported(), data, assets, run_dir if run_dir is not None else cfg.train.out_dir, ctx)
    shard_modules({**method.state_modules(), "teacher": teacher}, ctx, mixed_precision=cfg.train.precision == "bf16")
    result = Trainer(method, data, cfg, run_dir, resume, eval_fn=eval_fn, dist=ctx, sample_fn=sample_fn).train()
    name, generator = method.exported()
    weights = result.ema[name]
    path = result.run_dir / STUDENT_FILE
    if ctx.is_main:
        exported = merged_state_dict(generator, weights) if lora.enabled else weights
        save_run_weights(path, exported, cfg.method_name, to_dict(cfg.method))
        (result.run_dir / "student.json").write_text(
            json.dumps({"method": cfg.method_name, "ema_module": name, "step": result.step, "metrics": result.metrics}, indent=2)
        )
    ctx.barrier()
    set_model_state_dict(generator, weights, options=StateDictOptions(full_state_dict=True))
    return TrainedRun(path, generator.eval().requires_grad_(False))
