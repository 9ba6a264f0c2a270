"""VBench-like analytic benchmark for the synthetic world (:mod:`tmd.world.spec`).

Real video benchmarks score generated videos with learned detectors; here the world is simple
enough that hand-written detectors are exact, so the benchmark itself can be tested: ground-truth
videos score ~1, and each classic failure of a distilled student (noise, blur from regressing to
the mean, mode collapse, ignoring the prompt) lowers a specific number.

Dimensions (each per video in [0, 1], reported as means over videos):

* semantic: ``colour``, ``shape`` and ``direction`` match the prompt.
* quality: ``single_object`` (exactly one plausibly sized object per frame), ``background``
  (no energy away from the object), ``sharpness`` (edges as narrow as anti-aliasing allows),
  ``temporal`` (size and colour constant over time), ``smoothness`` (centroid moves linearly).

``total = (4 * quality + semantic) / 5``. Against a reference draw of the same prompts the
benchmark also reports a Frechet distance between Gaussian fits of per-video motion features
(start x, start y, velocity x, velocity y, size), normalised by the reference std, and
``diversity``, the pooled within-prompt variance of (start x, start y, speed, size) relative to
the reference's. Diversity is measured within prompts because between-prompt spread (e.g. velocity
sign) survives mode collapse; a collapsed generator has diversity ~0, the true world ~1, and
values above 1 mean more spread than the world has (which the Frechet distance then penalises).
When no prompt repeats, the global variance ratio is used instead.

The reference features come from the same detector, so detector biases (e.g. pixel-centre
centroids) cancel; ground truth fills in only where the detector fails on a reference video.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage

from tmd.world.spec import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    WorldBatch,
    WorldConfig,
    parse_prompt,
    sample_videos,
)

QUALITY_DIMS = ("single_object", "background", "sharpness", "temporal", "smoothness")
SEMANTIC_DIMS = ("colour", "shape", "direction")

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)  # (6, 3)
_UNITS = np.array(list(DIRECTIONS.values()), dtype=np.float64)  # (4, 2)
# Soft area / (soft width * soft height) of the anti-aliased renders, measured on ground truth.
_FILL = np.array([0.79, 1.0, 0.57])
_SHAPE_AREA = np.array([math.pi, 4.0, 2.0])  # area / size**2 per shape
# Area centroid minus bounding-box centre, in units of size (the triangle's apex points up).
_CENTROID_DY = np.array([0.0, 0.0, 1.0 / 3.0])
_FOREGROUND = 0.5  # brightness (max channel, [0, 1]) above which a pixel belongs to an object
_MID = (0.1, 0.9)  # brightness range of an edge pixel
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = True  # 8-connectivity inside a frame, none across frames
_REFERENCE_SEED = 1234


@dataclass
class BenchmarkResult:
    total: float
    quality: float
    semantic: float
    frechet: float
    diversity: float
    detect_rate: float
    per_dimension: dict[str, float]

    def as_dict(self) -> dict[str, float]:
        """Flat dict (per-dimension scores merged in) so results can be rows of ``format_table``."""
        row = asdict(self)
        per_dimension = row.pop("per_dimension")
        return {**row, **per_dimension}


@dataclass
class _Detections:
    """Per-video detector output; features are NaN where the object was not found."""

    detected: np.ndarray  # (B,) bool
    scores: dict[str, np.ndarray]  # dimension -> (B,)
    features: np.ndarray  # (B, 5): start x, start y, velocity x, velocity y, size
    shape: np.ndarray  # (B,) index into SHAPES of the majority vote over valid frames


def _tolerant(error: np.ndarray, tolerance: float, scale: float) -> np.ndarray:
    """1 while ``error <= tolerance``, then a smooth exponential decay with the given scale."""
    return np.exp(-np.maximum(error - tolerance, 0.0) / scale)


def _as_array(videos: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(videos, torch.Tensor):
        videos = videos.detach().cpu().float().numpy()
    return np.asarray(videos, dtype=np.float32)


def _validate(videos: np.ndarray, n_prompts: int, cfg: WorldConfig, name: str) -> None:
    expected = "(B, " + ", ".join(map(str, cfg.video_shape)) + ")"
    if videos.ndim != 5 or videos.shape[1:] != cfg.video_shape:
        raise ValueError(f"{name} must have shape (B, 3, F, H, W) = {expected} for this WorldConfig, got {tuple(videos.shape)}")
    if videos.shape[0] != n_prompts or n_prompts == 0:
        raise ValueError(
            f"{name} holds {videos.shape[0]} videos but {n_prompts} prompts were given; "
            f"need one prompt per video and at least one video"
        )


def _detect(videos: np.ndarray, prompts: list[str], cfg: WorldConfig) -> _Detections:
    """Run the per-frame detectors on (B, 3, F, H, W) videos in [-1, 1] and score each video."""
    b, _, f, h, w = videos.shape
    n = b * f
    rgb = np.clip((np.nan_to_num(videos) + 1.0) / 2.0, 0.0, 1.0)
    rgb = rgb.transpose(0, 2, 1, 3, 4).reshape(n, 3, h, w)
    bright = rgb.max(axis=1)  # (N, H, W)

    # Connected components, labelled across all frames at once but never joined between frames.
    mask = bright > _FOREGROUND
    labels, count = ndimage.label(mask, structure=_IN_PLANE)
    area = np.bincount(labels.ravel(), minlength=count + 1)
    frame_of = np.zeros(count + 1, dtype=np.int64)
    frame_of[labels.ravel()] = np.repeat(np.arange(n), h * w)
    min_area = 0.5 * _SHAPE_AREA.min() * cfg.min_size**2
    max_area = 1.5 * (2 * cfg.max_size + 1) ** 2
    plausible = (area >= min_area) & (area <= max_area)
    plausible[0] = False
    n_plausible = np.bincount(frame_of[plausible], minlength=n)
    # The main object of a frame is its largest component (assignment in ascending-area order
    # leaves the largest label per frame); a frame is valid when that component is plausible.
    order = np.argsort(area[1:], kind="stable") + 1
    main = np.zeros(n, dtype=np.int64)
    main[frame_of[order]] = order
    valid = plausible[main]

    obj = (labels == main[:, None, None]) & valid[:, None, None]
    near = ndimage.binary_dilation(obj, structure=_IN_PLANE)
    halo = ndimage.binary_dilation(near, structure=_IN_PLANE)
    soft = bright * near
    soft_area = soft.sum(axis=(1, 2))
    safe_area = np.maximum(soft_area, 1e-6)
    cx = (soft.sum(axis=1) * (np.arange(w) + 0.5)).sum(axis=1) / safe_area
    cy = (soft.sum(axis=2) * (np.arange(h) + 0.5)).sum(axis=1) / safe_area
    # Fill ratio against the soft bounding box (sums of max-projections) separates the shapes.
    fill = soft_area / np.maximum(soft.max(axis=1).sum(axis=1) * soft.max(axis=2).sum(axis=1), 1e-6)
    frame_shape = np.abs(fill[:, None] - _FILL[None, :]).argmin(axis=1)
    colour = (rgb * obj[:, None]).sum(axis=(2, 3)) / np.maximum(obj.sum(axis=(1, 2)), 1)[:, None]
    colour /= np.maximum(colour.max(axis=1, keepdims=True), 1e-6)  # chromaticity, intensity-free

    # Edge width: intermediate-brightness pixels per boundary pixel. Anti-aliased edges of the
    # world stay below ~1.3; blur widens the transition and raises it.
    edge = obj & ~ndimage.binary_erosion(obj, structure=_IN_PLANE)
    mid = (bright > _MID[0]) & (bright < _MID[1]) & halo
    edge_width = mid.sum(axis=(1, 2)) / np.maximum(edge.sum(axis=(1, 2)), 1)
    outside = ~halo
    background = (bright * outside).sum(axis=(1, 2)) / np.maximum(outside.sum(axis=(1, 2)), 1)

    # Per video: (B, F) views of the per-frame measurements.
    valid = valid.reshape(b, f)
    weight = valid.astype(np.float64)
    n_valid = weight.sum(axis=1)
    detected = n_valid >= math.ceil(f / 2)
    safe_valid = np.maximum(n_valid, 1)
    t = np.arange(f, dtype=np.float64)
    track = np.stack([cx, cy], axis=-1).reshape(b, f, 2)
    # Weighted least-squares line through the valid frames' centroids.
    t_mean = (weight * t).sum(axis=1) / safe_valid
    dt = (t[None, :] - t_mean[:, None]) * weight
    p_mean = (weight[..., None] * track).sum(axis=1) / safe_valid[:, None]
    dp = (track - p_mean[:, None, :]) * weight[..., None]
    velocity = (dt[..., None] * dp).sum(axis=1) / np.maximum((dt * dt).sum(axis=1), 1e-6)[:, None]
    start = p_mean - t_mean[:, None] * velocity
    residual = dp - dt[..., None] * velocity[:, None, :]
    rms = np.sqrt((residual**2).sum(axis=(1, 2)) / safe_valid)

    def over_valid(x: np.ndarray) -> np.ndarray:
        return (x.reshape(b, f, -1) * weight[..., None]).sum(axis=1) / safe_valid[:, None]

    soft_area = soft_area.reshape(b, f)
    mean_area = over_valid(soft_area)[:, 0]
    area_cv = np.sqrt(over_valid((soft_area - mean_area[:, None]) ** 2)[:, 0]) / np.maximum(mean_area, 1e-6)
    mean_colour = over_valid(colour)
    colour_std = np.sqrt(over_valid((colour.reshape(b, f, 3) - mean_colour[:, None]) ** 2)).mean(axis=1)
    voted_shape = over_valid(np.eye(len(SHAPES))[frame_shape]).argmax(axis=1)

    attrs = [parse_prompt(p) for p in prompts]
    want_colour = np.array([a.colour_index for a in attrs])
    want_shape = np.array([a.shape_index for a in attrs])
    want_direction = np.array([a.direction_index for a in attrs])
    got_colour = ((mean_colour[:, None, :] - _PALETTE[None]) ** 2).sum(axis=-1).argmin(axis=1)
    got_direction = (velocity @ _UNITS.T).argmax(axis=1)
    moving = np.linalg.norm(velocity, axis=1) >= cfg.min_speed / 2

    scores = {
        "colour": detected & (got_colour == want_colour),
        "shape": detected & (voted_shape == want_shape),
        "direction": detected & moving & (got_direction == want_direction),
        "single_object": (n_plausible == 1).reshape(b, f).mean(axis=1),
        "background": _tolerant(background, 0.01, 0.1).reshape(b, f).mean(axis=1),
        "sharpness": (weight * _tolerant(edge_width, 1.5, 0.5).reshape(b, f)).mean(axis=1),
        "temporal": detected * _tolerant(area_cv, 0.02, 0.05) * _tolerant(colour_std, 0.02, 0.05),
        "smoothness": detected * _tolerant(rms, 0.1, 0.25),
    }
    scores = {k: v.astype(np.float64) for k, v in scores.items()}
    features = np.concatenate([start, velocity, np.sqrt(mean_area)[:, None]], axis=1)
    features[~detected] = np.nan
    return _Detections(detected=detected, scores=scores, features=features, shape=voted_shape)


def _ground_truth_features(batch: WorldBatch) -> np.ndarray:
    """Ground truth in the detector's conventions (area centroid, sqrt of area)."""
    shape = batch.shape.numpy()
    size = batch.size.double().numpy()
    start = batch.start.double().numpy().copy()
    start[:, 1] += _CENTROID_DY[shape] * size
    velocity = _UNITS[batch.direction.numpy()] * batch.speed.double().numpy()[:, None]
    return np.concatenate([start, velocity, (np.sqrt(_SHAPE_AREA[shape]) * size)[:, None]], axis=1)


def _frechet(gen: np.ndarray, ref: np.ndarray) -> float:
    """Frechet distance between Gaussian fits; ``inf`` when fewer than two generated videos were
    detected, ``nan`` when the reference is too small to fit a Gaussian.

    tr sqrtm(C_g C_r) is computed as the trace of the symmetric PSD matrix
    sqrtm(C_r^1/2 C_g C_r^1/2), which has the same eigenvalues: collapsed generators give singular
    covariances, where a general sqrtm warns and returns complex round-off.
    """
    if len(ref) < 2:
        return math.nan
    if len(gen) < 2:
        return math.inf
    mu_g, mu_r = gen.mean(axis=0), ref.mean(axis=0)
    cov_g, cov_r = np.cov(gen, rowvar=False), np.cov(ref, rowvar=False)
    evals, evecs = np.linalg.eigh(cov_r)
    root_r = (evecs * np.sqrt(np.clip(evals, 0.0, None))) @ evecs.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_r @ cov_g @ root_r), 0.0, None)).sum()
    value = ((mu_g - mu_r) ** 2).sum() + np.trace(cov_g) + np.trace(cov_r) - 2.0 * cross
    return float(max(value, 0.0))


def _pooled_variance(x: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, int]:
    """Within-group variance pooled over groups, and its degrees of freedom."""
    _, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    means = np.zeros((len(sizes), x.shape[1]))
    np.add.at(means, inverse, x)
    means /= sizes[:, None]
    dof = len(x) - len(sizes)
    return ((x - means[inverse]) ** 2).sum(axis=0) / max(dof, 1), dof


def _diversity_features(features: np.ndarray) -> np.ndarray:
    speed = np.linalg.norm(features[:, 2:4], axis=1, keepdims=True)
    return np.concatenate([features[:, :2], speed, features[:, 4:]], axis=1)


def _diversity(gen: np.ndarray, ref: np.ndarray, prompts: np.ndarray) -> float:
    """0 when fewer than two generated videos were detected, ``nan`` for a too-small reference."""
    gen_ok, ref_ok = ~np.isnan(gen).any(axis=1), ~np.isnan(ref).any(axis=1)
    if ref_ok.sum() < 2:
        return math.nan
    if gen_ok.sum() < 2:
        return 0.0
    gen_var, gen_dof = _pooled_variance(_diversity_features(gen[gen_ok]), prompts[gen_ok])
    ref_var, ref_dof = _pooled_variance(_diversity_features(ref[ref_ok]), prompts[ref_ok])
    if gen_dof == 0 or ref_dof == 0:
        gen_var = _diversity_features(gen[gen_ok]).var(axis=0, ddof=1)
        ref_var = _diversity_features(ref[ref_ok]).var(axis=0, ddof=1)
    return float(np.mean(gen_var / np.maximum(ref_var, 1e-12)))


def score_videos(
    videos: torch.Tensor | np.ndarray,
    prompts: list[str],
    reference_videos: torch.Tensor | np.ndarray | WorldBatch | None = None,
    cfg: WorldConfig = WorldConfig(),
    reference_seed: int = _REFERENCE_SEED,
) -> BenchmarkResult:
    """Score (B, 3, F, H, W) videos in [-1, 1] generated for ``prompts``.

    ``reference_videos`` must show the same prompts in the same order; by default it is a fresh
    world draw seeded with ``reference_seed``. Passing a ``WorldBatch`` lets ground truth stand in
    where the detector fails on a reference video.
    """
    array = _as_array(videos)
    _validate(array, len(prompts), cfg, "videos")
    if reference_videos is None:
        rng = torch.Generator().manual_seed(reference_seed)
        reference_videos = sample_videos(prompts, cfg, rng)
    if isinstance(reference_videos, WorldBatch):
        if reference_videos.prompts != list(prompts):
            raise ValueError("reference_videos.prompts must equal prompts (same order)")
        reference = reference_videos
        ref_array = _as_array(reference.videos)
    else:
        reference = None
        ref_array = _as_array(reference_videos)
    _validate(ref_array, len(prompts), cfg, "reference_videos")

    gen = _detect(array, prompts, cfg)
    ref = _detect(ref_array, prompts, cfg)
    ref_features = ref.features
    if reference is not None and not ref.detected.all():
        ref_features = np.where(ref.detected[:, None], ref_features, _ground_truth_features(reference))

    ref_ok = ~np.isnan(ref_features).any(axis=1)
    scale = np.maximum(ref_features[ref_ok].std(axis=0), 1e-6)
    gen_ok = gen.detected
    frechet = _frechet(gen.features[gen_ok] / scale, ref_features[ref_ok] / scale)
    diversity = _diversity(gen.features, ref_features, np.asarray(prompts))

    per_dimension = {k: float(v.mean()) for k, v in gen.scores.items()}
    quality = float(np.mean([per_dimension[k] for k in QUALITY_DIMS]))
    semantic = float(np.mean([per_dimension[k] for k in SEMANTIC_DIMS]))
    return BenchmarkResult(
        total=(4 * quality + semantic) / 5,
        quality=quality,
        semantic=semantic,
        frechet=frechet,
        diversity=diversity,
        detect_rate=float(gen.detected.mean()),
        per_dimension=per_dimension,
    )


def mean_video_baseline(prompts: list[str], cfg: WorldConfig, rng: torch.Generator, n_per_prompt: int) -> torch.Tensor:
    """Per-prompt average of ``n_per_prompt`` world videos: the blur a regression-to-the-mean
    student produces. Returns one video per entry of ``prompts`` (repeats share their average)."""
    unique = list(dict.fromkeys(prompts))
    batch = sample_videos([p for p in unique for _ in range(n_per_prompt)], cfg, rng)
    means = batch.videos.view(len(unique), n_per_prompt, *cfg.video_shape).mean(dim=1)
    return means[[unique.index(p) for p in prompts]]


def format_table(rows: list[dict]) -> str:
    """Aligned plain-text table; columns are the union of keys in first-seen order."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if math.isfinite(value) else str(value)
        return "" if value is None else str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    numeric = [all(isinstance(row.get(c), (int, float)) for row in rows if c in row) for c in columns]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(s.rjust(wd) if num else s.ljust(wd) for s, wd, num in zip(cells, widths, numeric)).rstrip()

    rule = "  ".join("-" * wd for wd in widths)
    return "\n".join([line(columns), rule, *(line(r) for r in body)])
