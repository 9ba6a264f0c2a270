import math

import pytest
import torch

from tmd import flow


def test_interpolation_round_trips():
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0.0, 0.25, 0.7, 1.0])
    x_t = flow.interpolate(x, noise, t)
    v = flow.velocity_target(x, noise)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, v, t), x)
    torch.testing.assert_close(flow.noise_from_velocity(x_t, v, t), noise)
    inner = t[1:3]
    torch.testing.assert_close(flow.velocity_from_x0(x_t[1:3], x[1:3], inner), v[1:3])
    torch.testing.assert_close(flow.interpolate(x, noise, 1.0), noise)


def test_cfg_and_shift():
    vu, vc = torch.tensor([1.0]), torch.tensor([3.0])
    assert flow.cfg(vu, vc, 1.0).item() == 3.0
    assert flow.cfg(vu, vc, 5.0).item() == 11.0
    assert flow.shift(0.5, 10.0) == pytest.approx(10 * 0.5 / (9 * 0.5 + 1))
    assert flow.shift(1.0, 3.0) == 1.0 and flow.shift(0.0, 3.0) == 0.0
    with pytest.raises(ValueError, match="shift factor"):
        flow.shift(0.5, 0.0)


def test_grids_start_at_0999_after_the_shift():
    """Footnote 2: the shifted grid's end at noise is set to 0.999 after shifting (2 steps: 0.999, 0.909, 0)."""
    grid = flow.outer_grid(2)
    torch.testing.assert_close(grid, torch.tensor([0.999, 10 * 0.5 / (9 * 0.5 + 1), 0.0], dtype=torch.float64))
    assert f"{grid[1].item():.3f}" == "0.909"
    inner = flow.inner_grid(4)
    expected = [0.999] + [10 * u / (9 * u + 1) for u in (0.75, 0.5, 0.25)] + [0.0]
    torch.testing.assert_close(inner, torch.tensor(expected, dtype=torch.float64))
    assert torch.all(inner[:-1] > inner[1:])
    torch.testing.assert_close(flow.inner_grid(3, 1.0), torch.tensor([0.999, 2 / 3, 1 / 3, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("m,n,h,l", [(2, 4, 5, 30), (1, 2, 5, 30), (4, 1, 3, 8)])
def test_effective_nfe(m, n, h, l):  # noqa: E741 (the paper's symbols)
    assert flow.tmd_effective_nfe(m, n, h, l) == pytest.approx(m * (1 + (n - 1) * h / l))


def test_effective_nfe_examples():
    assert flow.tmd_effective_nfe(2, 2, 5, 30) == pytest.approx(2.3333, abs=1e-4)  # the paper's TMD-N2H5
    assert flow.teacher_effective_nfe(50, 5.0) == 100
    assert flow.teacher_effective_nfe(4, None) == 4


def test_inner_flow_map_with_the_noise_velocity():
    """Eq. 13-14: ``u = y1 - head``, ``y_r = y_s - (s - r) u``; at r = s the flow-map error is ``y - head``."""
    y_s, head, y1 = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    u = flow.average_velocity(head, y_s, y1, 0.7, "noise")
    torch.testing.assert_close(u, y1 - head)
    torch.testing.assert_close(flow.inner_flow_step(y_s, u, 0.7, 0.2), y_s - 0.5 * (y1 - head))
    # a perfect head (head = y) on the straight inner path stays on it: y_s = (1 - s) y + s y1
    y = torch.randn(3, 4)
    y_s = flow.interpolate(y, y1, 0.8)
    torch.testing.assert_close(
        flow.inner_flow_step(y_s, flow.average_velocity(y, y_s, y1, 0.8), 0.8, 0.3), flow.interpolate(y, y1, 0.3)
    )


def test_inner_flow_map_with_the_implied_velocity():
    """The ``implied`` option: ``u = (y_s - head) / s``; to r = 0 it lands on the head's output."""
    y_s, head = torch.randn(3, 4), torch.randn(3, 4)
    u = flow.average_velocity(head, y_s, torch.randn(3, 4), 0.7, "implied")
    torch.testing.assert_close(u, (y_s - head) / 0.7)
    torch.testing.assert_close(flow.inner_flow_step(y_s, u, 0.7, 0.0), head)
    with pytest.raises(ValueError, match="inner_velocity must be one of"):
        flow.average_velocity(head, y_s, y_s, 0.7, "x0")


def test_deterministic_step_is_eq18_and_euler():
    x_t, v = torch.randn(3, 4), torch.randn(3, 4)
    t, t_next = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.5, 0.2, 0.0])
    x0 = flow.x0_from_velocity(x_t, v, t)
    ratio = (t_next / t)[:, None]
    torch.testing.assert_close(flow.deterministic_step(x_t, x0, t, t_next), (1 - ratio) * x0 + ratio * x_t)
    torch.testing.assert_close(flow.deterministic_step(x_t, x0, t, t_next), x_t - (t - t_next)[:, None] * v)


def test_shifted_uniform_is_seeded_and_in_range():
    a = flow.sample_shifted_uniform(1000, 5.0, torch.Generator().manual_seed(1))
    b = flow.sample_shifted_uniform(1000, 5.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.min() >= flow.shift(0.001, 5.0) - 1e-6 and a.max() <= flow.shift(0.999, 5.0) + 1e-6
    assert a.mean() > 0.6  # shifted towards noise


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: flow.outer_grid(0), "steps must be an integer"),
        (lambda: flow.tmd_effective_nfe(2, 4, 30, 30), "head blocks"),
        (lambda: flow.tmd_effective_nfe(0, 4, 5, 30), "outer steps"),
        (lambda: flow.check_guidance(-1.0), "guidance scale"),
        (lambda: flow.check_guidance(math.nan), "guidance scale"),
        (lambda: flow.interpolate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3)), "time must be"),
    ],
)
def test_errors_are_clear(call, match):
    with pytest.raises(ValueError, match=match):
        call()
