"""LoRA (peft) for the student and the fake score: only adapters and the new parts train, the export is
the merged model, and the memory estimate counts what a LoRA run holds."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from test_accumulation import STAGE2, tiny_batch

from tmd.config import ConfigError, LoRAConfig, RunConfig, from_dict
from tmd.data.source import GeneratorDataSource
from tmd.methods import get_method
from tmd.models.export import load_student_weights
from tmd.models.lora import add_lora, lora_layers, merged_state_dict
from tmd.models.split import TMDStudent
from tmd.models.wan import load_teacher
from tmd.sampling import sample_tmd
from tmd.train.loop import Trainer
from tmd.train.memory import estimate_for_config, estimate_state_memory

LORA = {"rank": 4, "alpha": 8.0}


def test_only_adapters_new_parts_and_discriminator_train(tmp_path):
    teacher = load_teacher("tiny")
    cfg = from_dict(
        RunConfig,
        {
            "method_name": "tmd",
            "data_kind": "accumulation_test",
            "method": STAGE2,
            "train": {
                "steps": 2,
                "batch_size": 4,
                "lr": 1e-3,
                "progress": False,
                "tensorboard": False,
                "checkpoint_every": 100,
                "out_dir": str(tmp_path),
                "lora": LORA,
            },
        },
    )
    torch.manual_seed(0)
    method = get_method("tmd").from_teacher(cfg.method, teacher)
    assert add_lora(method.state_modules(), cfg.train.lora) == 2  # the student's and the fake score's transformers
    before = {f"{m}.{k}": v.clone() for m, module in method.state_modules().items() for k, v in module.state_dict().items()}
    trainer = Trainer(method, GeneratorDataSource(tiny_batch, seed=1), cfg)
    trainer.train()  # step 0: generator (VSD + GAN), step 1: fake score and discriminator
    after = {f"{m}.{k}": v for m, module in method.state_modules().items() for k, v in module.state_dict().items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}

    adapter = lambda k: ".lora_A." in k or ".lora_B." in k  # noqa: E731
    new_part = lambda k: k.startswith(("student.inner_block", "student.fusion", "student.gap_embedder", "discriminator."))  # noqa: E731
    assert changed and all(adapter(k) or new_part(k) for k in changed)
    assert any(k.startswith("fake_score.") and adapter(k) for k in changed)
    assert any(k.startswith("discriminator.") for k in changed) and any(k.startswith("student.inner_block") for k in changed)
    # the base weights of both adapted transformers are the teacher's, bit for bit
    teacher_state = teacher.state_dict()
    for key, value in after.items():
        if key.startswith(("student.transformer.", "fake_score.transformer.")) and not adapter(key):
            assert torch.equal(value, teacher_state[key.split(".", 1)[1].replace(".base_layer", "")]), key
    # optimizer and EMA hold the trainable parameters only
    held = [p for opt in trainer.optimizers.values() for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in method.parameters() if p.requires_grad}
    assert not any(".base_layer." in k for k in trainer.emas["generator"].shadow)


def test_world_lora_run_exports_the_merged_model(tmp_path):
    from test_generate_world import train_world_tmd

    from tmd.world.data import WorldAssets

    assets = WorldAssets()
    lora = {**LORA, "target_modules": ["to_q", "to_v", "ffn.net.0.proj"]}
    run = train_world_tmd(assets, tmp_path, 0.03, steps=3, lr=1e-3, ema_decay=0.5, checkpoint_every=100, lora=lora)
    exported = load_file(str(run.weights))
    assert not any("lora_" in k or "base_layer" in k for k in exported)

    # peft's own merge of the trained (EMA) adapters gives the exported transformer
    fused = copy.deepcopy(run.generator.transformer)
    fused.fuse_lora()
    fused.unload_lora()
    for key, value in fused.state_dict().items():
        torch.testing.assert_close(exported[f"transformer.{key}"], value, rtol=1e-6, atol=1e-6, msg=key)

    # the export loads into a plain student that samples like the LoRA model
    plain = TMDStudent.from_teacher(assets.teacher, head_blocks=1).eval()
    load_student_weights(plain, str(run.weights), {"head_blocks": 1})
    noise = torch.randn(2, *assets.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond, _ = assets.encode_prompts(["a red circle moving right", "a blue square moving up"])
    sample = lambda model: sample_tmd(model, noise, cond, 2, 2, torch.Generator().manual_seed(1))  # noqa: E731
    torch.testing.assert_close(sample(plain), sample(run.generator), rtol=1e-5, atol=1e-5)
    assert lora_layers(run.generator) and any(
        lora_layers(run.generator)[n].lora_B["default"].weight.abs().sum() > 0 for n in lora_layers(run.generator)
    )


def test_merge_is_exact_on_a_perturbed_adapter():
    teacher = load_teacher("tiny")
    model = copy.deepcopy(teacher)
    add_lora({"student": model}, LoRAConfig(**LORA))
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_B["default"].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    plain = copy.deepcopy(teacher)
    plain.load_state_dict(merged_state_dict(model, model.state_dict()))
    x, t, cond = torch.randn(2, 4, 2, 8, 8), torch.tensor([0.3, 0.8]), torch.randn(2, 5, 32)
    torch.testing.assert_close(plain.velocity(x, t, cond), model.velocity(x, t, cond), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(teacher.velocity(x, t, cond), model.velocity(x, t, cond), atol=1e-3)


def test_lora_errors():
    teacher = load_teacher("tiny")
    with pytest.raises(ConfigError, match="train.lora.modules names \\['critic'\\], which this method does not train"):
        add_lora({"student": teacher}, LoRAConfig(rank=2, modules=["critic"]))
    with pytest.raises(ConfigError, match="train.lora.target_modules=\\['to_qq'\\]"):
        add_lora({"student": copy.deepcopy(teacher)}, LoRAConfig(rank=2, modules=["student"], target_modules=["to_qq"]))
    with pytest.raises(ConfigError, match="'discriminator' holds no Wan transformer"):
        add_lora({"discriminator": torch.nn.Linear(2, 2)}, LoRAConfig(rank=2, modules=["discriminator"]))
    with pytest.raises(ValueError, match="rank must be >= 0"):
        LoRAConfig(rank=-1)


def test_memory_estimate_with_and_without_lora():
    full = estimate_for_config("wan1.3b_tmd_stage2.yaml", "wan1.3b")
    lora = estimate_for_config("wan1.3b_tmd_stage2.yaml", "wan1.3b", ["train.lora.rank=64"])
    assert full["frozen"] == 0 and full["trainable_parameters"] > 2.8e9  # student + fake score + discriminator
    assert lora["trainable_parameters"] < 0.1 * full["trainable_parameters"]
    assert lora["frozen"] == pytest.approx(2 * full["teacher"], rel=0.01)  # two frozen fp32 Wan copies
    assert lora["total"] < 0.4 * full["total"]
    sharded = estimate_for_config("wan1.3b_tmd_stage2.yaml", "wan1.3b", ["train.lora.rank=64"], world_size=8)
    assert sharded["total"] == pytest.approx(lora["total"] / 8)
    tiny = load_teacher("tiny")
    method = get_method("dmd2").from_teacher(get_method("dmd2").Config(gan_weight=0.0), tiny)
    add_lora(method.state_modules(), LoRAConfig(rank=2))
    assert estimate_state_memory(method, tiny)["ema"] < estimate_state_memory(method, tiny)["frozen"] / 4
