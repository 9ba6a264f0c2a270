"""Gradient accumulation is exact (K micro-batches = one batch K times larger) and learning-rate schedules
resume exactly."""

import math
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from test_prepare import pipeline, videos  # noqa: F401  (fixtures)
from test_trainer import FlowMethod, TwoGroupMethod, gaussian_batch, make_cfg

from tmd.config import RunConfig, TrainConfig, from_dict, register_data_config
from tmd.data.source import GeneratorDataSource
from tmd.methods import get_method
from tmd.train.logging import read_metrics
from tmd.train.loop import Trainer, lr_factor


@dataclass
class NoData:
    pass


register_data_config("accumulation_test", NoData)

BATCH = 4


def tiny_batch(_, g):
    return {
        "x": torch.randn(BATCH, 4, 2, 8, 8, generator=g),
        "cond": torch.randn(BATCH, 5, 32, generator=g),
        "neg_cond": torch.randn(BATCH, 5, 32, generator=g),
    }


def train_method(tmp_path, teacher, name, method, grad_accum, steps=2, **train):
    cfg = from_dict(
        RunConfig,
        {
            "method_name": name,
            "data_kind": "accumulation_test",
            "method": method,
            "train": {
                "steps": steps,
                "batch_size": BATCH,
                "grad_accum": grad_accum,
                "lr": 1e-3,
                "log_every": 1,
                "checkpoint_every": 100,
                "progress": False,
                "tensorboard": False,
                "ema_decay": 0.5,
                "out_dir": str(tmp_path),
                **train,
            },
        },
    )
    torch.manual_seed(0)
    trained = get_method(name).from_teacher(cfg.method, teacher)
    trainer = Trainer(trained, GeneratorDataSource(tiny_batch, seed=1), cfg)
    names = {id(p): f"{module}.{k}" for module, m in trained.state_modules().items() for k, p in m.named_parameters()}
    grads = []  # (group, {name: gradient}) at every optimizer step, after clipping

    def record(optimizer, args, kwargs, group):
        grads.append(
            (group, {names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None})
        )

    for group, optimizer in trainer.optimizers.items():
        optimizer.register_step_pre_hook(lambda opt, args, kwargs, group=group: record(opt, args, kwargs, group))
    result = trainer.train()
    weights = {
        f"{module}.{k}": v.detach().clone() for module, m in trained.state_modules().items() for k, v in m.state_dict().items()
    }
    modules = {id(m): name for name, m in trained.state_modules().items()}
    ema_of = {ema: modules[id(m)] for ema, m in trained.ema_modules().items()}
    return {"weights": weights, "ema": result.ema, "ema_of": ema_of, "grads": grads, "log": read_metrics(tmp_path)}


ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which the trainer keeps
SUM_PRECISION = 1e-5
"""How closely K micro-batches' summed gradients match one batch's, relative to the element. Both are float32
sums of the same per-sample terms in another order (another split, another thread count), so they differ by a
few float32 eps (1.2e-7) times the terms' summed magnitude."""
CANCELLATION = 10.0
"""That summed magnitude, in units of the group's largest gradient. An element may be the small remainder of
terms that nearly cancel: a discriminator head's output bias sums logistic terms of up to 1/B each, real and
fake of opposite sign, ~0.5 in all, to a gradient of 0.02-0.03 that is its group's largest; at two threads its
two sums differ by 6e-7, 2.5e-5 of it. So the absolute tolerance is SUM_PRECISION x 10 x the group's largest."""


def gradient_tolerance(step: dict[str, torch.Tensor]) -> float:
    """The absolute part of the gradient comparison for one optimizer step of one group (``CANCELLATION``)."""
    return SUM_PRECISION * CANCELLATION * max(float(g.abs().max()) for g in step.values())


def adam_settled(grads: list[tuple[str, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Per parameter, the elements whose AdamW steps the gradient comparison pins down.

    AdamW normalises: its step is ``lr m_hat / (sqrt(v_hat) + eps)``, which moves by about ``delta / |g|`` when
    the gradient ``g`` moves by ``delta``. ``assert_same_run`` checks gradients to ``delta = 1e-5 |g| + atol``
    (``gradient_tolerance``), so wherever ``|g| >= 1e3 (atol + eps)`` at every step the two runs' steps agree to
    about ``1e-3 lr`` each. An element whose gradient comes within that of zero at some step (terms that nearly
    cancel) can step by up to about ``lr`` on one machine and not on another: there the bound is AdamW's."""
    settled: dict[str, torch.Tensor] = {}
    for _, step in grads:
        floor = 1e3 * (gradient_tolerance(step) + ADAM_EPS)
        for key, grad in step.items():
            big = grad.abs() >= floor
            settled[key] = settled[key] & big if key in settled else big
    return settled


def assert_close_after_adam(value, expected, settled, lr, steps, msg):
    if settled is None:  # a buffer, or a parameter this run never updated: no AdamW step to amplify noise
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7, msg=msg)
        return
    torch.testing.assert_close(value[settled], expected[settled], rtol=1e-5, atol=5e-3 * steps * lr, msg=msg)
    # the unsettled elements: at most AdamW's largest normalised step (1 with bias correction) per step, each side
    assert torch.all((value - expected).abs()[~settled] <= 2 * steps * lr * (1 + 1e-3)), msg


def assert_same_run(a, b, lr=1e-3):
    assert [group for group, _ in a["grads"]] == [group for group, _ in b["grads"]]
    for (group, grads_a), (_, grads_b) in zip(a["grads"], b["grads"]):
        assert grads_a.keys() == grads_b.keys()
        atol = gradient_tolerance(grads_b)
        for key in grads_a:
            torch.testing.assert_close(grads_a[key], grads_b[key], rtol=SUM_PRECISION, atol=atol, msg=f"{group}: {key}")
    settled, steps = adam_settled(b["grads"]), len(b["grads"])
    for key, value in a["weights"].items():
        assert_close_after_adam(value, b["weights"][key], settled.get(key), lr, steps, key)
    for name, ema in a["ema"].items():
        for key, value in ema.items():
            assert_close_after_adam(
                value, b["ema"][name][key], settled.get(f"{a['ema_of'][name]}.{key}"), lr, steps, f"ema {name}: {key}"
            )
    log_a, log_b = a["log"], b["log"]
    assert [r.keys() for r in log_a] == [r.keys() for r in log_b]
    for ra, rb in zip(log_a, log_b):
        for key in ra:
            if key.startswith(("loss/", "grad_norm/", "generator/", "d_")):
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key


STAGE2 = {"head_blocks": 1, "outer_steps": 2, "inner_steps": 2, "generator_every": 2, "gan_weight": 0.03}


@pytest.mark.parametrize(
    "name, method",
    [
        ("tmd", STAGE2),  # generator turn (VSD + GAN into the discriminator) then a critic turn (two groups)
        ("dmd2", {"generator_every": 2, "gan_weight": 0.03, "student_input": "backward"}),
        ("tm", {"head_blocks": 1}),  # condition dropout, per-sample times and two noises per step
    ],
)
def test_two_micro_batches_equal_one_batch(tmp_path, tiny_teacher, name, method):
    one = train_method(tmp_path / "one", tiny_teacher, name, method, grad_accum=1)
    two = train_method(tmp_path / "two", tiny_teacher, name, method, grad_accum=2)
    four = train_method(tmp_path / "four", tiny_teacher, name, method, grad_accum=4)
    assert_same_run(two, one)
    assert_same_run(four, one)
    teacher = tiny_teacher.state_dict()
    assert not torch.equal(one["weights"]["student.transformer.proj_out.weight"], teacher["transformer.proj_out.weight"])


def test_accumulation_errors(tmp_path):
    # the generator's loss reads the critic, which one big batch would already have stepped
    with pytest.raises(ValueError, match="update\\('generator'\\) depends on group 'critic'.*train.grad_accum=1"):
        Trainer(TwoGroupMethod(), GeneratorDataSource(gaussian_batch, seed=0), make_cfg(tmp_path / "a", grad_accum=2)).train()
    method = FlowMethod()
    twice = method.training_step
    method.training_step = lambda batch, step, update: [twice(batch, step, update), twice(batch, step, update)][0]
    with pytest.raises(ValueError, match="update\\('model'\\) was called twice in one training_step"):
        Trainer(method, GeneratorDataSource(gaussian_batch, seed=0), make_cfg(tmp_path / "b", grad_accum=2)).train()
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple of grad_accum=4"):
        TrainConfig(batch_size=6, grad_accum=4)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_lr_schedule_follows_its_formula_and_resumes_exactly(tmp_path, schedule):
    train = {"lr_schedule": schedule, "warmup_steps": 3, "steps": 10, "checkpoint_every": 4}
    straight = FlowMethod()
    Trainer(straight, GeneratorDataSource(gaussian_batch, seed=1), make_cfg(tmp_path / "a", **train)).train()
    logged = [r["lr/model"] for r in read_metrics(tmp_path / "a")]
    assert logged == pytest.approx([1e-2 * lr_factor(schedule, 3, 10)(i) for i in range(10)])
    assert logged[0] == pytest.approx(1e-2 / 3) and logged[2] == pytest.approx(1e-2) and logged[-2] > logged[-1] > 0
    cosine_mid = 0.5 * (1 + math.cos(math.pi * 3 / 7))
    assert lr_factor("cosine", 3, 10)(6) == pytest.approx(cosine_mid) and lr_factor("linear", 3, 10)(6) == pytest.approx(4 / 7)

    first = FlowMethod()
    Trainer(first, GeneratorDataSource(gaussian_batch, seed=1), make_cfg(tmp_path / "b", **{**train, "steps": 4})).train()
    resumed = FlowMethod(seed=7)
    trainer = Trainer(resumed, GeneratorDataSource(gaussian_batch, seed=1), make_cfg(tmp_path / "b", **train), resume=True)
    assert trainer.optimizers["model"].param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(schedule, 3, 10)(4))
    trainer.train()
    assert first.losses + resumed.losses == straight.losses
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    assert [r["lr/model"] for r in read_metrics(tmp_path / "b")] == pytest.approx(logged)


def test_resuming_a_run_without_schedule_state_needs_a_constant_schedule(tmp_path):
    # a checkpoint without schedule state (written before schedules were saved) under the same config
    Trainer(FlowMethod(), GeneratorDataSource(gaussian_batch, seed=1), make_cfg(tmp_path, steps=2, warmup_steps=2)).train()
    state_file = tmp_path / "checkpoints" / "step_0000002" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["lr_schedulers"]
    torch.save(state, state_file)
    with pytest.raises(ValueError, match="written without a learning-rate schedule; resume it with train.lr_schedule=constant"):
        Trainer(
            FlowMethod(), GeneratorDataSource(gaussian_batch, seed=1), make_cfg(tmp_path, steps=4, warmup_steps=2), resume=True
        )


@pytest.mark.slow
def test_two_processes_with_micro_batches_equal_one_process(tmp_path, videos, pipeline):  # noqa: F811
    """torchrun, 2 gloo processes, FSDP2, LoRA on student and fake score, 2 micro-batches of 1 row each:
    the losses and the exported student of one process with the whole batch of 4 in one pass."""
    from test_distributed import assert_close_records, losses, prepared_tmd_config, torchrun

    from tmd.programs.cli import main

    train = "steps: 2, batch_size: 4, log_every: 1, progress: false, tensorboard: false, lora: {rank: 4}"
    config = prepared_tmd_config(tmp_path, videos, pipeline, train)
    common = ["train", "--config", str(config)]
    assert main([*common, f"train.out_dir={tmp_path / 'one'}"]) == 0
    torchrun(2, *common, f"train.out_dir={tmp_path / 'two'}", "train.grad_accum=2")
    assert_close_records(losses(tmp_path / "two"), losses(tmp_path / "one"))
    a, b = (load_file(str(tmp_path / run / "student.safetensors")) for run in ("two", "one"))
    assert a.keys() == b.keys() and not any("lora_" in k for k in a)
    for key in a:  # AdamW's normalised steps turn the float noise of near-cancelling gradients into up to ~lr (above)
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=0.2 * 1e-4, msg=key)


def test_a_checkpoint_that_names_its_random_state_generator_still_resumes(tmp_path):
    """Checkpoints written before the random source was named ``rng`` hold it under ``"generator"``."""
    straight = FlowMethod()
    Trainer(straight, GeneratorDataSource(gaussian_batch, seed=1), make_cfg(tmp_path / "a", steps=4, checkpoint_every=2)).train()
    Trainer(FlowMethod(), GeneratorDataSource(gaussian_batch, seed=1), make_cfg(tmp_path / "b", steps=2)).train()
    state_file = tmp_path / "b" / "checkpoints" / "step_0000002" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["generator"] = state.pop("batch_rng")
    torch.save(state, state_file)
    resumed = FlowMethod(seed=7)
    Trainer(resumed, GeneratorDataSource(gaussian_batch, seed=1), make_cfg(tmp_path / "b", steps=4), resume=True).train()
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
