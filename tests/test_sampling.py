import pytest
import torch
from diffusers import WanPipeline
from test_generate import build_tiny_pipeline, wan_pipeline_latents

from tmd import flow
from tmd.models.split import TMDStudent
from tmd.models.wan import load_teacher
from tmd.sampling import sample_few_step, sample_teacher, sample_tmd, teacher_grid


def test_teacher_sampler_matches_diffusers_pipeline(tmp_path, tiny_inputs):
    """Our Euler sampler with CFG equals WanPipeline + FlowMatchEulerDiscreteScheduler on the same inputs."""
    build_tiny_pipeline(tmp_path)
    reference = wan_pipeline_latents(WanPipeline.from_pretrained(tmp_path), tiny_inputs)
    teacher = load_teacher(tmp_path)
    latents, text, negative = tiny_inputs
    ours = sample_teacher(teacher, latents, text, negative, steps=6, guidance=4.0, shift=3.0)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_teacher_grid_endpoints():
    grid = teacher_grid(4, shift=5.0)
    assert len(grid) == 5 and grid[0] == pytest.approx(1.0) and grid[-1] == 0


class KnownHead:
    """A TransitionModel whose head returns prescribed values, one per call, and records its inputs."""

    inner_velocity = "noise"
    transition_target = "difference"

    def __init__(self, outputs):
        self.outputs, self.calls = list(outputs), []

    def backbone(self, x_t, t, cond):
        return x_t

    def head(self, y_s, s, r, features):
        self.calls.append((y_s.clone(), float(s), float(r)))
        return self.outputs[len(self.calls) - 1]


def test_rollout_is_eq14s_weighted_sum():
    """With ``u = y1 - head_j`` the inner rollout from ``y1`` at ``s_N = 0.999`` lands on
    ``(1 - s_N) y1 + sum_j (s_j - s_{j-1}) head_j``, and one outer step to 0 is ``x1 - 0.999 y``."""
    x1 = torch.randn(2, 3)
    heads = [torch.randn(2, 3) for _ in range(3)]
    student = KnownHead(heads)
    x = sample_tmd(student, x1, None, outer_steps=1, inner_steps=3, rng=torch.Generator().manual_seed(7))
    y1 = torch.randn(2, 3, generator=torch.Generator().manual_seed(7))
    grid = flow.inner_grid(3).float()
    expected_y = (1 - grid[0]) * y1 + sum((grid[j] - grid[j + 1]) * heads[j] for j in range(3))
    torch.testing.assert_close(x, x1 - 0.999 * expected_y)
    torch.testing.assert_close(student.calls[0][0], y1)  # the rollout starts from the inner noise
    assert [c[1:] for c in student.calls] == [
        (pytest.approx(float(grid[j])), pytest.approx(float(grid[j + 1]))) for j in range(3)
    ]


def test_rollout_with_the_implied_velocity_lands_on_the_last_head():
    heads = [torch.randn(2, 3) for _ in range(2)]
    student = KnownHead(heads)
    student.inner_velocity = "implied"
    x1 = torch.randn(2, 3)
    torch.testing.assert_close(sample_tmd(student, x1, None, 1, 2), x1 - 0.999 * heads[1])


def test_tmd_outer_steps_are_deterministic_dtm_steps():
    """Alg. 1: ``x <- x - (t_i - t_{i-1}) y`` on the 0.999 outer grid, fresh inner noise per outer step."""
    heads = [torch.full((1, 2), 1.0), torch.full((1, 2), 3.0)]
    student = KnownHead(heads)
    x1 = torch.zeros(1, 2)
    g = torch.Generator().manual_seed(3)
    x = sample_tmd(student, x1, None, outer_steps=2, inner_steps=1, rng=g)
    replay = torch.Generator().manual_seed(3)
    y1_a, y1_b = torch.randn(1, 2, generator=replay), torch.randn(1, 2, generator=replay)
    outer = flow.outer_grid(2).float()
    y_a = (1 - 0.999) * y1_a + 0.999 * heads[0]
    x_mid = x1 - (outer[0] - outer[1]) * y_a
    torch.testing.assert_close(student.calls[1][0], y1_b)
    torch.testing.assert_close(x, x_mid - outer[1] * ((1 - 0.999) * y1_b + 0.999 * heads[1]))


class KnownVelocity:
    """v(x, t) = 0.5 x + t, a velocity model whose few-step samples are computable by hand."""

    def velocity(self, x_t, t, cond):
        return 0.5 * x_t + flow.expand_time(torch.as_tensor(t, dtype=x_t.dtype), x_t)


def test_few_step_sampler_is_eq18():
    """DMD2-v samples with ``x_{t'} = (1 - t'/t) g(x_t, t) + (t'/t) x_t``, ``g = x_t - t v`` (Eq. 17-18)."""
    x = torch.randn(2, 3)
    grid = flow.outer_grid(3).float()
    expected = x.clone()
    for t, t_next in zip(grid[:-1], grid[1:]):
        g = expected - t * (0.5 * expected + t)
        expected = (1 - t_next / t) * g + (t_next / t) * expected
    torch.testing.assert_close(sample_few_step(KnownVelocity(), x, None, 3), expected)
    # seeds do not matter to the deterministic sampler; they do to DMD2's re-noising (Eq. 19)
    a = sample_few_step(KnownVelocity(), x, None, 3, torch.Generator().manual_seed(0), multistep="renoise")
    b = sample_few_step(KnownVelocity(), x, None, 3, torch.Generator().manual_seed(1), multistep="renoise")
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="multistep must be one of"):
        sample_few_step(KnownVelocity(), x, None, 2, multistep="sde")


def test_samplers_are_seeded(tiny_teacher, tiny_inputs):
    noise, text, negative = tiny_inputs
    student = TMDStudent.from_teacher(tiny_teacher, head_blocks=1)

    def tmd(seed):
        return sample_tmd(student, noise, text, 2, 3, rng=torch.Generator().manual_seed(seed))

    assert tmd(0).shape == noise.shape
    assert torch.equal(tmd(0), tmd(0)) and not torch.equal(tmd(0), tmd(1))
    one = sample_few_step(tiny_teacher, noise, text, 1)
    assert torch.isfinite(one).all()
    assert torch.equal(
        sample_teacher(tiny_teacher, noise, text, negative, 3), sample_teacher(tiny_teacher, noise, text, negative, 3)
    )


def test_tmd_one_outer_one_inner_step_starts_at_the_teacher(tiny_teacher, tiny_inputs):
    """At initialisation the head's one step returns the teacher's velocity v, so M = N = 1 gives
    ``x1 - 0.999 (0.001 y1 + 0.999 v)`` (Eq. 14), and ``x1 - 0.999 v`` with the implied velocity."""
    noise, text, _ = tiny_inputs
    v = tiny_teacher.velocity(noise, 0.999, text)
    student = TMDStudent.from_teacher(tiny_teacher, head_blocks=2)
    ours = sample_tmd(student, noise, text, 1, 1, torch.Generator().manual_seed(4), outer_shift=1.0, inner_shift=1.0)
    y1 = torch.randn(noise.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, noise - 0.999 * (0.001 * y1 + 0.999 * v), rtol=1e-5, atol=1e-5)
    implied = TMDStudent.from_teacher(tiny_teacher, head_blocks=2, inner_velocity="implied")
    torch.testing.assert_close(sample_tmd(implied, noise, text, 1, 1), noise - 0.999 * v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, "steps must be an integer"),
        ({"guidance": -2.0}, "guidance scale"),
        ({"shift": 0.0}, "shift must be > 0"),
    ],
)
def test_teacher_sampler_errors(tiny_teacher, tiny_inputs, kwargs, match):
    noise, text, negative = tiny_inputs
    with pytest.raises(ValueError, match=match):
        sample_teacher(tiny_teacher, noise, text, negative, **kwargs)


def test_guidance_needs_negative(tiny_teacher, tiny_inputs):
    noise, text, _ = tiny_inputs
    with pytest.raises(ValueError, match="needs a negative condition"):
        sample_teacher(tiny_teacher, noise, text, None, steps=2, guidance=3.0)
    with pytest.raises(ValueError, match="negative condition of shape"):
        sample_teacher(tiny_teacher, noise, text, text[:, :2], steps=2, guidance=3.0)
