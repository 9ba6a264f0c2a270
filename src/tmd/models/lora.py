"""LoRA through peft on the Wan transformers a run trains (``train.lora``), and its merge for export.

``add_lora`` injects peft adapters (diffusers' ``add_adapter``) into every ``WanTransformer3DModel`` of the
named state modules (by default the student and the fake score): the targeted linears get trainable
``lora_A``/``lora_B`` pairs and every other parameter of the transformer is frozen, while what lies
outside it (TMD's inner block, fusion and gap embedder; the discriminator) trains fully. ``lora_B``
starts at zero, so the adapted models start as the models they adapt. The trainer drops frozen
parameters from the optimizer groups and the EMA, so a LoRA run holds AdamW state and EMA copies of
the adapters and the new parts only. FSDP2 shards adapted blocks like any other (the adapters are
submodules of the block).

``merged_state_dict`` turns the trained state (peft's names) into plain weights, ``W + (alpha / r) B A``
per adapted linear, so ``student.safetensors`` and everything downstream (``init_from``, ``tmd export``,
``tmd generate``) see an ordinary Wan transformer.
"""

from __future__ import annotations

from collections.abc import Mapping

from diffusers import AnyFlowTransformer3DModel, WanTransformer3DModel
from torch import Tensor, nn

from tmd.config import ConfigError, LoRAConfig

DEFAULT_MODULES = ("student", "fake_score")


def lora_config(cfg: LoRAConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.rank if cfg.alpha is None else cfg.alpha,
        target_modules=list(cfg.target_modules),
        init_lora_weights=True,
    )


def add_lora(modules: Mapping[str, nn.Module], cfg: LoRAConfig) -> int:
    """Adapters on the Wan transformers of ``modules[name]`` for each name in ``cfg.modules`` (default: the
    student and the fake score where there is one), in place; returns the number of adapted transformers.
    A module shared under two names (MDT-dist's student is its own fake score) is adapted once."""
    names = cfg.modules if cfg.modules is not None else [n for n in DEFAULT_MODULES if n in modules]
    unknown = [name for name in names if name not in modules]
    if unknown or not names:
        raise ConfigError(
            f"train.lora.modules names {unknown or names}, which this method does not train; it has {sorted(modules)}"
        )
    adapted: set[int] = set()
    for name in names:
        transformers = [m for m in modules[name].modules() if isinstance(m, (WanTransformer3DModel, AnyFlowTransformer3DModel))]
        if not transformers:
            raise ConfigError(f"train.lora.modules: {name!r} holds no Wan transformer, and LoRA adapts Wan's linears")
        for transformer in transformers:
            if id(transformer) in adapted:
                continue
            try:
                transformer.add_adapter(lora_config(cfg))
            except ValueError as error:  # peft: no module matched target_modules
                raise ConfigError(f"train.lora.target_modules={list(cfg.target_modules)}: {error}") from None
            adapted.add(id(transformer))
    return len(adapted)


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}


def merged_state_dict(module: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (a full state dict of ``module``, with adapters) with every adapted linear merged into
    its plain ``weight``/``bias`` keys: peft's ``get_delta_weight`` for a Linear, ``scaling B A``, taken
    from the given tensors (the EMA ones at export) rather than from the module's own."""
    merged = dict(state)
    for name, layer in lora_layers(module).items():
        base = f"{name}.base_layer.weight"
        weight = merged[base].float()
        for adapter in layer.active_adapters:
            down, up = merged.pop(f"{name}.lora_A.{adapter}.weight"), merged.pop(f"{name}.lora_B.{adapter}.weight")
            weight = weight + layer.scaling[adapter] * (up.float() @ down.float())
        merged[base] = weight.to(state[base].dtype)
        for key in [k for k in merged if k.startswith(f"{name}.base_layer.")]:
            merged[f"{name}.{key.removeprefix(f'{name}.base_layer.')}"] = merged.pop(key)
    return merged
