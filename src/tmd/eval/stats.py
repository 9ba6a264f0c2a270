"""Intervals and variance components for scores measured over training seeds x evaluation noise seeds.

A study row is a grid ``y[i, j]``: training seed i (a separately trained student) scored on evaluation
noise seed j (72 videos from the same noise for every row). The row's estimate is the mean of the
per-training-seed means; its 95% interval is Student-t on those means (n - 1 degrees of freedom), so it
answers "what would another training run of this recipe give", conditional on the shared evaluation
noise. Rows without training seeds (the teacher) get the t-interval over noise seeds instead.

How much of the spread is training and how much evaluation noise: the grid is crossed (every student
sees the same noise seeds), so it is read as a two-way random-effects ANOVA without replication,
``y[i, j] = mu + a_i + b_j + e_ij``: ``a`` training seed, ``b`` the noise draw shared by every student,
``e`` how one student reacts to one draw. Components come from the expected mean squares (method of
moments, negative estimates clipped to 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


@dataclass
class Interval:
    mean: float
    low: float | None
    """None when there are fewer than two values (no spread to estimate)."""
    high: float | None
    n: int

    def as_list(self) -> list[float | None]:
        return [self.low, self.high]


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean and Student-t interval ``mean +- t_{n-1} s / sqrt(n)``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, None, None, 1)
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half, int(x.size))


@dataclass
class PairedDifference:
    interval: Interval
    """Of the per-seed differences a - b."""
    seeds: list[int]
    """The training seeds present in both rows, the pairs."""


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> PairedDifference:
    """a - b paired by training seed: the t-interval of the per-seed differences.

    Pairing removes what seed i's draw of data and noise does to both methods alike; each value must be
    the seed's mean over the same evaluation noise seeds in both rows.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no training seed in common between {sorted(a)} and {sorted(b)}")
    return PairedDifference(t_interval([a[s] - b[s] for s in seeds], level), seeds)


@dataclass
class VarianceComponents:
    training: float
    """Variance between training seeds (sigma_a^2)."""
    noise_shared: float
    """Variance of the evaluation noise draw common to every student (sigma_b^2)."""
    residual: float
    """Student-by-noise variance (sigma_e^2); with one training seed, all noise variance lands here."""
    training_seeds: int
    noise_seeds: int

    @property
    def evaluation(self) -> float:
        """Everything a new evaluation draw changes in one student's score."""
        return self.noise_shared + self.residual

    @property
    def training_share(self) -> float | None:
        """Share of a single score's variance that comes from the training seed."""
        total = self.training + self.evaluation
        return self.training / total if total > 0 else None

    @property
    def mean_variance(self) -> float:
        """Variance of the row mean that the training-seed interval sees: ``sigma_a^2 / I + sigma_e^2 / (I J)``
        (the shared noise shifts every seed alike and cancels in comparisons between rows)."""
        i, j = self.training_seeds, self.noise_seeds
        return self.training / i + self.residual / (i * j)

    @property
    def mean_variance_new_noise(self) -> float:
        """Variance of the row mean over new evaluation noise as well: ``+ sigma_b^2 / J``, what an absolute
        statement about the row (not a comparison on the same noise) is uncertain by."""
        return self.mean_variance + self.noise_shared / self.noise_seeds

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            **asdict(self),
            "evaluation": self.evaluation,
            "training_share": self.training_share,
            "mean_variance": self.mean_variance,
            "mean_variance_new_noise": self.mean_variance_new_noise,
        }


def variance_components(grid: Sequence[Sequence[float]]) -> VarianceComponents:
    """Two-way crossed random-effects ANOVA without replication of ``grid[training seed][noise seed]``.

    Expected mean squares: E MS_rows = sigma_e^2 + J sigma_a^2, E MS_cols = sigma_e^2 + I sigma_b^2,
    E MS_residual = sigma_e^2. One row (the teacher): the sample variance over noise seeds is the residual.
    """
    y = np.asarray(grid, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] < 2:
        raise ValueError(f"variance_components needs a (training seeds, noise seeds >= 2) grid, got shape {y.shape}")
    i, j = y.shape
    if i == 1:
        return VarianceComponents(0.0, 0.0, float(y[0].var(ddof=1)), 1, j)
    rows, cols, mean = y.mean(axis=1), y.mean(axis=0), y.mean()
    ms_rows = j * ((rows - mean) ** 2).sum() / (i - 1)
    ms_cols = i * ((cols - mean) ** 2).sum() / (j - 1)
    residual = y - rows[:, None] - cols[None, :] + mean
    ms_residual = (residual**2).sum() / ((i - 1) * (j - 1))
    return VarianceComponents(
        training=max((ms_rows - ms_residual) / j, 0.0),
        noise_shared=max((ms_cols - ms_residual) / i, 0.0),
        residual=float(ms_residual),
        training_seeds=i,
        noise_seeds=j,
    )
