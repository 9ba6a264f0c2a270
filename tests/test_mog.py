import pytest
import torch
from mog import AnalyticTeacher, MixtureWorld, MLPTransition, MLPVelocity, fit_velocity

from tmd import flow
from tmd.eval.sliced import sliced_wasserstein
from tmd.models.protocol import TransitionModel, VelocityModel
from tmd.sampling import guided_velocity, sample_few_step, sample_teacher, sample_tmd


@pytest.fixture(scope="module")
def world():
    return MixtureWorld()


@pytest.fixture(scope="module")
def teacher(world):
    return AnalyticTeacher(world)


@pytest.fixture(scope="module")
def fitted(world, teacher):
    torch.manual_seed(0)
    return fit_velocity(MLPVelocity(world.dim, world.cond_dim, width=64, depth=2), world, teacher, steps=300)


def sw(a, b):
    return sliced_wasserstein(a, b, rng=torch.Generator().manual_seed(1))


def test_world_conditions_and_sampling(world):
    g = torch.Generator().manual_seed(0)
    x, cond = world.sample(6, torch.tensor([0, 1, 2, 3, 4, 4]), generator=g)
    assert x.shape == (6, 2) and x.dtype == torch.float32
    assert torch.equal(cond.argmax(1), torch.tensor([0, 1, 2, 3, 4, 4]))
    assert torch.equal(world.neg_cond(), world.null_cond(1)) and world.neg_cond()[0, world.null_label] == 1
    x2, _ = world.sample(6, torch.tensor([0, 1, 2, 3, 4, 4]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="labels"):
        world.labels_to_cond(torch.tensor([5]))
    # the null condition's density is the class-probability-weighted mixture of the class densities
    y = torch.randn(5, 2)
    per_class = torch.stack([world.log_prob(y, world.labels_to_cond(torch.full((5,), k))) for k in range(4)], 1)
    assert torch.allclose(world.log_prob(y, world.null_cond(5)), (per_class + world.class_probs.log()).logsumexp(1))


@pytest.mark.parametrize("dim,label", [(2, 0), (2, 4), (3, 1), (3, 4)])
def test_analytic_velocity_matches_monte_carlo(dim, label):
    """Self-normalised importance sampling of E[x0 | x_t] with data samples as proposals."""
    world = MixtureWorld(dim=dim, seed=dim)
    teacher = AnalyticTeacher(world)
    g = torch.Generator().manual_seed(dim)
    x0, _ = world.sample(100_000, label, generator=g)
    x0 = x0.double()
    points, cond = world.sample(3, label, generator=g)
    for t in (0.3, 0.6, 0.9):
        x_t = flow.interpolate(points.double(), torch.randn(points.shape, generator=g, dtype=torch.float64), t)
        v = teacher.velocity(x_t, torch.full((3,), t), cond)
        assert v.dtype == torch.float64
        for i in range(3):
            w = (-((x_t[i] - (1 - t) * x0) ** 2).sum(1) / (2 * t * t)).softmax(0)
            mean = w @ x0
            ess = 1 / (w**2).sum()
            stderr = ((w @ (x0 - mean) ** 2) / ess).sqrt() / t
            assert ess > 500
            assert torch.all((v[i] - (x_t[i] - mean) / t).abs() < 5 * stderr + 1e-3), (t, i)


def test_analytic_velocity_at_the_ends(world, teacher):
    x = torch.randn(8, 2)
    cond = world.labels_to_cond(torch.arange(8) % 5)
    assert torch.allclose(teacher.velocity(x, 0.0, cond), -x)  # E[x1 | x0] = 0
    for t in (1e-6, 1.0):
        assert torch.isfinite(teacher.velocity(x, t, cond)).all()


def test_euler_sampling_of_the_teacher_reproduces_the_classes(world, teacher):
    g = torch.Generator().manual_seed(0)
    n = 4000
    for label in (0, world.null_label):
        ref, cond = world.sample(n, label, generator=g)
        ref2, _ = world.sample(n, label, generator=g)
        noise = torch.randn(n, 2, generator=g)
        x = sample_teacher(teacher, noise, cond, steps=100, guidance=1.0, shift=1.0)
        floor = sw(ref2, ref)  # two-sample noise of the metric itself (mode counts fluctuate)
        assert sw(x, ref) < 1.5 * floor + 0.02
        assert sw(x, ref) < 0.4 * sw(noise, ref)
        # a sharper check of the shape within modes: mean log-likelihood under the true density
        lp_x, lp_ref = world.log_prob(x, cond), world.log_prob(ref, cond)
        stderr = (lp_x.var() / n + lp_ref.var() / n).sqrt()
        assert (lp_x.mean() - lp_ref.mean()).abs() < 4 * stderr


def test_cfg_velocity_and_sampling(world, teacher):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % world.num_classes
    cond = world.labels_to_cond(labels)
    x_t = torch.randn(400, 2, generator=g)
    v = guided_velocity(teacher, x_t, 0.5, cond, world.null_cond(400), 4.0)
    expected = flow.cfg(teacher.velocity(x_t, 0.5, world.null_cond(400)), teacher.velocity(x_t, 0.5, cond), 4.0)
    assert torch.isfinite(v).all() and torch.allclose(v, expected, atol=1e-6)

    def class_log_posterior(x):
        joint = torch.stack([world.log_prob(x, world.labels_to_cond(torch.full((len(x),), k))) for k in range(4)], 1)
        return joint.log_softmax(1).gather(1, labels[:, None]).mean()

    plain = sample_teacher(teacher, x_t, cond, world.neg_cond(), steps=30, guidance=1.0, shift=1.0)
    guided = sample_teacher(teacher, x_t, cond, world.neg_cond(), steps=30, guidance=4.0, shift=1.0)
    assert torch.isfinite(guided).all()
    assert class_log_posterior(guided) > class_log_posterior(plain)


def test_mlp_shapes_and_protocols(world):
    torch.manual_seed(0)
    model = MLPVelocity(2, world.cond_dim, width=32, depth=2)
    student = MLPTransition(2, world.cond_dim, width=32, backbone_depth=2, head_depth=1)
    x, cond = world.sample(5, generator=torch.Generator().manual_seed(0))
    assert isinstance(model, VelocityModel) and isinstance(student, TransitionModel)
    assert not isinstance(student, VelocityModel)
    assert model.velocity(x, 0.3, cond).shape == (5, 2)
    assert torch.allclose(model.velocity(x, 0.3, cond), model.velocity(x, torch.full((5,), 0.3), cond))
    features = student.backbone(x, torch.rand(5), cond)
    assert features.shape == (5, 32)
    assert student.head(torch.randn(5, 2), 0.7, 0.2, features).shape == (5, 2)
    with pytest.raises(ValueError, match="inner state"):
        student.head(torch.randn(4, 2), 0.7, 0.2, features)
    with pytest.raises(ValueError, match="x_t"):
        model.velocity(torch.randn(5, 3), 0.3, cond)


def test_student_from_velocity_model_starts_as_the_teacher(world, fitted):
    student = MLPTransition.from_velocity_model(fitted, head_depth=1)
    assert (student.backbone_depth, len(student.blocks)) == (1, 2)
    g = torch.Generator().manual_seed(0)
    x, cond = world.sample(16, generator=g)
    t = torch.rand(16, generator=g)
    features = student.backbone(x, t, cond)
    y_hat = student.head(torch.randn(16, 2, generator=g), t, t * torch.rand(16, generator=g), features)
    assert torch.allclose(y_hat, fitted.velocity(x, t, cond), atol=1e-5)
    with pytest.raises(ValueError, match="head_depth"):
        MLPTransition.from_velocity_model(fitted, head_depth=2)


def test_samplers_run_on_mlps_with_seeded_determinism(world):
    torch.manual_seed(0)
    model = MLPVelocity(2, world.cond_dim, width=32, depth=2)
    student = MLPTransition(2, world.cond_dim, width=32, backbone_depth=2, head_depth=1)
    torch.nn.init.normal_(student.fusion.weight)  # make the head depend on its inner noise
    noise, cond = torch.randn(64, 2), world.labels_to_cond(torch.arange(64) % 5)

    def tmd(seed):
        return sample_tmd(student, noise, cond, outer_steps=2, inner_steps=3, rng=torch.Generator().manual_seed(seed))

    def renoised(seed):
        return sample_few_step(model, noise, cond, 2, torch.Generator().manual_seed(seed), multistep="renoise")

    for sampler in (tmd, renoised):
        a = sampler(0)
        assert a.shape == (64, 2) and torch.isfinite(a).all()
        assert torch.equal(a, sampler(0)) and not torch.allclose(a, sampler(1))
    # DMD2-v's deterministic sampler (Eq. 18) ignores the seed
    assert torch.equal(
        sample_few_step(model, noise, cond, 2, torch.Generator().manual_seed(0)), sample_few_step(model, noise, cond, 2)
    )


def test_fit_velocity_moves_samples_to_the_data(world, teacher, fitted):
    g = torch.Generator().manual_seed(3)
    ref, cond = world.sample(2000, generator=g)
    noise = torch.randn(2000, 2, generator=g)
    torch.manual_seed(0)
    untrained = MLPVelocity(2, world.cond_dim, width=64, depth=2)
    torch.manual_seed(0)
    by_flow_matching = fit_velocity(MLPVelocity(2, world.cond_dim, width=64, depth=2), world, steps=200, seed=1)

    def many_step(model):
        return sample_teacher(model, noise, cond, steps=20, guidance=1.0)

    before = sw(many_step(untrained), ref)
    assert sw(many_step(fitted), ref) < min(0.25 * before, 0.15)
    assert sw(many_step(by_flow_matching), ref) < min(0.3 * before, 0.2)
    # one step of a flow model lands on the posterior mean, not the data: compare it with the teacher's
    one_step_teacher = sample_few_step(teacher, noise, cond, steps=1)
    assert sw(sample_few_step(fitted, noise, cond, steps=1), one_step_teacher) < 0.25 * sw(
        sample_few_step(untrained, noise, cond, steps=1), one_step_teacher
    )
    with pytest.raises(ValueError, match="guidance"):
        fit_velocity(untrained, world, steps=1, guidance=3.0)
