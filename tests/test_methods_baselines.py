"""The baselines of DESIGN.md section 4 on the closed-form mixture world: each method's few-step generator,
started from a fitted flow model (blurry with one or two steps), must move towards the true distribution."""

import copy

import pytest
import torch

from tmd.data.mog import AnalyticTeacher, MixtureWorld
from tmd.eval.sliced import sliced_wasserstein
from tmd.methods import get_method
from tmd.methods.meanflow import sample_mean_flow
from tmd.methods.phased_dmd import PerPhase, sample_phased
from tmd.methods.tdm import sample_deterministic
from tmd.models.mlp import MLPTransition, MLPVelocity, fit_velocity
from tmd.sampling import sample_few_step

WORLD = MixtureWorld(dim=2, num_classes=4)
BATCH = 256
TEACHER = AnalyticTeacher(WORLD)


@pytest.fixture(scope="module")
def fitted_velocity():
    torch.manual_seed(0)
    return fit_velocity(MLPVelocity(2, WORLD.cond_dim, width=64, depth=3), WORLD, TEACHER, steps=400)


def distance(sample_fn, seed=0):
    """Mean over classes of the sliced Wasserstein distance between generated and true samples."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for label in range(WORLD.num_classes):
        x, cond = WORLD.sample(512, labels=label, generator=g)
        noise = torch.randn(x.shape, generator=g)
        with torch.no_grad():
            generated = sample_fn(noise, cond, torch.Generator().manual_seed(seed))
        total += sliced_wasserstein(generated, x, generator=torch.Generator().manual_seed(seed))
    return total / WORLD.num_classes


def train(method, steps, lr=1e-3, seed=0):
    method.generator = torch.Generator().manual_seed(seed)
    optimizers = {name: torch.optim.Adam(params, lr=lr) for name, params in method.parameter_groups().items()}

    def update(group, loss, terms=None):
        assert torch.isfinite(loss), f"{group} loss {loss}"
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizers[group].step()

    data = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        x, cond = WORLD.sample(BATCH, generator=data)
        method.training_step({"x": x, "cond": cond, "neg_cond": WORLD.null_cond(BATCH)}, step, update)


def improves(method, sample_fn, steps, factor):
    before = distance(sample_fn)
    train(method, steps)
    after = distance(sample_fn)
    print(f"SW {before:.4f} -> {after:.4f}")
    assert after < factor * before, (before, after)


@pytest.mark.parametrize("guidance,ca_weight,dm_weight", [(1.5, 1.0, 1.0), (1.0, 0.0, 1.0)])
def test_decoupled_dmd(fitted_velocity, guidance, ca_weight, dm_weight):
    generator = copy.deepcopy(fitted_velocity)
    cfg = get_method("decoupled_dmd").Config(
        guidance=guidance, ca_weight=ca_weight, dm_weight=dm_weight, gan_weight=0.0, generator_every=1, outer_steps=1
    )
    method = get_method("decoupled_dmd")(cfg, TEACHER, generator, copy.deepcopy(fitted_velocity))
    improves(method, lambda noise, cond, g: sample_few_step(generator, noise, cond, 1, generator=g), 300, 0.7)


def test_phased_dmd(fitted_velocity):
    cfg = get_method("phased_dmd").Config(guidance=1.0, generator_every=1, outer_steps=2, phase_steps=150)
    experts = torch.nn.ModuleList(copy.deepcopy(fitted_velocity) for _ in range(2))
    fake_scores = PerPhase(copy.deepcopy(fitted_velocity) for _ in range(2))
    method = get_method("phased_dmd")(cfg, TEACHER, experts, fake_scores)
    # phase 0 (0.9999 -> 0.909) barely changes the samples; the gain is phase 1's (measured 1.23 -> 0.93)
    improves(method, lambda noise, cond, g: sample_phased(experts, noise, cond, generator=g), 300, 0.8)


def test_tdm(fitted_velocity):
    generator = copy.deepcopy(fitted_velocity)
    cfg = get_method("tdm").Config(guidance=1.0, outer_steps=2)
    method = get_method("tdm")(cfg, TEACHER, generator, copy.deepcopy(fitted_velocity))
    improves(method, lambda noise, cond, g: sample_deterministic(generator, noise, cond, 2), 300, 0.7)


def test_mdt_dist(fitted_velocity):
    generator = copy.deepcopy(fitted_velocity)
    cfg = get_method("mdt_dist").Config(guidance=1.0, outer_steps=1)
    method = get_method("mdt_dist")(cfg, TEACHER, generator)
    improves(method, lambda noise, cond, g: sample_few_step(generator, noise, cond, 1, generator=g), 200, 0.7)


def test_meanflow(fitted_velocity):
    student = MLPTransition.from_velocity_model(copy.deepcopy(fitted_velocity), head_depth=1)
    # measured: the plain squared error (p = 0) learns (SW 1.23 -> 0.68); MeanFlow's p = 1 stalls here (-> 1.02)
    cfg = get_method("meanflow").Config(guidance=1.0, outer_steps=2, adaptive_power=0.0)
    method = get_method("meanflow")(cfg, TEACHER, student)
    improves(method, lambda noise, cond, g: sample_mean_flow(student, noise, cond, 2), 200, 0.7)
