import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tmd import flow
from tmd.config import RunConfig, TrainConfig, load_config, register_data_config, register_method_config
from tmd.data.source import GeneratorDataSource
from tmd.train import checkpoint as ckpt
from tmd.train.logging import read_metrics
from tmd.train.loop import NonFiniteLossError, Trainer


@dataclass
class NoOptions:
    pass


register_method_config("trainer_test", NoOptions)
register_data_config("trainer_test_gauss", NoOptions)

MEAN = torch.tensor([1.0, -1.0])


def gaussian_batch(i, g):
    return torch.randn(16, 2, generator=g) * 0.5 + MEAN


class VelocityMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))

    def forward(self, x_t, t):
        return self.net(torch.cat([x_t, t[:, None].to(x_t.dtype)], dim=1))


class FlowMethod:
    """Flow matching of a 2D Gaussian; condition-dropout-like masking draws from the global RNG so that
    its checkpointing is exercised too."""

    def __init__(self, seed=0, nan_at=None):
        torch.manual_seed(seed)
        self.model = VelocityMLP()
        self.nan_at = nan_at
        self.losses = []
        self.seen_dtypes = []

    def parameter_groups(self):
        return {"model": list(self.model.parameters())}

    def ema_modules(self):
        return {"model": self.model}

    def state_modules(self):
        return {"model": self.model}

    def training_step(self, batch, step, update):
        noise = self.rng.randn(batch.shape)
        t = self.rng.rand(batch.shape[0])
        keep = (torch.rand(batch.shape[0]) > 0.1).float()
        v = self.model(flow.interpolate(batch, noise, t), t)
        self.seen_dtypes.append(v.dtype)
        loss = (((v.float() - flow.velocity_target(batch, noise)) ** 2).mean(1) * keep).mean()
        if step == self.nan_at:
            loss = loss * float("nan")
        update("model", loss, terms={"fm": loss})
        self.losses.append(loss.item())
        return {"t_mean": t.mean().item()}


def make_cfg(run_dir, **train):
    train = {
        "steps": 10,
        "lr": 1e-2,
        "log_every": 1,
        "checkpoint_every": 5,
        "progress": False,
        "tensorboard": False,
        "ema_decay": 0.9,
        "out_dir": str(run_dir),
        **train,
    }
    return RunConfig("trainer_test", "trainer_test_gauss", train=TrainConfig(**train))


def run(run_dir, method=None, resume=False, **train):
    method = method or FlowMethod()
    data = GeneratorDataSource(gaussian_batch, seed=1)
    return method, Trainer(method, data, make_cfg(run_dir, **train), resume=resume).train()


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_learns_and_writes_run_folder(tmp_path):
    method, result = run(tmp_path, steps=150, checkpoint_every=40, keep_checkpoints=2, log_every=10, tensorboard=True)
    assert sum(method.losses[-20:]) < 0.7 * sum(method.losses[:20])
    assert load_config(RunConfig, tmp_path / "config.yaml") == make_cfg(
        tmp_path, steps=150, checkpoint_every=40, keep_checkpoints=2, log_every=10, tensorboard=True
    )
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(10, 151, 10))
    assert {"loss/model", "grad_norm/model", "lr/model", "model/fm", "t_mean", "time"} <= records[-1].keys()
    assert result.step == 150 and result.metrics["loss/model"] == records[-1]["loss/model"]
    assert (tmp_path / "tensorboard").is_dir()

    root = tmp_path / "checkpoints"
    assert [p.name for _, p in ckpt.list_checkpoints(root)] == ["step_0000120", "step_0000150"]
    assert (root / "latest").read_text() == "step_0000150" and result.checkpoint == root / "step_0000150"
    stored = read_checkpoint(
        result.checkpoint, {"modules": {"model": method.model.state_dict()}, "ema": {"model": result.ema["model"]}}
    )
    assert_same(stored["modules"]["model"], method.model.state_dict())
    assert_same(stored["ema"]["model"], result.ema["model"])
    state = torch.load(result.checkpoint / "trainer_state.pt", weights_only=True)
    assert state["step"] == 150 and state["data"] == {"seed": 1, "index": 150}


def read_checkpoint(path, template):
    """The tensors a checkpoint holds under the names and shapes of ``template``."""
    import torch.distributed.checkpoint as dcp

    empty = {
        group: {name: {k: torch.zeros_like(v) for k, v in sd.items()} for name, sd in named.items()}
        for group, named in template.items()
    }
    dcp.load(empty, checkpoint_id=str(path / ckpt.STATE_DIR))
    return empty


def test_resume_is_exact(tmp_path):
    straight, result = run(tmp_path / "a")
    first, _ = run(tmp_path / "b", steps=5)
    second, resumed = run(tmp_path / "b", method=FlowMethod(seed=123), resume=True)
    assert first.losses + second.losses == straight.losses
    assert_same(weights(second.model), weights(straight.model))
    assert_same(resumed.ema["model"], result.ema["model"])
    strip = lambda records: [{k: v for k, v in r.items() if k != "time"} for r in records]  # noqa: E731
    assert strip(read_metrics(tmp_path / "b")) == strip(read_metrics(tmp_path / "a"))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    # nan_at counts completed steps (training_step's argument); the message counts as metrics.jsonl does
    with pytest.raises(NonFiniteLossError, match=r"step 8 in group 'model': term 'fm' = nan .*step_0000005, is intact"):
        run(tmp_path, method=FlowMethod(nan_at=7))
    assert read_metrics(tmp_path)[-1]["step"] == 7
    root = tmp_path / "checkpoints"
    assert {p.name for p in root.iterdir()} == {"step_0000005", "latest"}
    assert ckpt.latest_checkpoint(root) == root / "step_0000005"
    # The kept checkpoint is the step-5 state: resuming from it reproduces an uninterrupted run.
    straight, _ = run(tmp_path / "straight")
    resumed, _ = run(tmp_path, method=FlowMethod(seed=5), resume=True)
    assert_same(weights(resumed.model), weights(straight.model))
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 11))


def test_non_finite_loss_before_the_first_checkpoint_says_there_is_none(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*no checkpoint was written yet \(the first comes at step 5\)"):
        run(tmp_path, method=FlowMethod(nan_at=2))
    assert not (tmp_path / "checkpoints").exists()


def test_failed_checkpoint_write_leaves_no_partial_dir(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def failing_save(obj, path, *args, **kwargs):
        if str(path).endswith(ckpt.TRAINER_STATE):
            calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, steps=4, checkpoint_every=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002"]
    assert (root / "latest").read_text() == "step_0000002"


class TwoGroupMethod:
    """TTUR: the critic steps every iteration on the generator's (not detached) samples, the generator
    every 3rd; the critic's backward must not leak into the generator."""

    def __init__(self):
        torch.manual_seed(0)
        self.gen, self.critic = nn.Linear(2, 2), nn.Linear(2, 2)
        self.gen_changed = []

    def parameter_groups(self):
        return {"critic": list(self.critic.parameters()), "generator": list(self.gen.parameters())}

    def ema_modules(self):
        return {"generator": self.gen}

    def state_modules(self):
        return {"generator": self.gen, "critic": self.critic}

    def training_step(self, batch, step, update):
        before = weights(self.gen)
        fake = self.gen(self.rng.randn(batch.shape))
        update("critic", ((self.critic(fake) - batch) ** 2).mean())
        if step % 3 == 0:
            fake = self.gen(self.rng.randn(batch.shape))
            update("generator", -(self.critic(fake) ** 2).mean())
        self.gen_changed.append(not torch.equal(before["weight"], self.gen.weight))
        return {}


def test_ttur_groups_update_at_their_own_frequency(tmp_path):
    method = TwoGroupMethod()
    cfg = make_cfg(tmp_path, steps=9, lr_groups={"critic": 0.05})
    trainer = Trainer(method, GeneratorDataSource(gaussian_batch, seed=0), cfg)
    trainer.train()
    assert method.gen_changed == [True, False, False] * 3
    opt = trainer.optimizers
    assert [opt[g].state[opt[g].param_groups[0]["params"][0]]["step"].item() for g in ("critic", "generator")] == [9, 3]
    assert opt["critic"].param_groups[0]["lr"] == 0.05 and opt["generator"].param_groups[0]["lr"] == 1e-2
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "loss/generator" in r] == [1, 4, 7]
    assert all("loss/critic" in r for r in records)
    assert {p.name for p in (tmp_path / "checkpoints" / "step_0000009").iterdir()} == {"state", "trainer_state.pt"}


class OwnSettingsFlowMethod(FlowMethod):
    def optimizer_overrides(self):
        return {"model": {"lr_scale": 0.1, "betas": (0.0, 0.95)}}


def test_a_methods_own_lr_scale_and_betas_reach_its_optimizer(tmp_path):
    trainer = Trainer(OwnSettingsFlowMethod(), GeneratorDataSource(gaussian_batch, seed=0), make_cfg(tmp_path, steps=1))
    group = trainer.optimizers["model"].param_groups[0]
    assert group["lr"] == pytest.approx(1e-3) and group["betas"] == (0.0, 0.95)


class ScalarMethod:
    """Loss = sum(p): AdamW moves p by about lr per step, the EMA must follow its exact recurrence."""

    def __init__(self):
        self.module = nn.Module()
        self.module.p = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.trajectory = [self.module.p.detach().clone()]

    def parameter_groups(self):
        return {"p": [self.module.p]}

    def ema_modules(self):
        return {"p": self.module}

    def state_modules(self):
        return {"p": self.module}

    def training_step(self, batch, step, update):
        update("p", self.module.p.sum())
        self.trajectory.append(self.module.p.detach().clone())
        return {}


def test_ema_follows_its_recurrence(tmp_path):
    method, result = run(tmp_path, method=ScalarMethod(), steps=6, lr=0.1, ema_decay=0.7)
    expected = method.trajectory[0].double()
    for p in method.trajectory[1:]:
        expected = 0.7 * expected + 0.3 * p.double()
    assert not torch.allclose(method.trajectory[-1], method.trajectory[0])
    torch.testing.assert_close(result.ema["p"]["p"].double(), expected, rtol=0, atol=1e-6)


def test_bf16_autocast_keeps_fp32_params(tmp_path):
    method, _ = run(tmp_path, steps=3, precision="bf16")
    assert method.seen_dtypes == [torch.bfloat16] * 3
    assert all(p.dtype == torch.float32 for p in method.model.parameters())
    assert all(torch.isfinite(torch.tensor(method.losses)))


def test_misuse_is_reported(tmp_path):
    run(tmp_path, steps=2)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        run(tmp_path, steps=2)
    method = FlowMethod()
    method.parameter_groups = lambda: {"a": list(method.model.parameters()), "b": [method.model.net[0].weight]}
    with pytest.raises(ValueError, match="in both groups 'a' and 'b'"):
        run(tmp_path / "x", method=method)
    method = FlowMethod()
    method.training_step = lambda batch, step, update: update("generator", batch.sum())
    with pytest.raises(KeyError, match="no such parameter group; groups: \\['model'\\]"):
        run(tmp_path / "y", method=method)
    with pytest.raises(ValueError, match="lr_groups names unknown groups \\['gen'\\]"):
        run(tmp_path / "z", lr_groups={"gen": 1.0})


def test_generator_data_source_is_positional():
    source = GeneratorDataSource(gaussian_batch, seed=3)
    batches = [source.next_batch() for _ in range(4)]
    other = GeneratorDataSource(gaussian_batch, seed=3)
    other.load_state_dict(json.loads(json.dumps(source.state_dict())) | {"index": 2})
    assert torch.equal(other.next_batch(), batches[2])
    assert not torch.equal(batches[0], batches[1])
    with pytest.raises(ValueError, match="data seed 3"):
        GeneratorDataSource(gaussian_batch, seed=4).load_state_dict(source.state_dict())
