"""The closed-form world the method tests share: a class-conditional Gaussian mixture whose teacher velocity
is exact, the sliced Wasserstein distance of a sampler to it, and a minimal training loop."""

import torch
from mog import AnalyticTeacher, MixtureWorld, MLPVelocity, fit_velocity

from tmd.eval.sliced import sliced_wasserstein
from tmd.rng import BatchRandom
from tmd.train.update import UpdateStep, optimizer_settings

WORLD = MixtureWorld(dim=2, num_classes=4)
BATCH = 256
TEACHER = AnalyticTeacher(WORLD)


def fit_teacher_copy():
    """A flow model fitted to the analytic teacher: good with many steps, blurry with one or two."""
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
        total += sliced_wasserstein(generated, x, rng=torch.Generator().manual_seed(seed))
    return total / WORLD.num_classes


def train(method, steps, lr=1e-3, seed=0):
    method.rng = BatchRandom(torch.Generator().manual_seed(seed))
    groups = method.parameter_groups()
    settings = optimizer_settings(method, groups, lr, (0.9, 0.999))  # a method's own settings, as the trainer's
    optimizers = {name: torch.optim.Adam(params, **settings[name]) for name, params in groups.items()}

    update = UpdateStep(optimizers, groups)

    data = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        x, cond = WORLD.sample(BATCH, generator=data)
        method.training_step({"x": x, "cond": cond, "neg_cond": WORLD.null_cond(BATCH)}, step, update)
