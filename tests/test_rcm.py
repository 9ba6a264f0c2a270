"""rCM's defining equations, held with networks whose outputs and derivatives are known in closed form, and
its student on the closed-form mixture world (docs/methods.md, "rCM")."""

import copy
import math

import pytest
import torch
from closed_form import TEACHER, distance, fit_teacher_copy, train
from torch import nn

from tmd import flow
from tmd.methods import get_method
from tmd.methods.rcm import (
    normalised,
    rcm_sample_times,
    rf_time,
    scm_tangent,
    scm_target,
    trig_time,
    trigflow_f,
    velocity_from_f,
    wrapped_f,
)
from tmd.rng import BatchRandom

B, D = 6, 3
DOUBLE = torch.float64


class Known(nn.Module):
    """``v(x, t, c) = a x + b sin(3t) + c``: its derivative along a tangent ``(u, 1)`` is ``a u + 3 b cos(3t)``."""

    def __init__(self, a: float, b: float, dtype=DOUBLE):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a, dtype=dtype)), nn.Parameter(torch.tensor(b, dtype=dtype))

    def velocity(self, x_t, t, cond):
        t = flow.expand_time(torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device), x_t)
        return self.a * x_t + self.b * torch.sin(3 * t) + cond

    def derivative(self, u, t):
        return self.a * u + 3 * self.b * torch.cos(3 * flow.expand_time(t, u))


def trig(t):
    """cos s, sin s of s = arctan(t / (1 - t)) from the scalar formulas (the code's, not ours)."""
    s = torch.tensor([math.atan(float(v) / (1 - float(v))) for v in t], dtype=DOUBLE)[:, None]
    return torch.cos(s), torch.sin(s)


def exact_tangent(model: Known, x, t, cond, v_teacher):
    """``t (1 - t) dF/dt`` along ``dx/dt = v_T`` for ``F = ((1 - 2t) / N) x + N v``, differentiated by hand."""
    T = t[:, None]
    n = (T**2 + (1 - T) ** 2).sqrt()
    dn = (2 * T - 1) / n
    d_coeff = -2 / n + (1 - 2 * T) ** 2 / n**3  # d/dt of (1 - 2t) / N
    df = d_coeff * x + (1 - 2 * T) / n * v_teacher + dn * model.velocity(x, t, cond) + n * model.derivative(v_teacher, t)
    return T * (1 - T) * df


def inputs(seed=0, low=0.1, high=0.9):
    g = torch.Generator().manual_seed(seed)
    x, cond, v = (torch.randn(B, D, generator=g, dtype=DOUBLE) for _ in range(3))
    return x, cond, v, low + (high - low) * torch.rand(B, generator=g, dtype=DOUBLE)


# -- TrigFlow <-> rectified flow -------------------------------------------------------------------


def test_trigflow_conversion_of_a_velocity_and_back():
    """With the true velocity ``eps - x``, F is TrigFlow's ``dz/ds = cos s eps - sin s x`` at ``z = cos s x + sin s eps``
    (``z = x_t / N = (cos s + sin s) x_t``), the code's EDM wrapper (c_skip, c_out, c_in, c_noise) gives our x0, and F maps back to v."""
    x, eps, _, t = inputs()
    cos, sin = trig(t)
    x_t = flow.interpolate(x, eps, t)
    z = cos * x + sin * eps
    torch.testing.assert_close(z / (cos + sin), x_t)
    f = trigflow_f(x_t, eps - x, t)
    torch.testing.assert_close(f, cos * eps - sin * x)
    v_net = torch.randn(B, D, dtype=DOUBLE)
    c_skip, c_out, c_in, c_noise = 1 / (cos + sin), -sin / (cos + sin), 1 / (cos + sin), sin / (cos + sin)
    torch.testing.assert_close(c_in * z, x_t)
    torch.testing.assert_close(c_noise[:, 0], t)
    x0 = c_skip * z + c_out * v_net
    torch.testing.assert_close(x0, flow.x0_from_velocity(x_t, v_net, t))
    torch.testing.assert_close(trigflow_f(x_t, v_net, t), (cos * z - x0) / sin)
    torch.testing.assert_close(velocity_from_f(x_t, trigflow_f(x_t, v_net, t), t), v_net)
    torch.testing.assert_close(rf_time(trig_time(t)), t)
    torch.testing.assert_close(trig_time(torch.tensor([1.0], dtype=DOUBLE)), torch.tensor([math.pi / 2], dtype=DOUBLE))


# -- the sCM tangent and target --------------------------------------------------------------------


def test_jvp_tangent_is_the_exact_derivative():
    model, (x, cond, v, t) = Known(0.7, 0.4), inputs()
    torch.testing.assert_close(scm_tangent(model, x, t, cond, v, "jvp"), exact_tangent(model, x, t, cond, v))


@pytest.mark.parametrize("delta", [5e-3, 2e-2])
def test_finite_difference_tangent_within_its_truncation_error(delta):
    """Central differences err by ``delta^2 / 6 max|d^3F/dt^3|``; here ``|d^3F/dt^3| < 100`` on t in [0.1, 0.9]
    (the 27 b cos(3t) of the network and the N(t) factors on |x|, |v| < 4), so ``20 delta^2`` bounds it."""
    model, (x, cond, v, t) = Known(0.7, 0.4), inputs()
    error = (scm_tangent(model, x, t, cond, v, "finite_difference", delta) - exact_tangent(model, x, t, cond, v)).abs().max()
    assert error < 20 * delta**2, float(error)
    assert error > 0  # a difference, not the exact derivative


def test_finite_difference_is_one_sided_at_the_ends():
    """At t within delta of 0 or 1 the difference stays inside [0, 1]: first-order error ``delta / 2 max|F''|``."""
    model, (x, cond, v, _) = Known(0.7, 0.4), inputs()
    t = torch.tensor([0.0, 1e-3, 0.5, 0.999, 1.0, 1.0], dtype=DOUBLE)
    error = (scm_tangent(model, x, t, cond, v, "finite_difference", 5e-3) - exact_tangent(model, x, t, cond, v)).abs().max()
    assert error < 0.05, float(error)


def test_jvp_runs_through_a_wan_transformer_and_agrees_with_the_difference(tiny_teacher, tiny_inputs):
    """The exact JVP through Wan (the unfused attention kernel: fused SDPA has no forward-mode derivative) and the
    central difference agree. A random Wan's sinusoidal time embedding (frequencies up to one radian per timestep,
    1000 t) is only resolved by a step well below a timestep: delta = 1e-4, where float32 rounding over 2 delta
    (measured 0.13% of the largest entry) bounds the gap; 2% leaves room for other CPUs' kernels."""
    x, text, _ = tiny_inputs
    t = torch.tensor([0.3, 0.8])
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    jvp = scm_tangent(tiny_teacher, x, t, text, v, "jvp")
    difference = scm_tangent(tiny_teacher, x, t, text, v, "finite_difference", 1e-4)
    assert jvp.isfinite().all()
    assert (jvp - difference).abs().max() < 2e-2 * jvp.abs().max(), float((jvp - difference).abs().max())


def test_scm_target_is_the_code_formula_and_its_rf_form():
    """``g = -cos s sqrt(1 - r^2 sin^2 s) (F_theta - F_T) - (r cos s sin s z + tau)``; at r = 1 it is
    ``(1 - t) N (v_T - v_theta - t (d/dt + v_T . grad) v_theta)`` in RF terms."""
    model, (x, cond, v_teacher, t) = Known(0.7, 0.4), inputs()
    cos, sin = trig(t)
    f_student, f_teacher = wrapped_f(model, x, t, cond).detach(), trigflow_f(x, v_teacher, t)
    tau = exact_tangent(model, x, t, cond, v_teacher).detach()
    z = x * (cos + sin)
    for r in (0.0, 0.3, 1.0):
        expected = -cos * (1 - r**2 * sin**2).sqrt() * (f_student - f_teacher) - (r * cos * sin * z + tau)
        torch.testing.assert_close(scm_target(f_student, f_teacher, tau, x, t, r), expected)
    T, n = t[:, None], (t[:, None] ** 2 + (1 - t[:, None]) ** 2).sqrt()
    with torch.no_grad():
        rf = (1 - T) * n * (v_teacher - model.velocity(x, t, cond) - T * model.derivative(v_teacher, t))
    torch.testing.assert_close(scm_target(f_student, f_teacher, tau, x, t, 1.0), rf)


def test_tangent_normalisation():
    g = torch.zeros(3, 2, 4, dtype=DOUBLE)
    g[0, 0, 0], g[1] = 3.0, 0.5  # norms 3 and 0.5 * sqrt(8); the third all zero
    out = normalised(g, 0.1)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(3.0 / 3.1, dtype=DOUBLE))
    torch.testing.assert_close(out[1], torch.full((2, 4), 0.5 / (0.5 * 8**0.5 + 0.1), dtype=DOUBLE))
    assert out[2].abs().sum() == 0


def method(seed=0, **options):
    cfg = get_method("rcm").Config(guidance=2.0, **options)
    m = get_method("rcm")(cfg, Known(0.5, 0.3, torch.float32), Known(0.4, 0.2, torch.float32), Known(0.3, 0.1, torch.float32))
    m.rng = BatchRandom(torch.Generator().manual_seed(seed))
    return m


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(B, D, generator=g) for name in ("x", "cond", "neg_cond")}


def test_scm_loss_and_its_gradient():
    """The loss is ``100 mean ||F - sg F - g_hat||^2`` with the draws ``t = sigmoid(1.6 n + 0.7)`` then the noise;
    its gradient on the student's ``a`` is ``-200 / (B D) sum g_hat dF/da``, ``dF/da = N x_t``."""
    m, data, step = method(tangent="jvp", tangent_warmup=10), batch(), 4
    loss, _ = m.scm_loss(data, step)
    loss.backward()
    g = torch.Generator().manual_seed(0)
    t = torch.sigmoid(torch.randn(B, generator=g) * 1.6 + 0.7)
    x_t = flow.interpolate(data["x"], torch.randn(B, D, generator=g), t).double()
    t, cond = t.double(), data["cond"].double()
    teacher, student = Known(0.5, 0.3), Known(0.4, 0.2)
    v_teacher = teacher.velocity(x_t, t, data["neg_cond"].double()) + 2.0 * (
        teacher.velocity(x_t, t, cond) - teacher.velocity(x_t, t, data["neg_cond"].double())
    )
    with torch.no_grad():
        f_student = trigflow_f(x_t, student.velocity(x_t, t, cond), t)
        tau = exact_tangent(student, x_t, t, cond, v_teacher)
    cos, sin = trig(t)
    r = step / 10
    target = -cos * (1 - r**2 * sin**2).sqrt() * (f_student - trigflow_f(x_t, v_teacher, t)) - (
        r * cos * sin * x_t * (cos + sin) + tau
    )
    g_hat = target / (target.norm(dim=1, keepdim=True) + 0.1)
    torch.testing.assert_close(loss.double(), 100 * g_hat.pow(2).mean(), rtol=1e-5, atol=0)
    n = (t[:, None] ** 2 + (1 - t[:, None]) ** 2).sqrt()
    expected = -200 / (B * D) * (g_hat * n * x_t).sum()
    torch.testing.assert_close(m.student.a.grad.double(), expected, rtol=1e-5, atol=0)


def test_scm_needs_data_latents():
    data = {"cond": torch.randn(B, D), "neg_cond": torch.randn(B, D), "latent_shape": torch.tensor([D]).expand(B, 1)}
    with pytest.raises(ValueError, match="lacks"):
        method().training_step(data, 0, lambda *a, **k: None)


# -- schedule, rollout, fake score -----------------------------------------------------------------


def test_update_schedule_and_rollout_lengths():
    """H iterations of sCM alone, then the student (sCM + DMD) every 5th iteration and the fake score between;
    rollout lengths cycle 1..4 with the student's and the fake score's own update counts."""
    m = method(tangent_warmup=3)
    lengths = []
    m.rollout = lambda cond, shape, steps, gradients: lengths.append((steps, gradients)) or torch.randn(shape)
    calls = []

    def update(group, loss, terms=None):
        calls.append((group, sorted(terms or {})))

    for step in range(14):
        m.training_step(batch(step), step, update)
    student = ("generator", ["dmd", "scm"])
    fake = ("fake_score", [])
    assert calls == [("generator", ["scm"])] * 3 + [student] + [fake] * 4 + [student] + [fake] * 4 + [student]
    # the student updates at steps 3, 8, 13 are its 3rd, 4th, 5th (0-based); the fake score's 0th..7th between
    assert lengths == [(4, True), (1, False), (2, False), (3, False), (4, False), (1, True)] + [
        (k % 4 + 1, False) for k in range(4, 8)
    ] + [(2, True)]


def test_rollout_renoises_at_non_increasing_times_with_gradients_through_the_last_step():
    m = method()
    calls = []
    velocity = m.student.velocity

    def recorded(x_t, t, cond):
        out = velocity(x_t, t, cond)
        calls.append((x_t.detach(), torch.as_tensor(t).detach(), out))
        return out

    m.student.velocity = recorded
    x0 = m.rollout(torch.zeros(B, D), (B, D), 4, gradients=True)
    times = [t for _, t, _ in calls]
    torch.testing.assert_close(times[0], torch.ones(B))
    assert all(bool((b <= a).all()) for a, b in zip(times, times[1:]))
    assert [out.requires_grad for _, _, out in calls] == [False, False, False, True]
    torch.testing.assert_close(x0, flow.x0_from_velocity(calls[-1][0], calls[-1][2], times[-1]))
    # each input is the previous x0 re-noised with fresh noise at the next time: noise = (x_t - (1 - t) x0) / t
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        torch.rand(B, generator=g)  # the three p_D draws come first
    torch.testing.assert_close(calls[0][0], torch.randn(B, D, generator=g))
    for (x_prev, t_prev, v_prev), (x_next, t_next, _) in zip(calls, calls[1:]):
        x0_prev = flow.x0_from_velocity(x_prev, v_prev.detach(), t_prev)
        torch.testing.assert_close(x_next, flow.interpolate(x0_prev, torch.randn(B, D, generator=g), t_next))


def test_fake_score_loss_is_the_codes_x0_loss_over_sin_squared():
    """``||x0 - x0_fake||^2 / sin^2 s`` with ``x0_fake = x_t - t v_fake`` is ``N^2 ||v_fake - (eps - x0)||^2``."""
    m, x_fake, cond = method(), torch.randn(B, D), torch.randn(B, D)
    losses = {}
    m.critic_losses(x_fake, {"cond": cond}, lambda group, loss, terms=None: losses.update({group: loss}))
    g = torch.Generator().manual_seed(0)
    t = flow.shift(0.001 + 0.998 * torch.rand(B, generator=g), 5.0)
    eps = torch.randn(B, D, generator=g)
    x_t = flow.interpolate(x_fake, eps, t)
    x0_fake = flow.x0_from_velocity(x_t, m.fake_score.velocity(x_t, t, cond), t)
    _, sin = trig(t)
    expected = ((x_fake - x0_fake) ** 2 / sin.float() ** 2).mean()
    torch.testing.assert_close(losses["fake_score"], expected.detach(), rtol=1e-5, atol=0)


# -- sampler ---------------------------------------------------------------------------------------


def test_sample_times_are_the_codes():
    """TrigFlow [arctan 80, 1.5, 1.4, 1.0] in RF time: 0.98765, 0.93378, 0.85290, 0.60898."""
    torch.testing.assert_close(
        rcm_sample_times(4), torch.tensor([80 / 81, 0.933781, 0.852895, 0.608979, 0.0], dtype=DOUBLE), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(rcm_sample_times(2), rcm_sample_times(4)[[0, 1, 4]])
    with pytest.raises(ValueError, match="1 to 4 steps"):
        rcm_sample_times(5)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_steps_exactly(steps):
    """From ``x = t_0 noise``: ``x0 = x - t v(x, t)``, then ``x <- (1 - t') x0 + t' eps_fresh``; the last x0 returned."""
    model, noise, cond = Known(0.5, 0.3, torch.float32), torch.randn(B, D), torch.randn(B, D)
    out = get_method("rcm").sample(model, noise, cond, steps, torch.Generator().manual_seed(3))
    times = rcm_sample_times(steps).float()
    g = torch.Generator().manual_seed(3)
    x = times[0] * noise
    with torch.no_grad():
        for t, t_next in zip(times[:-1], times[1:]):
            x0 = x - t * model.velocity(x, t.expand(B), cond)
            x = x0 if t_next == 0 else (1 - t_next) * x0 + t_next * torch.randn(B, D, generator=g)
    torch.testing.assert_close(out, x)
    cfg = get_method("rcm").Config()
    sampled = get_method("rcm").sampler(cfg, model, steps, None, 3, 1.0, 5.0)(noise, cond, None)
    torch.testing.assert_close(sampled, out)


# -- the mixture world ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_velocity():
    return fit_teacher_copy()


@pytest.mark.parametrize("steps", [1, 2])
def test_rcm_improves_the_few_step_student(fitted_velocity, steps):
    generator = copy.deepcopy(fitted_velocity)
    cfg = get_method("rcm").Config(guidance=1.0, tangent_warmup=50)
    m = get_method("rcm")(cfg, TEACHER, generator, copy.deepcopy(fitted_velocity))

    def sample(noise, cond, g):
        return get_method("rcm").sample(generator, noise, cond, steps, g)

    before = distance(sample)
    train(m, steps=300)
    after = distance(sample)
    print(f"SW {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before, (before, after)


def test_shipped_wan_config_has_the_papers_hyperparameters(tmp_path):
    from tmd.config import RunConfig, load_config

    cfg = load_config(RunConfig, "wan1.3b_rcm.yaml", [f"data.path={tmp_path}"])
    m, tc = cfg.method, cfg.train
    assert cfg.method_name == "rcm" and (m.guidance, m.scm_weight, m.dmd_weight, m.tangent_warmup) == (5.0, 100.0, 1.0, 1000)
    assert (m.logit_mean, m.logit_std, m.tau_shift, m.generator_every, m.max_rollout_steps) == (0.7, 1.6, 5.0, 5, 4)
    assert tc.lr * m.fake_score_lr_scale == pytest.approx(4e-7) and tuple(m.adam_betas) == (0.0, 0.999)
    assert (tc.lr, tc.batch_size, tc.steps, tc.warmup_steps, tc.grad_clip) == (2e-6, 256, 10000, 100, None)
