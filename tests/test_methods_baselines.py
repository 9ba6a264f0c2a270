"""The baselines of DESIGN.md section 4 on the closed-form mixture world: each method's few-step generator,
started from a fitted flow model (blurry with one or two steps), must move towards the true distribution.
Each runs with its paper's defaults unless a test says otherwise; measured SW in the comments
(2-core CPU, one thread)."""

import copy

import pytest
import torch
from closed_form import TEACHER, distance, fit_teacher_copy, train
from mog import MLPTransition

from tmd.methods import get_method
from tmd.methods.meanflow import sample_mean_flow
from tmd.methods.phased_dmd import PerPhase, sample_phased
from tmd.sampling import sample_few_step


@pytest.fixture(scope="module")
def fitted_velocity():
    return fit_teacher_copy()


def improves(method, sample_fn, steps, factor):
    before = distance(sample_fn)
    train(method, steps)
    after = distance(sample_fn)
    print(f"SW {before:.4f} -> {after:.4f}")
    assert after < factor * before, (before, after)


def improves_on_most_seeds(build, steps, factor, seeds=(0, 1, 2)):
    """For methods whose 200-step runs on this tiny world swing with the training seed: the distance must
    fall by ``factor`` on most of ``seeds`` (each a fresh method from ``build()``)."""
    results = []
    for seed in seeds:
        method, sample_fn = build()
        before = distance(sample_fn)
        train(method, steps, seed=seed)
        results.append((before, distance(sample_fn)))
    print("SW", results)
    assert sum(after < factor * before for before, after in results) > len(seeds) / 2, results


# measured: CFG 1.5 1.34 -> 0.50; DM only 1.34 -> 0.48 (with DMD2's per-sample normaliser and uniform tau_DM
# the DM-only run diverged, 1.34 -> 1.65: dmd_normaliser stays an option, off)
@pytest.mark.parametrize("guidance,ca_weight", [(1.5, 1.0), (1.0, 0.0)])
def test_decoupled_dmd(fitted_velocity, guidance, ca_weight):
    generator = copy.deepcopy(fitted_velocity)
    cfg = get_method("decoupled_dmd").Config(guidance=guidance, ca_weight=ca_weight, outer_steps=1)
    method = get_method("decoupled_dmd")(cfg, TEACHER, generator, copy.deepcopy(fitted_velocity))
    improves(method, lambda noise, cond, g: sample_few_step(generator, noise, cond, 1, rng=g), 300, 0.7)


def test_phased_dmd(fitted_velocity):
    # the paper's fake-score lr (0.008 of the generator's), betas (0, 0.999), 5 fake steps per expert step:
    # measured 1.23 -> 0.63 (0.46 with the fake score at the generator's lr)
    cfg = get_method("phased_dmd").Config(guidance=1.0, outer_steps=2, phase_steps=150)
    experts = torch.nn.ModuleList(copy.deepcopy(fitted_velocity) for _ in range(2))
    fake_scores = PerPhase(copy.deepcopy(fitted_velocity) for _ in range(2))
    method = get_method("phased_dmd")(cfg, TEACHER, experts, fake_scores)
    improves(method, lambda noise, cond, g: sample_phased(experts, noise, cond, rng=g), 300, 0.8)


def test_tdm(fitted_velocity):
    # the code's squared-error branch: measured 1.23 -> 0.45. Its pseudo-Huber default (c = 1e-3, close to
    # L1: every element is pushed by sign(d) / scale) is too noisy in two dimensions: 0.85, 0.69, 1.45 on
    # training seeds 0, 1, 2
    generator = copy.deepcopy(fitted_velocity)
    cfg = get_method("tdm").Config(guidance=1.0, outer_steps=2, huber_c=0.0)
    method = get_method("tdm")(cfg, TEACHER, generator, copy.deepcopy(fitted_velocity))
    improves(method, lambda noise, cond, g: get_method("tdm").sample(generator, noise, cond, 2, g), 300, 0.7)


def test_mdt_dist(fitted_velocity):
    # measured 1.34 -> 0.39 (0.45, 0.35 with training seeds 1, 2; VM alone 0.89, VD alone 0.53). At the
    # shared lr (lr_scale 1): the 2-D mixture's MLP does not run away as the world's transformer does at 1e-4
    generator = copy.deepcopy(fitted_velocity)
    cfg = get_method("mdt_dist").Config(guidance=1.0, outer_steps=1, lr_scale=1.0)
    method = get_method("mdt_dist")(cfg, TEACHER, generator)
    improves(method, lambda noise, cond, g: get_method("mdt_dist").sample(generator, noise, cond, 1, g), 200, 0.7)


def test_meanflow(fitted_velocity):
    # measured: the plain squared error (p = 0) learns (SW 1.23 -> 0.76, 0.75 with training seeds 1, 2; seed 0
    # stalls at 0.94); MeanFlow's p = 1 stalled here (-> 1.02, before the 0.999 grids)
    def build():
        student = MLPTransition.from_velocity_model(copy.deepcopy(fitted_velocity), head_depth=1)
        cfg = get_method("meanflow").Config(guidance=1.0, outer_steps=2, adaptive_power=0.0)
        return get_method("meanflow")(cfg, TEACHER, student), lambda noise, cond, g: sample_mean_flow(student, noise, cond, 2)

    improves_on_most_seeds(build, 200, 0.7)
