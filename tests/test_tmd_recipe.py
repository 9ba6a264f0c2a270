"""The TMD paper's equations for stage 1, stage 2 and the DMD2-v baseline, each held exactly: networks with
known outputs are patched in and every loss or sample is recomputed by hand from the same random draws."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tmd import flow
from tmd.methods import get_method
from tmd.methods.common import adaptive_l2
from tmd.models.discriminator import default_feature_blocks
from tmd.models.export import export_student
from tmd.models.split import TMDStudent
from tmd.rng import BatchRandom
from tmd.sampling import sample_teacher, sample_tmd

B, D = 3, 4


class KnownVelocity(nn.Module):
    """v(x, t) = 0.5 x + t: a teacher, fake score or DMD2-v student with a hand-computable output."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # something for an optimizer group to hold

    def velocity(self, x_t, t, cond):
        return 0.5 * x_t + flow.expand_time(torch.as_tensor(t, dtype=x_t.dtype), x_t) + 0 * self.weight


class KnownStudent(nn.Module):
    """A TMD student whose backbone passes ``x_t`` through and whose head is ``features + 0.5 y_s + s r``;
    it records every call."""

    inner_velocity = "noise"
    transition_target = "difference"

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.backbone_calls, self.head_calls = [], []

    def backbone(self, x_t, t, cond):
        self.backbone_calls.append((x_t.detach().clone(), torch.as_tensor(t).clone()))
        return x_t

    def head(self, y_s, s, r, features):
        s, r = (flow.expand_time(torch.as_tensor(v, dtype=y_s.dtype), y_s) for v in (s, r))
        self.head_calls.append((y_s.detach().clone(), s.detach().clone(), r.detach().clone()))
        return features + 0.5 * y_s + s * r + 0 * self.weight


def known_head(features, y_s, s, r):
    return features + 0.5 * y_s + s * r


def batch():
    g = torch.Generator().manual_seed(11)
    return {"x": torch.randn(B, D, generator=g), "cond": torch.zeros(B, 1), "neg_cond": torch.ones(B, 1)}


def seeded(method, seed=5):
    method.rng = BatchRandom(torch.Generator().manual_seed(seed))
    return method


def replay(seed=5):
    return BatchRandom(torch.Generator().manual_seed(seed))


def column(t):
    return t.reshape(-1, 1)


def inner_rollout_by_hand(features, y1, grid):
    y = y1
    for s, r in zip(grid[:-1], grid[1:]):
        y = y - (s - r) * (y1 - known_head(features, y, s, r))
    return y


@pytest.mark.parametrize("generator_output", ["x1_minus_y", "xt_minus_ty"])
def test_stage2_student_sees_noised_data_and_returns_eq15(generator_output):
    """Alg. 2: the student's input is ``x_{t_i} = (1 - t_i) x + t_i x1`` with ``t_i`` on the outer grid; its
    sample is Eq. 15's ``x1 - InnerFlow(m)`` (or, as an option, the DTM step ``x_t - t y``)."""
    cfg = get_method("tmd").Config(outer_steps=2, inner_steps=3, gan_weight=0.0, generator_output=generator_output)
    student = KnownStudent()
    method = seeded(get_method("tmd")(cfg, KnownVelocity(), student, KnownVelocity()))
    data = batch()
    x_hat = method.generator_sample(data)

    g = replay()
    t = flow.outer_grid(2).float()[g.randint(2, B)]
    x1 = g.randn((B, D))
    y1 = g.randn((B, D))
    x_t = (1 - column(t)) * data["x"] + column(t) * x1
    seen_x, seen_t = student.backbone_calls[0]
    torch.testing.assert_close(seen_x, x_t)
    torch.testing.assert_close(seen_t, t)
    assert all(min(abs(v - 0.999), abs(v - 10 * 0.5 / 5.5)) < 1e-6 for v in seen_t.tolist())
    y = inner_rollout_by_hand(x_t, y1, flow.inner_grid(3).float())
    expected = x1 - y if generator_output == "x1_minus_y" else x_t - column(t) * y
    torch.testing.assert_close(x_hat, expected)


def test_stage2_gradients_reach_every_inner_step_or_only_the_last():
    """Gradients flow through the whole rollout by default; ``rollout_gradients=last`` (the Fig. 7 ablation)
    runs the earlier inner steps without them."""
    for gradients, expected in (("all", [True, True, True]), ("last", [False, False, True])):
        cfg = get_method("tmd").Config(outer_steps=1, inner_steps=3, gan_weight=0.0, rollout_gradients=gradients)
        student = KnownStudent()
        seen = []
        original = student.head
        student.head = lambda y_s, s, r, f: seen.append(torch.is_grad_enabled()) or original(y_s, s, r, f)
        method = seeded(get_method("tmd")(cfg, KnownVelocity(), student, KnownVelocity()))
        method.generator_sample(batch()).sum().backward()
        assert seen == expected


def test_dmd2v_student_is_eq17_on_noised_data():
    cfg = get_method("dmd2").Config(outer_steps=3, gan_weight=0.0)
    method = seeded(get_method("dmd2")(cfg, KnownVelocity(), KnownVelocity(), KnownVelocity()))
    data = batch()
    x_hat = method.generator_sample(data)
    g = replay()
    t = column(flow.outer_grid(3).float()[g.randint(3, B)])
    x_t = (1 - t) * data["x"] + t * g.randn((B, D))
    torch.testing.assert_close(x_hat, x_t - t * (0.5 * x_t + t))


def test_data_input_needs_data():
    cfg = get_method("dmd2").Config(gan_weight=0.0)
    method = seeded(get_method("dmd2")(cfg, KnownVelocity(), KnownVelocity(), KnownVelocity()))
    with pytest.raises(ValueError, match="student_input=backward"):
        method.generator_sample({"latent_shape": (D,), "cond": torch.zeros(B, 1), "neg_cond": torch.zeros(B, 1)})


def test_critics_step_between_student_steps():
    """Table 7 / FastGen: the student on every 5th iteration, fake score and discriminator on the others."""
    cfg = get_method("dmd2").Config(outer_steps=1, gan_weight=0.0, generator_every=5)
    method = seeded(get_method("dmd2")(cfg, KnownVelocity(), KnownVelocity(), KnownVelocity()))
    groups = []
    for step in range(10):
        method.training_step(batch(), step, lambda group, loss, terms=None: groups.append((step, group)))
    assert groups == [(s, "generator") if s % 5 == 0 else (s, "fake_score") for s in range(10)]
    with pytest.raises(ValueError, match="critics_on_generator_steps"):
        get_method("dmd2").Config(generator_every=1)


def test_fake_score_regresses_x0():
    """A.3: the fake score is x0-parametrised (Eq. 17) and trained by x0 regression on noised student samples."""
    cfg = get_method("dmd2").Config(gan_weight=0.0)
    method = seeded(get_method("dmd2")(cfg, KnownVelocity(), KnownVelocity(), KnownVelocity()))
    x_fake = torch.randn(B, D)
    losses = {}
    method.critic_losses(x_fake, batch(), lambda group, loss, terms=None: losses.setdefault(group, loss))
    g = replay()
    t = column(flow.shift(0.001 + 0.998 * g.rand(B), 5.0))
    x_t = (1 - t) * x_fake + t * g.randn((B, D))
    torch.testing.assert_close(losses["fake_score"], ((x_t - t * (0.5 * x_t + t)) - x_fake).pow(2).mean())


def test_gan_losses_average_over_the_heads():
    """A.3: one logit per teacher-feature head; discriminator and generator losses are averaged over them,
    with real and fake data noised at the same time and noise."""
    cfg = get_method("dmd2").Config(gan_weight=0.0)
    method = seeded(get_method("dmd2")(cfg, KnownVelocity(), KnownVelocity(), KnownVelocity()))
    method.discriminator = nn.Linear(1, 1)  # present, so the critic step runs the GAN branch
    seen = []
    logits = torch.tensor([[0.3, -1.0, 2.0]] * B + [[-0.5, 0.1, 1.5]] * B)  # fake rows, then real rows

    def known_logits(x_tau, tau, cond):
        seen.append((x_tau.clone(), tau.clone()))
        return logits

    method._logits = known_logits
    losses = {}
    data = batch()
    x_fake = torch.randn(B, D)
    method.critic_losses(x_fake, data, lambda group, loss, terms=None: losses.setdefault(group, loss))
    fake, real = logits.chunk(2)
    per_head = [F.softplus(fake[:, k]).mean() + F.softplus(-real[:, k]).mean() for k in range(3)]
    torch.testing.assert_close(losses["discriminator"], torch.stack(per_head).mean())
    g = replay()
    t = flow.shift(0.001 + 0.998 * g.rand(B), 5.0)
    eps = g.randn((B, D))
    x_tau, tau = seen[0]
    torch.testing.assert_close(x_tau, torch.cat([flow.interpolate(x_fake, eps, t), flow.interpolate(data["x"], eps, t)]))
    torch.testing.assert_close(tau, t.repeat(2))


def test_discriminator_reads_the_papers_blocks():
    assert default_feature_blocks(30) == (15, 22, 29)
    assert default_feature_blocks(40) == (19, 29, 39)
    assert default_feature_blocks(6) == (3, 4, 5)


def stage1_step(cfg, student):
    """One stage-1 step of ``student``: its loss, the batch, and what the backbone and the first head call saw."""
    method = seeded(get_method("tm")(cfg, student))
    losses, data = [], batch()
    method.training_step(data, 0, lambda group, loss, terms=None: losses.append(loss))
    return losses[0], data, student.backbone_calls[0], student.head_calls[0]


def test_stage1_loss_is_tm_meanflow_with_the_noise_velocity():
    """A.2 with a head linear in ``y_s`` and ``s``: ``u = y1 - head`` regresses ``v - (s - r) du/ds`` with
    ``v = y1 - y`` (guidance 1) and ``du/ds = -(0.5 v + r)`` exactly, under the adaptive normalisation."""
    cfg = get_method("tm").Config(outer_steps=2, inner_steps=2, guidance=1.0, cond_dropout=0.0, mean_flow_fraction=0.5)
    loss, data, (x_t, t), (y_s, s, r) = stage1_step(cfg, KnownStudent())
    t = column(t)
    x1 = (x_t - (1 - t) * data["x"]) / t
    y = x1 - data["x"]
    y1 = (y_s - (1 - s) * y) / s
    v = y1 - y
    u = y1 - known_head(x_t, y_s, s, r)
    target = v + (s - r) * (0.5 * v + r)
    torch.testing.assert_close(loss, adaptive_l2(u - target, 1.0, 1.0), rtol=1e-4, atol=1e-6)
    # r is the inner-grid point at or below s for the mean-flow share, s itself for the rest
    grid = flow.inner_grid(2).float()
    for s_i, r_i in zip(s[:, 0], r[:, 0]):
        assert r_i == s_i or r_i == max(p for p in grid if p <= s_i)


def test_stage1_difference_quotient_is_one_sided_at_the_ends():
    """With ``u = y1 - s^2`` the central difference is exact (-2s); the forward one (s - delta < r) gives
    -(2s + delta), the backward one (s + delta > 1) -(2s - delta)."""
    cfg = get_method("tm").Config(finite_difference=5e-3)
    student = KnownStudent()
    student.head = lambda y_s, s, r, f: flow.expand_time(torch.as_tensor(s), y_s) ** 2 + 0 * y_s
    method = get_method("tm")(cfg, student)
    s = torch.tensor([0.5, 0.5, 0.998])
    r = torch.tensor([0.0, 0.498, 0.3])
    y = torch.zeros(3, D)
    du = method.du_ds(y, y, s, r, torch.ones(3, D), None, y, s)[:, 0]
    d = 5e-3
    torch.testing.assert_close(du, torch.tensor([-1.0, -(1.0 + d), -(2 * 0.998 - d)]), rtol=1e-4, atol=1e-4)


def test_kd_warmup_regresses_the_teachers_samples():
    """Table 4's KD warm-up: during ``kd_warmup_steps`` the one-step output from pure noise at 0.999
    regresses the teacher's multi-step CFG sample from the same noise; then distribution matching starts."""
    cfg = get_method("dmd2").Config(outer_steps=1, gan_weight=0.0, kd_warmup_steps=2, kd_teacher_steps=3, guidance=2.0)
    teacher, student = KnownVelocity(), KnownVelocity()
    method = seeded(get_method("dmd2")(cfg, teacher, student, KnownVelocity()))
    data = batch()
    losses = []
    method.training_step(data, 0, lambda group, loss, terms=None: losses.append((group, loss)))
    noise = replay().randn((B, D))
    target = sample_teacher(teacher, noise, data["cond"], data["neg_cond"], 3, 2.0, 5.0)
    assert losses[0][0] == "generator"
    torch.testing.assert_close(losses[0][1], ((noise - 0.999 * (0.5 * noise + 0.999)) - target).pow(2).mean())
    groups = []
    method.training_step(data, 2, lambda group, loss, terms=None: groups.append(group))
    assert groups == ["fake_score"]  # after the warm-up: TTUR, a critic iteration


def test_sample_target_reads_the_head_as_x0_and_steps_by_eq18():
    """B.4's ``y = x``: the head's estimate is ``x_t - t head``, ``u = (y_s - y_hat) / s``, and the outer step
    is Eq. 18's deterministic step with ``y`` as the x0 estimate."""
    student = KnownStudent()
    student.transition_target, student.inner_velocity = "sample", "implied"
    x1 = torch.randn(B, D)
    g = torch.Generator().manual_seed(2)
    x = sample_tmd(student, x1, None, outer_steps=2, inner_steps=1, rng=g)
    outer = flow.outer_grid(2).float()
    x_mid = flow.deterministic_step(x1, x1 - outer[0] * known_head(x1, *_first_inner(student, 0)), outer[0], outer[1])
    torch.testing.assert_close(student.backbone_calls[1][0], x_mid)
    torch.testing.assert_close(x, x_mid - outer[1] * known_head(x_mid, *_first_inner(student, 1)))


def _first_inner(student, call):
    y_s, s, r = student.head_calls[call]
    return y_s, s, r


def test_sample_target_needs_the_implied_velocity():
    with pytest.raises(ValueError, match="set inner_velocity=implied"):
        get_method("tm").Config(transition_target="sample")


def test_stage1_with_the_sample_target_regresses_y_equal_x():
    cfg = get_method("tm").Config(
        guidance=1.0, cond_dropout=0.0, mean_flow_fraction=0.0, transition_target="sample", inner_velocity="implied"
    )
    student = KnownStudent()
    student.transition_target, student.inner_velocity = "sample", "implied"
    loss, data, (x_t, t), (y_s, s, r) = stage1_step(cfg, student)
    y = data["x"]
    y1 = (y_s - (1 - s) * y) / s
    u = (y_s - (x_t - column(t) * known_head(x_t, y_s, s, r))) / s
    torch.testing.assert_close(loss, adaptive_l2(s * (u - (y1 - y)), 1.0, 1.0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("inner_velocity,target", [("noise", "difference"), ("implied", "sample")])
def test_exported_students_keep_their_inner_flow(tiny_teacher, tmp_path, inner_velocity, target):
    student = TMDStudent.from_teacher(tiny_teacher, head_blocks=1, inner_velocity=inner_velocity, transition_target=target)
    loaded = TMDStudent.from_pretrained(export_student(student, tmp_path / "student"))
    assert (loaded.inner_velocity, loaded.transition_target) == (inner_velocity, target)
