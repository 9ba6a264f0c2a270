import math

import pytest
import torch

from tmd.world.spec import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    WorldConfig,
    all_prompts,
    parse_prompt,
    random_prompts,
    sample_videos,
    world_vocabulary,
)

CFG = WorldConfig()


def _batch(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sample_videos(random_prompts(n, g), CFG, g)


def test_prompt_tables():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 72
    assert prompts[0] == "a red circle moving left"
    assert len(COLOURS) == 6 and len(SHAPES) == 3 and len(DIRECTIONS) == 4
    vocab = world_vocabulary()
    assert vocab == sorted(vocab)
    assert {w for p in prompts for w in p.split()} == set(vocab)
    for p in prompts:
        assert parse_prompt(p).prompt == p
    attrs = parse_prompt("  A Cyan   Triangle moving DOWN ")
    assert (attrs.colour, attrs.shape, attrs.direction) == ("cyan", "triangle", "down")
    assert (attrs.colour_index, attrs.shape_index, attrs.direction_index) == (5, 2, 3)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("a red circle", "grammar"),
        ("the red circle moving left", "grammar"),
        ("a purple circle moving left", "red, green, blue"),
        ("a red hexagon moving left", "circle, square, triangle"),
        ("a red circle moving sideways", "left, right, up, down"),
    ],
)
def test_parse_errors_are_clear(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_prompt(text)


def test_random_prompts_seeded_and_valid():
    a = random_prompts(50, torch.Generator().manual_seed(3))
    b = random_prompts(50, torch.Generator().manual_seed(3))
    assert a == b and set(a) <= set(all_prompts())


def test_shapes_ranges_and_ground_truth():
    batch = _batch()
    b = len(batch)
    assert batch.videos.shape == (b, 3, 8, 32, 32) and batch.videos.dtype == torch.float32
    assert batch.videos.min() >= -1 and batch.videos.max() <= 1
    assert batch.trajectory.shape == (b, 8, 2) and batch.start.shape == (b, 2)
    assert ((batch.size >= CFG.min_size) & (batch.size <= CFG.max_size)).all()
    assert ((batch.speed >= CFG.min_speed) & (batch.speed <= CFG.max_speed)).all()
    torch.testing.assert_close(batch.trajectory[:, 0], batch.start)
    unit = torch.tensor(list(DIRECTIONS.values()))[batch.direction]
    step = batch.trajectory[:, 1:] - batch.trajectory[:, :-1]
    torch.testing.assert_close(step, (batch.speed[:, None] * unit)[:, None].expand_as(step))
    for i, p in enumerate(batch.prompts):
        a = parse_prompt(p)
        assert (a.colour_index, a.shape_index, a.direction_index) == (
            batch.colour[i].item(),
            batch.shape[i].item(),
            batch.direction[i].item(),
        )
    # Only the prompt's colour channels light up; the background is exactly black.
    rgb = torch.tensor(list(COLOURS.values()))[batch.colour]
    off = batch.videos.masked_select((rgb == 0)[:, :, None, None, None].expand_as(batch.videos))
    assert (off == -1).all()
    # Anti-aliased: edge pixels take intermediate values.
    assert ((batch.videos > -0.9) & (batch.videos < 0.9)).any()


def test_object_stays_inside_frame():
    batch = _batch(512, seed=1)
    lo = batch.trajectory - batch.size[:, None, None]
    hi = batch.trajectory + batch.size[:, None, None]
    assert (lo >= 0).all() and (hi[..., 0] <= CFG.width).all() and (hi[..., 1] <= CFG.height).all()
    # Nothing is clipped: the rendered area equals the analytic area in every frame.
    coverage = (batch.videos.max(dim=1).values + 1) / 2
    area = torch.tensor([math.pi, 4.0, 2.0])[batch.shape] * batch.size**2
    expected = area[:, None].expand(-1, 8)
    torch.testing.assert_close(coverage.sum((-1, -2)), expected, rtol=0.02, atol=0)


def test_seeded_determinism():
    a, b, c = _batch(64, seed=5), _batch(64, seed=5), _batch(64, seed=6)
    assert torch.equal(a.videos, b.videos) and a.prompts == b.prompts
    assert not torch.equal(a.videos, c.videos)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"frames": 1}, "frames"),
        ({"min_size": 5.0, "max_size": 4.0}, "min_size"),
        ({"min_size": 0.0}, "min_size"),
        ({"min_speed": 3.0, "max_speed": 2.0}, "min_speed"),
        ({"max_size": 10.0}, "does not fit"),
        ({"frames": 16}, "does not fit"),
        ({"supersample": 0}, "supersample"),
        ({"height": 2}, "height"),
    ],
)
def test_bad_config(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        WorldConfig(**kwargs)
