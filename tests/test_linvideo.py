"""LinVideo: the linear-attention processor, selective transfer with rounding, ADM on the tiny model, and
the linearised model as the teacher of TMD and DMD2 (``data.linearised_teacher``)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_generate import build_tiny_pipeline
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from tmd.config import ConfigError, RunConfig, load_config, to_dict
from tmd.data.prepare import prepare
from tmd.eval.report import findings
from tmd.methods import get_method
from tmd.methods.linvideo import load_linearised
from tmd.models.linear_attention import (
    LINEAR,
    MIXED,
    SOFTMAX,
    SelectiveAttention,
    describe_layers,
    linear_attention,
    linear_layers,
    linearise,
    round_selection,
    selection_losses,
    selective_layers,
    softmax_ratios,
)
from tmd.models.wan import load_teacher
from tmd.programs.bench_measure import attention_scaling, token_grid
from tmd.programs.cli import main
from tmd.rng import BatchRandom
from tmd.sampling import guided_velocity, sample_teacher, sample_tmd, teacher_grid
from tmd.train.run import with_linear_attention
from tmd.train.update import UpdateStep, optimizer_settings

LATENT = (4, 2, 8, 8)


def set_modes(model, kind):
    for layer in selective_layers(model):
        layer.set_mode(kind)
    return model


def test_softmax_mode_is_the_teacher_and_the_mix_interpolates(tiny_teacher, tiny_inputs):
    x, text, _ = tiny_inputs
    model = linearise(tiny_teacher, copy_model=True)
    teacher_state = tiny_teacher.state_dict()
    # the teacher's names and weights are untouched: a teacher checkpoint loads into the linearised model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in teacher_state.items())
    with torch.no_grad():
        v_teacher = tiny_teacher.velocity(x, 0.4, text)
        v_softmax = set_modes(model, SOFTMAX).velocity(x, 0.4, text)
        v_linear = set_modes(model, LINEAR).velocity(x, 0.4, text)
    assert torch.allclose(v_softmax, v_teacher, atol=1e-6)
    assert v_linear.shape == v_teacher.shape and not torch.allclose(v_linear, v_teacher, atol=1e-4)

    attn = model.transformer.blocks[1].attn1
    hidden = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(0))
    rotary = model.transformer.rope(x)
    layer = attn.processor
    with torch.no_grad():
        layer.set_mode(SOFTMAX)
        soft = attn(hidden, None, None, rotary)
        layer.set_mode(LINEAR)
        lin = attn(hidden, None, None, rotary)
        layer.set_mode(MIXED)
        r = float(layer.ratio)
        assert torch.allclose(attn(hidden, None, None, rotary), r * soft + (1 - r) * lin, atol=1e-5)


def test_the_feature_map_starts_as_an_estimate_of_softmax_attention():
    """Random features W = G / d^(1/4) estimate the softmax kernel: more features, closer; the unscaled
    W (which would estimate exp(q.k), not exp(q.k / sqrt d)) is worse than attending uniformly."""
    g = torch.Generator().manual_seed(0)
    n, d = 16, 16
    q, k = torch.randn(1, n, 1, d, generator=g), torch.randn(1, n, 1, d, generator=g)
    values = torch.eye(n).reshape(1, n, 1, n)  # the output rows are the attention weights
    soft = torch.softmax(q[0, :, 0] @ k[0, :, 0].T / d**0.5, dim=-1)

    def error(features: int, scale: float) -> float:
        errors = []
        for seed in range(3):
            w = torch.randn(1, d, features, generator=torch.Generator().manual_seed(seed)) * scale
            errors.append(float((linear_attention(q, k, values, w, w)[0, :, 0] - soft).norm() / soft.norm()))
        return sum(errors) / len(errors)

    uniform = float((torch.full_like(soft, 1 / n) - soft).norm() / soft.norm())
    few, many = error(4, d**-0.25), error(1024, d**-0.25)
    assert many < 0.8 * uniform and many < 0.85 * few, (few, many, uniform)
    assert error(1024, 1.0) > uniform


def test_linearised_model_at_init_is_close_to_the_teacher(tiny_teacher, tiny_inputs):
    x, text, _ = tiny_inputs
    model = set_modes(linearise(tiny_teacher, copy_model=True), LINEAR)
    with torch.no_grad():
        for t in (0.9, 0.5, 0.1):
            v_teacher = tiny_teacher.velocity(x, t, text)
            relative = float((model.velocity(x, t, text) - v_teacher).norm() / v_teacher.norm())
            assert relative < 0.15, (t, relative)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_linear_attention_is_linear_in_sequence_length(tiny_teacher):
    model = linearise(tiny_teacher, copy_model=True)
    attn = model.transformer.blocks[0].attn1
    dim = model.config.num_attention_heads * model.config.attention_head_dim

    def call(tokens: int, kind: int) -> tuple[int, int]:
        """FLOPs and the largest intermediate of one attention pass over ``tokens`` tokens."""
        frames, height, width = token_grid(tokens)
        rotary = model.transformer.rope(torch.zeros(1, 4, frames, 2 * height, 2 * width))
        hidden = torch.randn(1, tokens, dim)
        attn.processor.set_mode(kind)
        # the math backend builds the n x n scores explicitly: the positive control for the shape check
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as flops, LargestTensor() as largest:
            attn(hidden, None, None, rotary)
        return flops.get_total_flops(), largest.largest

    n = 1024
    (linear_flops, linear_largest), (linear_flops_2n, _) = call(n, LINEAR), call(2 * n, LINEAR)
    (softmax_flops, softmax_largest), (softmax_flops_2n, _) = call(n, SOFTMAX), call(2 * n, SOFTMAX)
    assert linear_flops_2n / linear_flops == pytest.approx(2.0, rel=0.02)
    assert softmax_flops_2n / softmax_flops > 3.0
    assert softmax_largest >= n * n
    assert linear_largest < n * n / 8


def sharpened_teacher(block: int, factor: float):
    """The tiny teacher with one block's attention made peaked (q and k scaled): hard to linearise."""
    teacher = load_teacher("tiny", seed=0)
    attn = teacher.transformer.blocks[block].attn1
    attn.norm_q.weight.data *= factor
    attn.norm_k.weight.data *= factor
    return teacher.requires_grad_(False)


def make_batch(n: int = 4):
    g = torch.Generator().manual_seed(0)
    return {"cond": torch.randn(n, 5, 32, generator=g), "neg_cond": torch.randn(n, 5, 32, generator=g), "latent_shape": LATENT}


def train(method, batch, steps, lr=1e-4, record=None, start=0):
    method.rng = BatchRandom(torch.Generator().manual_seed(start))
    groups = method.parameter_groups()
    settings = optimizer_settings(method, groups, lr, (0.9, 0.999))  # a method's own lr_scale, as the trainer's
    optimizers = {group: torch.optim.AdamW(params, **settings[group]) for group, params in groups.items()}

    step_group = UpdateStep(optimizers, groups)

    def update(group, loss, terms=None):
        step_group(group, loss)
        if record is not None:
            record.append({k: float(v.detach()) for k, v in (terms or {}).items()})

    for step in range(start, start + steps):
        method.training_step(batch, step, update)


def trajectory_gap(model, teacher, batch, steps=8, guidance=3.0, shift=5.0):
    """Relative squared velocity error of both branches along the teacher's CFG trajectories."""
    cond, neg = batch["cond"], batch["neg_cond"]
    x = torch.randn(cond.shape[0], *LATENT, generator=torch.Generator().manual_seed(1))
    grid = teacher_grid(steps, shift)
    error = power = 0.0
    with torch.no_grad():
        for j in range(steps):
            for branch in (cond, neg):
                v = teacher.velocity(x, grid[j], branch)
                error += float((model.velocity(x, grid[j], branch) - v).pow(2).mean())
                power += float(v.pow(2).mean())
            x = x + (grid[j + 1] - grid[j]) * guided_velocity(teacher, x, grid[j], cond, neg, guidance)
    return error / power


def test_selective_transfer_keeps_the_hard_layer_and_rounds_to_the_target():
    hard = 2
    teacher = sharpened_teacher(hard, 4.0)
    # every r starts at 0.99 (all softmax) and the constraint on the rounded count pulls them down together
    cfg = get_method("linvideo").Config(
        softmax_layers=1, selection_steps=30, logit_gain=30000.0, guidance=3.0, trajectory_steps=8
    )
    method = get_method("linvideo").from_teacher(cfg, teacher)
    terms = []
    train(method, make_batch(), 30, record=terms)
    ratios = softmax_ratios(method.student).detach()
    print(describe_layers(method.student))
    others = torch.cat([ratios[:hard], ratios[hard + 1 :]])
    assert float(ratios[hard]) > float(others.max()) + 0.03 and float(others.max()) < 0.5, ratios  # measured 0.33 vs 0.28
    assert terms[-1]["transfer"] < 0.85 * terms[0]["transfer"], (terms[0], terms[-1])

    train(method, make_batch(), 1, start=30)  # rounding is due at step selection_steps
    assert linear_layers(method.student) == [i for i in range(4) if i != hard]
    assert float(softmax_ratios(method.student).sum()) == 1.0


def test_selection_starts_all_softmax_and_constrains_the_rounded_count(tiny_teacher):
    """r starts at 0.99 in every layer; the default target is the paper's share (16 of 30 linear: 2 of 4);
    the constraint is ``(sum round(r) - target)^2`` with its gradient passed straight through the rounding."""
    method = get_method("linvideo").from_teacher(get_method("linvideo").Config(), tiny_teacher)
    assert method.softmax_layers == 2
    torch.testing.assert_close(softmax_ratios(method.student), torch.full((4,), 0.99))
    layers = selective_layers(method.student)
    with torch.no_grad():
        for layer, r in zip(layers, (0.9, 0.6, 0.3, 0.2)):
            layer.ratio_logit.fill_(math.log(r / (1 - r)) / float(layer.logit_gain))
    constraint, _ = selection_losses(method.student, 1, 20.0)
    constraint.backward()
    assert float(constraint.detach()) == 1.0  # two layers round to softmax, one is wanted
    for layer, r in zip(layers, (0.9, 0.6, 0.3, 0.2)):  # d/dr = 2 (2 - 1) in every layer, through r = sigmoid(gain logit)
        torch.testing.assert_close(layer.ratio_logit.grad, torch.tensor([2.0 * r * (1 - r) * float(layer.logit_gain)]))


def test_rounding_gives_exactly_the_target(tiny_teacher):
    model = linearise(tiny_teacher, copy_model=True)
    with torch.no_grad():
        for layer, logit in zip(selective_layers(model), (0.3, -2.0, 1.5, 0.0)):
            layer.ratio_logit.fill_(logit)
    for target, linear in [(0, [0, 1, 2, 3]), (1, [0, 1, 3]), (2, [1, 3]), (3, [1])]:
        for layer in selective_layers(model):
            layer.set_mode(MIXED)
        assert round_selection(model, target) == linear
        assert [layer.kind for layer in selective_layers(model)].count(SOFTMAX) == target
    with pytest.raises(ValueError, match=r"integer in \[0, 3\] for a model with 4 layers"):
        round_selection(model, 4)
    with pytest.raises(ValueError, match="softmax layers"):
        get_method("linvideo").from_teacher(get_method("linvideo").Config(softmax_layers=4), tiny_teacher)
    with pytest.raises(ValueError, match="already linearised"):
        linearise(model)


def test_adm_reduces_the_gap_to_the_teacher():
    teacher = sharpened_teacher(1, 2.0)
    cfg = get_method("linvideo").Config(softmax_layers=0, guidance=3.0, trajectory_steps=8)
    method = get_method("linvideo").from_teacher(cfg, teacher)
    batch = make_batch()
    round_selection(method.student, 0)  # what the first step does for softmax_layers=0, done early to measure
    before = trajectory_gap(method.student, teacher, batch)
    train(method, batch, 30)
    after = trajectory_gap(method.student, teacher, batch)
    print(f"velocity gap {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before


def test_the_generator_is_a_teacher_sampler_and_its_export_reloads(tiny_teacher, tiny_inputs, tmp_path):
    noise, text, negative = tiny_inputs
    cfg = get_method("linvideo").Config(softmax_layers=2, selection_steps=1, trajectory_steps=4, feature_dim=8)
    method = get_method("linvideo").from_teacher(cfg, tiny_teacher)
    train(method, make_batch(2), 2)
    path = tmp_path / "student.safetensors"  # as tmd.train.run exports it
    exported = {k: v.detach().clone() for k, v in method.ema_modules()["student"].state_dict().items()}
    save_file(exported, str(path), metadata={"method": "linvideo", "method_config": json.dumps(to_dict(cfg))})
    rebuilt = load_linearised(tiny_teacher, path)  # the buffers say which layers are linear, and the gains
    assert linear_layers(rebuilt) == linear_layers(method.student) and len(linear_layers(rebuilt)) == 2
    sample = get_method("linvideo").sample_guided(rebuilt, noise, text, negative, 3, 3.0, 5.0)
    assert torch.equal(sample, sample_teacher(method.student, noise, text, negative, 3, 3.0, 5.0))
    assert sample.shape == noise.shape and torch.isfinite(sample).all()


def test_attention_bench_rows(tiny_teacher):
    rows = attention_scaling(tiny_teacher, (256, 512), repeats=1, warmup=0, device=torch.device("cpu"))
    assert [row["tokens"] for row in rows] == [256, 512]
    assert all(row["softmax_block_ms"] > 0 and row["linear_block_ms"] > 0 for row in rows)
    assert rows[0]["softmax_growth"] == 1.0
    with pytest.raises(ValueError, match="powers of 2"):
        token_grid(300)


def test_the_demo_report_names_the_linearised_teacher_and_its_tmd_student():
    def row(method, steps, total, latency, inner=None):
        return {
            "method": method,
            "outer_steps": steps,
            "inner_steps": inner,
            "effective_nfe": 2.0 * steps,
            "total": total,
            "latency_ms": latency,
            "speedup_vs_teacher": 1000 / latency,
        }

    rows = [
        row("teacher", 50, 0.70, 1000),
        row("linvideo", 50, 0.66, 800),
        row("linvideo", 8, 0.60, 130),
        row("tmd", 2, 0.5, 40, 2),
        row("tmd", 2, 0.6, 50, 4),
        row("linvideo_tmd", 2, 0.45, 30, 2),
        row("linvideo_tmd", 2, 0.57, 38, 4),
        row("linvideo_tmd", 1, 0.59, 20, 4),
    ]
    lines = findings(rows)
    line = next(line for line in lines if line.startswith("Linearised teacher (LinVideo"))
    assert "50 steps: total 0.660 at 800 ms" in line and "the teacher at 50 steps: 0.700" in line
    # the best N at M=2 (even where M=1 scores higher), against plain TMD at that same M x N
    line = next(line for line in lines if line.startswith("Linearised teacher + TMD"))
    assert (
        "M=2 x N=4" in line
        and "total 0.570 at 38 ms" in line
        and "plain TMD at the same M x N: 0.600 at 50 ms (-5.0% total)" in line
    )
    assert lines[-1].startswith("Target (TMD M=2")
    assert not any("+ TMD" in line for line in findings(rows[:5]))


def export(model, path, method="linvideo", cfg=None):
    """``model``'s weights as ``tmd.train.run`` writes a run's ``student.safetensors``."""
    config = to_dict(cfg if cfg is not None else get_method(method).Config())
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(path), metadata={"method": method, "method_config": json.dumps(config)})
    return path


@pytest.fixture
def linearised_export(tiny_teacher, tmp_path):
    """A rounded LinVideo export of the tiny teacher: blocks 0 (backbone at H=2) and 3 (head) linear."""
    model = linearise(tiny_teacher, copy_model=True)
    with torch.no_grad():
        for layer, logit in zip(selective_layers(model), (-1.0, 1.0, 1.0, -1.0)):
            layer.ratio_logit.fill_(logit)
    assert round_selection(model, 2) == [0, 3]
    return export(model, tmp_path / "linvideo.safetensors")


def test_tmd_distils_a_linearised_teacher(tiny_teacher, tiny_inputs, linearised_export, tmp_path):
    x, text, negative = tiny_inputs
    teacher = with_linear_attention(tiny_teacher, str(linearised_export), copy_model=True)
    assert linear_layers(teacher) == [0, 3] and not any(p.requires_grad for p in teacher.parameters())
    assert not isinstance(tiny_teacher.transformer.blocks[0].attn1.processor, SelectiveAttention)  # linearised on a copy

    stage1 = get_method("tm").from_teacher(get_method("tm").Config(head_blocks=2, inner_steps=2), teacher)
    student = stage1.student
    # the deep copy carries the processors (fresh ones, not the frozen teacher's) into backbone and head
    assert student.split_index == 2 and linear_layers(student) == [0, 3]
    assert student.transformer.blocks[3].attn1.processor is not teacher.transformer.blocks[3].attn1.processor
    with torch.no_grad():  # TMD's init: the first head evaluation is the (linearised) teacher's forward
        y_hat = student.head(torch.randn_like(x), 0.999, 0.999, student.backbone(x, 0.999, text))
        torch.testing.assert_close(y_hat, teacher.velocity(x, 0.999, text), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y_hat, tiny_teacher.velocity(x, 0.999, text), atol=1e-4)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    train(stage1, {"x": x, "cond": text, "neg_cond": negative}, 1, lr=1e-3)
    after = student.state_dict()

    def changed(key):
        return not torch.equal(before[key], after[key])

    # everything that computes the output trains, the feature maps of the linear layers included; the
    # softmax layers' feature maps and every rounded r take no part in the forward and stay as they were
    processor = "transformer.blocks.{}.attn1.processor.{}"
    assert changed("transformer.blocks.0.attn1.to_q.weight") and changed("transformer.blocks.3.ffn.net.2.weight")
    assert all(changed(processor.format(block, "feature_q")) for block in (0, 3))
    assert not any(changed(processor.format(block, "feature_q")) for block in (1, 2))
    assert not any(changed(processor.format(block, "ratio_logit")) for block in range(4))

    stage1_weights = export(student, tmp_path / "stage1.safetensors", "tm", stage1.cfg)
    cfg = get_method("tmd").Config(head_blocks=2, inner_steps=2, init_from=str(stage1_weights), generator_every=2, guidance=3.0)
    stage2 = get_method("tmd").from_teacher(cfg, teacher)
    assert linear_layers(stage2.student) == [0, 3] and linear_layers(stage2.fake_score) == [0, 3]
    assert torch.equal(stage2.student.state_dict()[processor.format(0, "feature_q")], after[processor.format(0, "feature_q")])
    before = {k: v.clone() for k, v in stage2.student.state_dict().items()}
    train(stage2, {"x": x, "cond": text, "neg_cond": negative}, 1, lr=1e-3)
    assert not torch.equal(
        before[processor.format(3, "feature_k")], stage2.student.state_dict()[processor.format(3, "feature_k")]
    )

    with torch.no_grad():
        sample = sample_tmd(stage2.student, x, text, 2, 2, torch.Generator().manual_seed(0))
    assert sample.shape == x.shape and torch.isfinite(sample).all()


def test_the_linearised_teacher_path_is_checked(tiny_teacher, linearised_export, tmp_path):
    def load(path, *overrides):
        return load_config(RunConfig, "world_tmd_stage1.yaml", [f"data.linearised_teacher={path}", *overrides])

    assert load(linearised_export).data.linearised_teacher == str(linearised_export)
    with pytest.raises(ConfigError, match=r"key 'data.linearised_teacher': path '.*nowhere.safetensors' does not exist"):
        load(tmp_path / "nowhere.safetensors")
    stage1 = export(tiny_teacher, tmp_path / "tm.safetensors", "tm")
    with pytest.raises(
        ConfigError, match=r"data.linearised_teacher: .*tm.safetensors was written by method 'tm', not by a linvideo run"
    ):
        load(stage1)
    # the prepared-data section has the same key and check
    with pytest.raises(ConfigError, match=r"data.linearised_teacher: .*was written by method 'tm'"):
        load(stage1, "data_kind=prepared", f"data.path={tmp_path}")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ConfigError, match=r"data.linearised_teacher: .*notes.txt is not a safetensors file"):
        load(tmp_path / "notes.txt")
    mixed = export(linearise(tiny_teacher, copy_model=True), tmp_path / "mixed.safetensors")
    with pytest.raises(ConfigError, match=r"before selective transfer was rounded \(4 of 4 layers still mixed\)"):
        load(mixed)

    # a linvideo export of another model passes the config check; building the teacher names the key and the shapes
    other = linearise(tiny_teacher, feature_dim=8, copy_model=True)
    round_selection(other, 2)
    wrong = export(other, tmp_path / "other.safetensors")  # its metadata says feature_dim None: the head dimension, not 8
    with pytest.raises(
        ConfigError, match=r"data.linearised_teacher: .*other.safetensors does not fit this student: shapes differ"
    ):
        with_linear_attention(tiny_teacher, str(wrong), copy_model=True)


def test_a_prepared_run_distils_a_linvideo_run(tmp_path):
    """Text-only prepared data: linvideo, then DMD2 of its export through ``tmd train`` (the Wan route)."""
    pipeline = build_tiny_pipeline(tmp_path / "wan")
    data = tmp_path / "data"
    prepare(
        data,
        pipeline,
        prompts=["a red circle", "a blue square"],
        frames=5,
        height=32,
        width=32,
        negative_prompt="",
        progress=False,
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data_kind: prepared\ndata: {{path: {data}}}\ntrain: {{steps: 2, batch_size: 2, progress: false, tensorboard: false}}\n"
    )
    linvideo = [
        "method_name=linvideo",
        "method.softmax_layers=1",
        "method.selection_steps=1",
        "method.trajectory_steps=2",
        f"train.out_dir={tmp_path / 'linvideo'}",
    ]
    assert main(["train", "--config", str(config), *linvideo]) == 0
    weights = tmp_path / "linvideo" / "student.safetensors"
    # text-only data: nothing to noise, so the student starts from simulated noise
    dmd2 = [
        "method_name=dmd2",
        "method.gan_weight=0.0",
        "method.student_input=backward",
        f"data.linearised_teacher={weights}",
        f"train.out_dir={tmp_path / 'dmd2'}",
    ]
    assert main(["train", "--config", str(config), *dmd2]) == 0
    # the generator is a copy of the linearised teacher: its export carries the linear layers
    exported = load_file(str(tmp_path / "dmd2" / "student.safetensors"))
    modes = [int(v) for k, v in exported.items() if k.endswith("attn1.processor.mode")]
    assert modes.count(LINEAR) == len(modes) - 1 >= 1
