"""Each baseline's defining equations, held exactly: networks with known outputs (linear in x, t and the
condition) replace the teacher, student and fake score, and a loss, a gradient or a sampler is checked
against the paper's (or its official code's) formula computed by hand."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tmd import flow
from tmd.config import RunConfig, TrainConfig, register_data_config, register_method_config
from tmd.data.source import GeneratorDataSource
from tmd.methods import get_method
from tmd.methods.mdt_dist import normalised_tangent
from tmd.methods.meanflow import sample_mean_flow
from tmd.methods.phased_dmd import PerPhase, interval_noising, interval_target, sample_phased
from tmd.methods.tdm import tdm_generator_loss
from tmd.rng import BatchRandom
from tmd.train.loop import Trainer
from tmd.train.update import EMA, UpdateStep

B, D = 6, 3


class Linear(nn.Module):
    """``v(x, t, c) = a x + b t + c`` with trainable a, b; records every call (inputs and output)."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a)), nn.Parameter(torch.tensor(b))
        self.calls = []

    def velocity(self, x_t, t, cond):
        out = self.a * x_t + self.b * flow.expand_time(torch.as_tensor(t, dtype=x_t.dtype), x_t) + cond
        if out.requires_grad:
            out.retain_grad()
        self.calls.append((x_t.detach().clone(), torch.as_tensor(t).detach().clone(), cond, out))
        return out


def x0(model: Linear, x_t, t, cond):
    with torch.no_grad():
        return x_t - flow.expand_time(t, x_t) * (model.a * x_t + model.b * flow.expand_time(t, x_t) + cond)


def batch(seed=0, n=B):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, D, generator=g),
        "cond": torch.randn(n, D, generator=g),
        "neg_cond": torch.randn(n, D, generator=g),
    }


def seeded(method, seed=0):
    method.rng = BatchRandom(torch.Generator().manual_seed(seed))
    return method


def euler(models, x, grid, cond=None):
    """Deterministic Euler steps ``x - (t - t') v(x, t)``, model i taking step i."""
    cond = torch.zeros_like(x) if cond is None else cond
    for i, model in enumerate(models):
        with torch.no_grad():
            x = x - (grid[i] - grid[i + 1]) * model.velocity(x, grid[i], cond)
    return x


# -- the trainer's hooks ---------------------------------------------------------------------------


@dataclass
class _NoOptions:
    pass


register_method_config("baseline_equations", _NoOptions)
register_data_config("baseline_equations", _NoOptions)


def test_trainer_applies_a_methods_own_optimizer_settings(tmp_path):
    """TDM's fake score at 5x the generator's lr with AdamW betas (0, 0.95) for both; train.lr_groups wins."""
    method = get_method("tdm")(get_method("tdm").Config(guidance=1.0), Linear(0.5, 1.0), Linear(0.4, 1.0), Linear(0.3, 1.0))
    data = GeneratorDataSource(lambda i, g: batch(), seed=0)

    def optimizers(run, **train):
        cfg = RunConfig(
            "baseline_equations",
            "baseline_equations",
            train=TrainConfig(lr=1e-3, out_dir=str(tmp_path / run), progress=False, tensorboard=False, **train),
        )
        return {name: opt.param_groups[0] for name, opt in Trainer(method, data, cfg).optimizers.items()}

    groups = optimizers("a")
    assert groups["generator"]["lr"] == 1e-3 and groups["fake_score"]["lr"] == pytest.approx(5e-3)
    assert groups["generator"]["betas"] == groups["fake_score"]["betas"] == (0.0, 0.95)
    assert optimizers("b", lr_groups={"fake_score": 2e-4})["fake_score"]["lr"] == 2e-4


def test_ema_of_a_frozen_parameter_is_the_parameter():
    model = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    ema = EMA(model, 0.9)
    model[0].requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    state = model.state_dict()
    torch.testing.assert_close(ema.shadow["0.weight"], state["0.weight"])
    torch.testing.assert_close(ema.shadow["1.weight"], state["1.weight"] - 0.9)


# -- samplers: deterministic Euler on the outer grid, outer_shift honoured --------------------------


@pytest.mark.parametrize("name", ["decoupled_dmd", "tdm", "mdt_dist"])
def test_samplers_are_deterministic_euler_on_the_shifted_grid(name):
    model, x = Linear(0.5, 1.0), torch.randn(B, D)
    grid = flow.outer_grid(2, 3.0).float()
    sample = get_method(name).sample
    a = sample(model, x, torch.zeros_like(x), 2, torch.Generator().manual_seed(0), outer_shift=3.0)
    b = sample(model, x, torch.zeros_like(x), 2, torch.Generator().manual_seed(1), outer_shift=3.0)
    torch.testing.assert_close(a, euler([model, model], x, grid))
    torch.testing.assert_close(a, b)


def test_phased_dmd_samples_each_expert_with_one_euler_step():
    experts, x = nn.ModuleList([Linear(0.5, 1.0), Linear(-0.3, 2.0)]), torch.randn(B, D)
    expected = euler(experts, x, flow.outer_grid(2, 3.0).float())
    torch.testing.assert_close(get_method("phased_dmd").sample(experts, x, torch.zeros_like(x), 2, outer_shift=3.0), expected)
    torch.testing.assert_close(sample_phased(experts, x, torch.zeros_like(x), torch.Generator().manual_seed(5), 3.0), expected)


def test_meanflow_sampler_honours_outer_shift():
    class Known(nn.Module):  # u(z, r, t) = z + t - r
        def backbone(self, z, t, cond):
            return None

        def head(self, z, t, r, features):
            return z + t - r

    x, grid = torch.randn(B, D), flow.outer_grid(2, 3.0).float()
    z = x
    for t, r in zip(grid[:-1], grid[1:]):
        z = z - (t - r) * (z + t - r)
    torch.testing.assert_close(get_method("meanflow").sample(Known(), x, None, 2, outer_shift=3.0), z)
    # what the study and evaluation during training sample: the method's own sampler, with the config's shift
    meanflow = get_method("meanflow")
    scored = meanflow.sampler(meanflow.Config(outer_shift=3.0), Known(), 2, None, 0, 1.0, 1.0)
    torch.testing.assert_close(scored(x, None, None), z)
    torch.testing.assert_close(sample_mean_flow(Known(), x, None, 2, 3.0), z)


def test_meanflow_regresses_u_on_v_minus_t_minus_r_times_its_derivative_along_v():
    """``||u(z, r, t) - sg(v - (t - r) du/dt)||^2`` with du/dt along the teacher's velocity: for the known
    ``u = 0.5 z + t + 2 r`` the derivative is ``0.5 v + 1`` (the finite difference is exact on it)."""

    class Known(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def backbone(self, z, t, cond):
            return None

        def head(self, z, t, r, features):
            self.calls.append((z, flow.expand_time(t, z), flow.expand_time(r, z)))
            return 0.5 * z + flow.expand_time(t, z) + 2 * flow.expand_time(r, z)

    student, teacher, data = Known(), Linear(0.5, 1.0), batch(n=64)
    method = seeded(get_method("meanflow")(get_method("meanflow").Config(guidance=1.0, adaptive_power=0.0), teacher, student))
    losses = []
    method.training_step(data, 0, lambda group, loss, terms=None: losses.append(loss))
    z, t, r = student.calls[0]
    assert bool((r < t).any()) and bool((r == t).any())  # both kinds of pair in one batch
    v = 0.5 * z + t + data["cond"]
    target = v - (t - r) * (0.5 * v + 1)
    torch.testing.assert_close(losses[0], (0.5 * z + t + 2 * r - target).pow(2).mean())


# -- Decoupled DMD ---------------------------------------------------------------------------------


def test_decoupled_dmd_is_one_proxy_loss_of_dm_at_any_time_plus_ca_below_the_input_time():
    """x_hat's gradient is ``-(DM + CA) / N`` (Alg. 1's proxy loss, lambda = 1): DM = x0_c - x0_fake at
    ``tau_DM ~ U(0, 1)``, CA = (w - 1)(x0_c - x0_u) at ``tau_CA`` between the input's time and data."""
    teacher, fake, n, w = Linear(0.5, 1.0), Linear(0.3, 2.0), 4000, 2.5
    method = seeded(
        get_method("decoupled_dmd")(
            get_method("decoupled_dmd").Config(guidance=w, outer_steps=2), teacher, Linear(0.5, 1.0), fake
        )
    )
    data = batch(n=n)
    method._input_time = torch.tensor(0.9)
    x_hat = torch.randn(n, D, requires_grad=True)
    method.generator_loss(x_hat, data)[0].backward()
    (x_ca, tau_ca, _, _), (x_dm, tau_dm, _, _) = teacher.calls
    x_ca, tau_ca = x_ca[:n], tau_ca[:n]
    ca = (w - 1) * (x0(teacher, x_ca, tau_ca, data["cond"]) - x0(teacher, x_ca, tau_ca, data["neg_cond"]))
    dm = x0(teacher, x_dm, tau_dm, data["cond"]) - x0(fake, x_dm, tau_dm, data["cond"])
    torch.testing.assert_close(x_hat.grad, -(dm + ca) / x_hat.numel())
    assert float(tau_dm.min()) < 0.01 and float(tau_dm.max()) > 0.99 and abs(float(tau_dm.mean()) - 0.5) < 0.02  # U(0, 1)
    assert float(tau_ca.max()) < 0.9 and float(tau_ca.min()) < 0.01 and float(tau_ca.max()) > 0.89


# -- Phased DMD ------------------------------------------------------------------------------------


def test_phased_dmd_subinterval_target_is_unbiased_and_eq13_weighted():
    """Eq. 11: regressed on ``x_t`` (the forward process from s), the target's conditional mean is the
    marginal's rectified-flow velocity, here that of Gaussian data ``N(0, sd^2)``; Eq. 13's weight is
    ``clamp(1 / b^2, 0, 10) b^2``."""
    g, n, sd, s, t = torch.Generator().manual_seed(0), 1_000_000, 0.7, 0.4, 0.75
    x_data = sd * torch.randn(n, 1, generator=g)
    x_s = flow.interpolate(x_data, torch.randn(n, 1, generator=g), s)
    eps = torch.randn(n, 1, generator=g)
    s_, t_ = torch.full((n,), s), torch.full((n,), t)
    x_t = interval_noising(x_s, s_, t_, eps)
    target = interval_target(x_s, s_, t_, eps, 10.0)[0]

    def slope(y):  # least squares through 0: E[y | x_t] is linear in x_t for Gaussian data
        return float((y * x_t).mean() / x_t.pow(2).mean())

    exact = (t - (1 - t) * sd**2) / ((1 - t) ** 2 * sd**2 + t**2)
    assert slope(target) == pytest.approx(exact, abs=0.01)
    assert abs(slope(eps - x_s) - exact) > 0.04  # the biased target of the paper's Fig. 2c (measured 0.063 off)

    def eq13(t):
        b2 = t**2 - ((1 - t) / (1 - s) * s) ** 2
        return min(1 / b2, 10.0) * b2

    for t_w in (t, s + 0.01):  # weight 1, then the clamp at 10 (b^2 < 0.1)
        weight = interval_target(x_s[:4], s_[:4], torch.full((4,), t_w), eps[:4], 10.0)[1]
        torch.testing.assert_close(weight, torch.full((4,), eq13(t_w)))


def test_phased_dmd_freezes_finished_experts_and_keeps_their_weights_in_the_export():
    cfg = get_method("phased_dmd").Config(guidance=1.0, phase_steps=2, generator_every=1)
    experts = nn.ModuleList([Linear(0.5, 1.0), Linear(0.5, 1.0)])
    method = seeded(get_method("phased_dmd")(cfg, Linear(0.5, 1.0), experts, PerPhase([Linear(0.5, 1.0), Linear(0.5, 1.0)])))
    ema = EMA(experts, 0.5)
    groups = method.parameter_groups()
    optimizers = {name: torch.optim.Adam(params, lr=0.1) for name, params in groups.items()}
    update = UpdateStep(optimizers, groups, emas={"generator": ema})

    for step in range(4):
        method.training_step(batch(step), step, update)
    assert not experts[0].a.requires_grad and experts[1].a.requires_grad
    assert float(experts[0].a.detach()) != 0.5 and float(experts[1].a.detach()) != 0.5  # both phases trained their expert
    assert ema.shadow["0.a"] == experts[0].a and ema.shadow["1.a"] != experts[1].a
    overrides = method.optimizer_overrides()
    assert overrides["fake_score"] == {"betas": (0.0, 0.999), "lr_scale": 0.008} and overrides["generator"] == {
        "betas": (0.0, 0.999)
    }


# -- TDM -------------------------------------------------------------------------------------------


def test_tdm_generator_loss_is_pseudo_huber_on_the_students_x0():
    """Its gradient on x0 is ``d / sqrt(d^2 + c^2) / scale / N``, ``d = -(DM + CA)``, ``scale =
    mean|x0 - x0_real^w|``: the target is ``x0 + (x0_c - x0_fake) + (w - 1)(x0_c - x0_u)``."""
    g = torch.Generator().manual_seed(0)
    x, real_c, real_u, fake = (torch.randn(B, D, generator=g) for _ in range(4))
    x = x.requires_grad_()
    w, c = 3.0, 0.05
    tdm_generator_loss(x, real_c, real_u, fake, w, c).backward()
    d = -((real_c - fake) + (w - 1) * (real_c - real_u))
    scale = (x.detach() - (real_c + (w - 1) * (real_c - real_u))).abs().mean(1, keepdim=True)
    torch.testing.assert_close(x.grad, d / (d**2 + c**2).sqrt() / scale / x.numel())
    x.grad = None
    tdm_generator_loss(x, real_c, real_u, fake, w, 0.0).backward()
    torch.testing.assert_close(x.grad, 2 * d / scale / x.numel())


def test_tdm_matches_each_samples_stage_inside_its_interval():
    """The stage is drawn per sample; the generator sample is the student's x0 at the stage's input
    (Euler rollout without gradients before it); ``tau`` lies in the stage's interval and ``x_tau`` is
    the student's own next point diffused there, ``(1 - tau) x0 + tau m`` with ``m`` the importance
    weight's noise."""
    student, n = Linear(0.5, 1.0), 64
    method = seeded(
        get_method("tdm")(get_method("tdm").Config(guidance=1.0, outer_steps=3), Linear(0.5, 1.0), student, Linear(0.4, 1.0))
    )
    grid = method.outer_grid("cpu")
    noise, cond = torch.randn(n, D), batch(n=n)["cond"]
    x_hat = method.x0_from_noise(batch(n=n), noise, 0)
    *rollout, (x_in, t_in, _, _) = student.calls
    assert len(rollout) == 2 and set(t_in.tolist()) == set(grid[:3].tolist())  # every stage, in one batch
    states = [noise, euler([student], noise, grid[:2], cond), euler([student, student], noise, grid[:3], cond)]
    stage = (t_in[:, None] == grid[None, :3]).float().argmax(1)
    torch.testing.assert_close(x_in, torch.stack(states)[stage, torch.arange(n)])
    torch.testing.assert_close(x_hat, x0(student, x_in, t_in, cond))
    tau, x_tau, _, m = method._diffused(x_hat.detach())
    assert bool(((tau > grid[stage + 1]) & (tau < t_in)).all())
    torch.testing.assert_close(x_tau, flow.interpolate(x_hat.detach(), m, tau))


# -- MDT-dist --------------------------------------------------------------------------------------


def test_mdt_dist_vm_and_vd_share_t_and_noise_and_vd_pushes_the_one_step_sample_by_the_velocity_gap():
    teacher, student = Linear(0.5, 1.0), Linear(0.3, 2.0)
    cfg = get_method("mdt_dist").Config(guidance=2.0)
    method = seeded(get_method("mdt_dist")(cfg, teacher, student))
    data = batch()
    losses = {}
    method.training_step(data, 0, lambda group, loss, terms: (losses.update(terms), loss.backward()))
    vm, _, vd_input, vd, _ = student.calls  # VM at x_t, its difference, the one-step sample, VD at x'_t, its difference
    (x_t, t, _, phi), (z, t_max, _, phi_z), (x_fake_t, _, _, _) = vm, vd_input, vd
    assert float(t_max) == pytest.approx(flow.T_MAX)
    x_fake = z - flow.T_MAX * phi_z.detach()
    noise_vm = (x_t - flow.expand_time(1 - t, x_t) * data["x"]) / flow.expand_time(t, x_t)
    torch.testing.assert_close(x_fake_t, flow.interpolate(x_fake, noise_vm, t))

    def target(x, phi_x):
        v = teacher.velocity(x, t, data["cond"]).detach() * 2.0 - teacher.velocity(x, t, data["neg_cond"]).detach()
        d = (phi_x - (0.3 * (x - 0.01 * v) + 2.0 * flow.expand_time(t - 0.01, x) + data["cond"])) / 0.01
        return v - flow.expand_time(t, x) * d / (d.flatten(1).norm(dim=1, keepdim=True) + 0.1)

    with torch.no_grad():
        torch.testing.assert_close(losses["vm"].detach(), (phi - target(x_t, phi)).pow(2).mean())
        phi_fake = 0.3 * x_fake_t + 2.0 * flow.expand_time(t, x_fake_t) + data["cond"]
        gap = phi_fake - target(x_fake_t, phi_fake)
    torch.testing.assert_close(phi_z.grad, 2 * gap / gap.numel())


def test_mdt_dist_trains_its_student_at_a_tenth_of_the_shared_lr():
    mdt = get_method("mdt_dist")(get_method("mdt_dist").Config(), Linear(0.5, 1.0), Linear(0.3, 2.0))
    assert mdt.optimizer_overrides() == {"student": {"lr_scale": 0.1}}
    assert get_method("mdt_dist").Config(lr_scale=1.0).lr_scale == 1.0
    with pytest.raises(ValueError, match="lr_scale"):
        get_method("mdt_dist").Config(lr_scale=0.0)


def test_mdt_dist_normalises_the_derivative_over_each_samples_whole_tensor():
    d = torch.randn(4, 2, 3, 5)
    norms = d.flatten(1).norm(dim=1).reshape(4, 1, 1, 1)
    torch.testing.assert_close(normalised_tangent(d, 0.1), d / (norms + 0.1))
