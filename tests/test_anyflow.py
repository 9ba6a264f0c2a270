"""AnyFlow: the flow-map student built from the teacher, its defining equations with networks of known outputs,
the closed-form mixture, and the stock diffusers ``AnyFlowPipeline`` running an exported student."""

import copy
import json

import pytest
import torch
from closed_form import TEACHER, WORLD, distance, fit_teacher_copy, train
from diffusers import AnyFlowPipeline, FlowMapEulerDiscreteScheduler
from mog import MLPVelocity
from safetensors.torch import load_file, save_file
from test_generate import FRAMES, HEIGHT, WIDTH, generate_args, perturbed, pipeline  # noqa: F401  (fixture)
from torch import nn

from tmd import flow
from tmd.methods import get_method
from tmd.methods.anyflow import AnyFlow, beta_weight, flow_map_jumps, sample_grid
from tmd.models.anyflow import AnyFlowStudent
from tmd.models.text import TextEncoder
from tmd.models.wan import as_time, load_teacher
from tmd.pipelines import export_pipeline
from tmd.programs.cli import main
from tmd.rng import BatchRandom


class MLPFlowMap(MLPVelocity):
    """AnyFlow's student on the mixture: the velocity model with ``(1 - g) TimeEmb(t) + g DeltaEmb(r)``,
    ``DeltaEmb`` a copy of the time embedding, so that ``r = t`` is the velocity model exactly."""

    def __init__(self, model: MLPVelocity, gate: float = 0.25):
        super().__init__(model.dim, model.cond_dim, model.width, model.depth)
        self.load_state_dict(model.state_dict())
        self.delta_embed = copy.deepcopy(self.time_embed)
        self.gate = gate

    def mean_velocity(self, x_t, t, r, cond):
        h, temb = self._embed(x_t, t, cond)
        delta = self.delta_embed(as_time(r, x_t.shape[0], x_t.device))
        return self.out(self._run(self.blocks, h, (1 - self.gate) * temb + self.gate * delta))

    def velocity(self, x_t, t, cond):
        return self.mean_velocity(x_t, t, t, cond)


class Known(nn.Module):
    """``u(x, t, r | c) = t x + r + c``: every call is recorded."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.calls = []

    def mean_velocity(self, x, t, r, cond):
        t, r = as_time(t, x.shape[0], x.device), as_time(r, x.shape[0], x.device)
        self.calls.append((t.clone(), r.clone()))
        return flow.expand_time(t, x) * x + flow.expand_time(r, x) + cond + self.weight

    def velocity(self, x, t, cond):
        return self.mean_velocity(x, t, t, cond)


def method_with(student, **options):
    cfg = get_method("anyflow").Config(**options)
    method = AnyFlow(cfg, TEACHER, student, MLPVelocity(2, WORLD.cond_dim, 16, 1) if cfg.stage == "onpolicy" else None)
    method.rng = BatchRandom(torch.Generator().manual_seed(0))
    return method


def test_the_student_is_the_teacher_at_r_equal_t_and_loads_in_diffusers(tiny_teacher, tiny_inputs, tmp_path):
    x, cond, _ = tiny_inputs
    t = torch.tensor([0.3, 0.9])
    student = AnyFlowStudent.from_teacher(tiny_teacher)
    embedder = student.transformer.condition_embedder
    assert float(embedder.delta_emb_gate) == 0.25 and embedder.deltatime_type == "r"
    # every other weight is the teacher's, DeltaEmb a copy of TimeEmb: at r = t the flow map is the teacher
    torch.testing.assert_close(student.velocity(x, t, cond), tiny_teacher.velocity(x, t, cond), rtol=0, atol=1e-5)
    assert not torch.allclose(student.mean_velocity(x, t, 0.0, cond), tiny_teacher.velocity(x, t, cond), atol=1e-3)
    student.transformer.save_pretrained(tmp_path / "transformer")
    again = AnyFlowStudent.from_pretrained(tmp_path)
    assert torch.equal(again.mean_velocity(x, t, 0.2, cond), student.mean_velocity(x, t, 0.2, cond))


def test_sampler_takes_flow_map_jumps_on_the_schedulers_grid():
    """``x_r = x_t + (r - t) u(x_t, t, r)`` on FlowMapEulerDiscreteScheduler(shift=5)'s sigmas (2 steps: 1, 5/6, 0)."""
    scheduler = FlowMapEulerDiscreteScheduler(shift=5.0)
    for steps in (1, 2, 4):
        scheduler.set_timesteps(steps)
        assert sample_grid(steps, 5.0) == scheduler.sigmas.tolist()
    assert sample_grid(2, 5.0) == pytest.approx([1.0, 5 / 6, 0.0])
    student, x, cond = Known(), torch.randn(3, 2), torch.randn(3, 2)
    out = AnyFlow.sample(student, x, cond, 2)
    expected = x.clone()
    for a, b in ((1.0, 5 / 6), (5 / 6, 0.0)):
        expected = expected + (b - a) * (a * expected + b + cond)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert [float(time[0]) for call in student.calls for time in call] == pytest.approx([1.0, 5 / 6, 5 / 6, 0.0])
    sampler = AnyFlow.sampler(AnyFlow.Config(outer_shift=3.0), student, 4, None, 0, 1.0, 1.0)
    student.calls.clear()
    sampler(x, cond, None)
    assert [float(t[0]) for t, _ in student.calls] == pytest.approx(sample_grid(4, 3.0)[:-1])


def test_backward_simulation_jumps_to_a_drawn_step_and_on_to_zero():
    """Flow Map Backward Simulation: 1 -> t_k -> t_{k+1} -> 0 on the grid of a drawn N; zero-length jumps skipped."""
    method = method_with(Known(), stage="onpolicy", rollout_steps=(4, 8))
    seen = set()
    for _ in range(40):
        times = method.rollout_times("cpu")
        n = next(n for n in (4, 8) if times[1] in sample_grid(n, 5.0) and times[2] in sample_grid(n, 5.0))
        grid = sample_grid(n, 5.0)
        k = grid.index(times[1])
        assert times == [1.0, grid[k], grid[k + 1], 0.0]
        seen.add((n, k))
    assert {n for n, _ in seen} == {4, 8} and {k for _, k in seen} >= {0, 1, 2, 3}
    student, x, cond = Known(), torch.randn(2, 2), torch.zeros(2, 2)
    out = flow_map_jumps(student, x, cond, [1.0, 1.0, 0.5, 0.0])  # k = 0: the first jump has zero length
    assert len(student.calls) == 2
    step = x + (0.5 - 1.0) * (1.0 * x + 0.5)
    torch.testing.assert_close(out, step + (0.0 - 0.5) * (0.5 * step + 0.0))


def test_flowmap_target_is_v_minus_t_minus_r_times_du_dt_over_the_fused_guidance():
    """For ``u = t x + r + c``, du/dt along dx/dt = v is ``x + t v``; the central difference is exact."""
    method = method_with(Known(), fuse_guidance=3.0)
    x_t, v, cond = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), torch.zeros(4, 2)
    method.student = method.student.double()
    t, r = torch.tensor([0.3, 0.5, 0.9, 0.2]), torch.tensor([0.1, 0.5, 0.0, 0.05])
    target = method.flowmap_target(x_t, v, t, r, cond.double())
    expected = v - flow.expand_time(t - r, v) * (x_t + flow.expand_time(t, v) * v) / 3.0
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-6)


def test_flowmap_loss_replayed_from_its_draws():
    """The whole stage-1 loss: dropout to the negative condition, the (t, r) draws and their shares, the fused
    guidance ``(u_c - (1 - w) u_neg) / w``, the beta weight and the r != t samples scaled to the r = t mean."""
    n, w = 64, 3.0
    method = method_with(Known(), fuse_guidance=w, cond_dropout=0.2)
    x, cond, neg = torch.randn(n, 2), torch.randn(n, 2), torch.full((n, 2), 5.0)
    loss, metrics = method.flowmap_loss({"x": x, "cond": cond, "neg_cond": neg})
    g = BatchRandom(torch.Generator().manual_seed(0))
    dropped = g.rand(n) < 0.2
    cond = torch.where(dropped[:, None], neg, cond)
    t1, t2, kind = g.rand(n), g.rand(n), g.rand(n)
    t, r = torch.maximum(t1, t2), torch.minimum(t1, t2)
    r = torch.where(kind < 0.5, t, torch.where(kind < 0.75, torch.zeros_like(r), r))
    assert metrics["mean_flow_share"] == pytest.approx(float((kind >= 0.5).float().mean()))
    t, r = flow.shift(t, 5.0), flow.shift(r, 5.0)
    noise = g.randn(x.shape)
    x_t, v = flow.interpolate(x, noise, t), noise - x
    u = flow.expand_time(t, x) * x_t + flow.expand_time(r, x)
    pred = (u + cond - (1 - w) * (u + neg)) / w
    # u's derivative by the difference quotient, one-sided where t +- 5e-3 leaves [0, 1]
    t_plus, t_minus = (t + 5e-3).clamp(max=1.0), (t - 5e-3).clamp(min=0.0)
    dt_plus, dt_minus = flow.expand_time(t_plus - t, v), flow.expand_time(t_minus - t, v)
    du = flow.expand_time(t_plus, v) * (x_t + dt_plus * v) - flow.expand_time(t_minus, v) * (x_t + dt_minus * v)
    target = v - flow.expand_time(t - r, v) * du / flow.expand_time((t_plus - t_minus) * w, v)
    per_sample = (pred - target).pow(2).mean(1) * beta_weight(t, 5.0)
    diffusion = kind < 0.5
    per_sample = torch.where(diffusion, per_sample, per_sample[diffusion].mean())
    assert float(loss) == pytest.approx(float(per_sample.mean()), rel=1e-4)


def test_beta_weight_has_mean_one_over_the_shifted_training_times():
    grid = flow.shift(torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1], 5.0)
    assert float(beta_weight(grid, 5.0).mean()) == pytest.approx(1.0)
    assert float(beta_weight(torch.tensor([1.0]), 5.0)) == 0.0


def test_onpolicy_steps_student_and_fake_score_every_iteration_with_the_dmd_and_flowmap_terms():
    method = method_with(MLPFlowMap(MLPVelocity(2, WORLD.cond_dim, 16, 1)), stage="onpolicy", guidance=1.0)
    calls = []
    x, cond = WORLD.sample(8)
    for step in range(2):
        method.training_step({"x": x, "cond": cond, "neg_cond": WORLD.null_cond(8)}, step, lambda *a: calls.append(a))
    assert [c[0] for c in calls] == ["generator", "fake_score"] * 2
    assert set(calls[0][2]) == {"dmd", "flowmap"}


@pytest.fixture(scope="module")
def fitted_velocity():
    return fit_teacher_copy()


@pytest.mark.slow
def test_onpolicy_anyflow_lowers_the_distance_at_one_and_two_steps(fitted_velocity):
    student = MLPFlowMap(copy.deepcopy(fitted_velocity))
    cfg = get_method("anyflow").Config(stage="onpolicy", guidance=1.0, fuse_guidance=1.0, rollout_steps=(1, 2, 4))
    method = AnyFlow(cfg, TEACHER, student, copy.deepcopy(fitted_velocity))

    def sampler(steps):
        return lambda noise, cond, g: AnyFlow.sample(student, noise, cond, steps)

    before = [distance(sampler(steps)) for steps in (1, 2)]
    train(method, steps=300)
    after = [distance(sampler(steps)) for steps in (1, 2)]
    # measured: 1.14 -> 0.79 at one step, 0.96 -> 0.77 at two (the same student, no retraining per step count)
    assert after[0] < 0.8 * before[0] and after[1] < 0.9 * before[1], (before, after)


@pytest.mark.slow
def test_flowmap_stage_turns_the_velocity_model_into_a_few_step_flow_map(fitted_velocity):
    """Stage 1 alone, from data: the r < t jumps are learned, so one and two jumps land closer to the data."""
    student = MLPFlowMap(copy.deepcopy(fitted_velocity))
    method = AnyFlow(get_method("anyflow").Config(fuse_guidance=1.0, cond_dropout=0.0), TEACHER, student, None)

    def sampler(steps):
        return lambda noise, cond, g: AnyFlow.sample(student, noise, cond, steps)

    before = [distance(sampler(steps)) for steps in (1, 2)]
    train(method, steps=200)
    after = [distance(sampler(steps)) for steps in (1, 2)]
    # measured: 1.14 -> 0.61 at one step, 0.96 -> 0.50 at two
    assert after[0] < 0.75 * before[0] and after[1] < 0.75 * before[1], (before, after)


def test_stock_anyflow_pipeline_runs_the_exported_student(tmp_path, pipeline):  # noqa: F811
    """The exported folder is loaded by diffusers' own AnyFlowPipeline, whose 2-step output is our sampler's on
    the same noise and embeddings. Tolerance: the pipeline passes float64 timesteps and steps with float64 sigmas
    where we use float32; measured differences are ~1e-7 on latents of size ~3."""
    student = perturbed(AnyFlowStudent.from_teacher(load_teacher(pipeline)), seed=3).eval()
    export_pipeline(student, tmp_path / "anyflow", pipeline, {"num_outer_steps": 2})
    index = json.loads((tmp_path / "anyflow" / "model_index.json").read_text())
    assert index["_class_name"] == "AnyFlowPipeline" and index["transformer"] == ["diffusers", "AnyFlowTransformer3DModel"]
    pipe = AnyFlowPipeline.from_pretrained(tmp_path / "anyflow")
    cond = TextEncoder.from_pretrained(pipeline).encode(["a red circle", "a blue square"])
    noise = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    size = {"height": HEIGHT, "width": WIDTH, "num_frames": FRAMES}
    stock = pipe(prompt_embeds=cond, latents=noise, num_inference_steps=2, output_type="latent", **size).frames
    with torch.no_grad():
        ours = AnyFlow.sample(student, noise, cond, 2)
    assert stock.shape == ours.shape
    torch.testing.assert_close(stock, ours, rtol=0, atol=1e-5)
    # a run's weights through `tmd export --format pipeline` make the same folder
    config = {"stage": "onpolicy", "gate_value": 0.25, "deltatime_type": "r", "outer_shift": 5.0}
    metadata = {"method": "anyflow", "method_config": json.dumps(config)}
    save_file(student.state_dict(), tmp_path / "student.safetensors", metadata=metadata)
    export = ["export", "--run", str(tmp_path / "student.safetensors"), "--teacher", str(pipeline), "--format", "pipeline"]
    assert main([*export, "--out", str(tmp_path / "cli")]) == 0
    exported = AnyFlowPipeline.from_pretrained(tmp_path / "cli").transformer.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in student.transformer.state_dict().items())
    assert main(generate_args(tmp_path / "anyflow", tmp_path / "videos", "--steps", "4")) == 0
    manifest = json.loads((tmp_path / "videos" / "generation.json").read_text())
    assert manifest["settings"]["kind"] == "anyflow" and manifest["settings"]["shift"] == 5.0


@pytest.mark.parametrize("stage", [1, 2])
def test_shipped_wan_configs_load(stage, tmp_path):
    from tmd.config import RunConfig, load_config

    overrides = [f"data.path={tmp_path}"] + (["method.init_from=null"] if stage == 2 else [])
    cfg = load_config(RunConfig, f"wan1.3b_anyflow_stage{stage}.yaml", overrides)
    assert cfg.method_name == "anyflow" and cfg.method.stage == ("flowmap", "onpolicy")[stage - 1]
    assert cfg.train.lora.rank == 256 and cfg.train.lr == (5e-5, 2e-6)[stage - 1]


def test_two_stages_on_the_world_then_generate_from_the_run_and_its_export(tmp_path, tiny_assets):
    """Stage 1, stage 2 from its export, then ``tmd generate`` at 4 steps from the run and from its student folder:
    the same latents, the flow-map sampler's."""
    from test_every_method import train as train_method

    stage1 = train_method(tmp_path / "stage1", "anyflow", tiny_assets)
    stage2 = train_method(tmp_path, "anyflow", tiny_assets, stage="onpolicy", init_from=str(stage1), rollout_steps=[2, 4])
    common = ["--prompt", "a red circle moving right", "--steps", "4", "--save-latents"]
    assert main(["generate", "--model", str(stage2), *common, "--out", str(tmp_path / "from_run")]) == 0
    manifest = json.loads((tmp_path / "from_run" / "generation.json").read_text())
    assert manifest["settings"]["kind"] == "anyflow" and manifest["videos"][0]["effective_nfe"] == 4
    teacher = tiny_assets / "teacher"
    assert main(["export", "--run", str(stage2), "--teacher", str(teacher), "--out", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "config.json").read_text())["kind"] == "anyflow"
    assert main(["generate", "--model", str(tmp_path / "export"), *common, "--out", str(tmp_path / "from_export")]) == 0
    name = manifest["videos"][0]["file"].replace(".mp4", ".safetensors")
    torch.testing.assert_close(
        load_file(tmp_path / "from_export" / name)["latents"], load_file(tmp_path / "from_run" / name)["latents"]
    )


def test_activation_checkpointing_gives_the_same_gradients(tiny_teacher, tiny_inputs):
    x, cond, _ = tiny_inputs
    grads = []
    for enabled in (False, True):
        student = AnyFlowStudent.from_teacher(tiny_teacher).requires_grad_(True)
        student.activation_checkpointing = enabled
        assert student.transformer.gradient_checkpointing == enabled
        student.mean_velocity(x, 0.8, 0.3, cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    torch.testing.assert_close(grads[1], grads[0])
