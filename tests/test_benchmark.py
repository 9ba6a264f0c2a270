import dataclasses
import math

import pytest
import torch

from tmd.world.benchmark import (
    QUALITY_DIMS,
    SEMANTIC_DIMS,
    BenchmarkResult,
    format_table,
    mean_video_baseline,
    score_videos,
)
from tmd.world.spec import COLOURS, WorldConfig, all_prompts, sample_videos

CFG = WorldConfig()
# 16 prompts covering every colour, shape and direction, 32 seeds each.
PROMPTS = (all_prompts()[::9] + all_prompts()[4::9]) * 32


@pytest.fixture(scope="module")
def truth():
    return sample_videos(PROMPTS, CFG, torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference():
    return sample_videos(PROMPTS, CFG, torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def truth_score(truth, reference):
    return score_videos(truth.videos, PROMPTS, reference, CFG)


def test_ground_truth_scores_perfectly(truth_score):
    r = truth_score
    assert r.semantic >= 0.98 and r.quality >= 0.98 and r.total >= 0.98
    assert r.detect_rate == 1.0
    assert r.frechet < 0.1
    assert 0.8 < r.diversity < 1.25
    assert set(r.per_dimension) == set(QUALITY_DIMS) | set(SEMANTIC_DIMS)
    assert all(0.98 <= v <= 1.0 for v in r.per_dimension.values())


def test_default_reference(truth):
    # its speed is a benchmark's business (a timed assertion fails on a loaded or slower machine)
    r = score_videos(truth.videos[:256], PROMPTS[:256])
    assert r.total >= 0.98 and r.frechet < 0.2


def test_noise_scores_badly(truth, reference):
    noise = torch.randn(truth.videos.shape, generator=torch.Generator().manual_seed(0))
    r = score_videos(noise, PROMPTS, reference, CFG)
    assert r.quality < 0.3 and r.semantic < 0.3
    assert r.detect_rate < 0.1 and r.frechet == math.inf


def test_mean_video_is_caught(reference, truth_score):
    mean = mean_video_baseline(PROMPTS, CFG, torch.Generator().manual_seed(3), 32)
    assert mean.shape == reference.videos.shape
    r = score_videos(mean, PROMPTS, reference, CFG)
    assert r.per_dimension["sharpness"] < 0.5
    assert r.quality < truth_score.quality - 0.3
    assert r.diversity < 0.1


def test_collapsed_generator_is_caught(truth, reference, truth_score):
    first = {}
    for i, p in enumerate(PROMPTS):
        first.setdefault(p, i)
    collapsed = truth.videos[[first[p] for p in PROMPTS]]
    r = score_videos(collapsed, PROMPTS, reference, CFG)
    assert r.quality >= 0.98 and r.semantic >= 0.98  # every single video is perfect...
    assert r.diversity < 0.05  # ...but the seeds of a prompt are all the same
    assert r.frechet > 0.5 and r.frechet > 5 * truth_score.frechet


def test_wrong_prompt_loses_semantic_score(truth, reference, truth_score):
    names = list(COLOURS)
    swap = {c: names[(i + 1) % len(names)] for i, c in enumerate(names)}
    wrong = [p.replace(p.split()[1], swap[p.split()[1]]) for p in PROMPTS]
    r = score_videos(truth.videos, wrong, reference.videos, CFG)
    assert r.per_dimension["colour"] == 0.0
    assert r.semantic < truth_score.semantic - 0.3
    assert r.quality >= 0.98


@pytest.mark.parametrize(
    "shape, n_prompts, needle",
    [
        ((4, 3, 8, 32), 4, "shape"),
        ((4, 1, 8, 32, 32), 4, r"\(B, 3, 8, 32, 32\)"),
        ((4, 3, 4, 32, 32), 4, "got \\(4, 3, 4, 32, 32\\)"),
        ((4, 3, 8, 16, 16), 4, "shape"),
        ((4, 3, 8, 32, 32), 3, "4 videos but 3 prompts"),
    ],
)
def test_bad_inputs(shape, n_prompts, needle):
    with pytest.raises(ValueError, match=needle):
        score_videos(torch.zeros(shape), all_prompts()[:n_prompts])


def test_bad_reference_and_prompt():
    videos = torch.zeros(2, 3, 8, 32, 32)
    with pytest.raises(ValueError, match="reference_videos"):
        score_videos(videos, all_prompts()[:2], torch.zeros(3, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="grammar"):
        score_videos(videos, ["a red circle", "a red circle moving up"])


def test_result_dict_and_table(truth_score):
    row = truth_score.as_dict()
    assert row["total"] == truth_score.total and row["sharpness"] == 1.0
    assert "per_dimension" not in row
    table = format_table([{"method": "truth", **row}, {"method": "x", "total": math.inf}])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].split()[:2] == ["method", "total"]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule align
    assert "inf" in lines[3]
    assert isinstance(truth_score, BenchmarkResult)


def test_ground_truth_stands_in_for_undetected_reference(truth, reference, truth_score):
    blanked = reference.videos.clone()
    blanked[::4] = -1.0  # the detector finds nothing in a quarter of the reference
    r = score_videos(truth.videos, PROMPTS, dataclasses.replace(reference, videos=blanked), CFG)
    assert abs(r.frechet - truth_score.frechet) < 0.05
    assert 0.8 < r.diversity < 1.25
