"""Procedural text-to-video world with exact ground truth.

No pretrained weights or datasets can be downloaded here, so distillation is studied on a world
whose true conditional distribution is known: each prompt ``"a {colour} {shape} moving
{direction}"`` describes one saturated-colour object on a black background that moves in a straight
line at constant speed. What the prompt does *not* say (start position, size, speed) is random,
so a rng must keep that diversity and cannot score well by regressing to the mean.

Videos are 8 frames of 32x32 because training runs on CPU: a Wan-style transformer's cost is
dominated by its token count, and a small video autoencoder compresses 3x8x32x32 to a 64-token
latent, which keeps teacher training and distillation to minutes.

Rendering is anti-aliased so the benchmark can demand sharp edges and sub-pixel-smooth motion from
generators: every shape is, column by column, a single vertical interval, so each pixel's coverage
is computed exactly in y and over ``supersample`` sub-columns in x (exact at vertical edges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# (dx, dy) in image coordinates: x to the right, y down.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
BACKGROUND = -1.0  # black, in the [-1, 1] video range
GRAMMAR = "a {colour} {shape} moving {direction}"

_COLOUR_NAMES = tuple(COLOURS)
_DIRECTION_NAMES = tuple(DIRECTIONS)


@dataclass(frozen=True)
class Attributes:
    """The discrete content of a prompt, by name and by index into the world's tables."""

    colour: str
    shape: str
    direction: str

    @property
    def colour_index(self) -> int:
        return _COLOUR_NAMES.index(self.colour)

    @property
    def shape_index(self) -> int:
        return SHAPES.index(self.shape)

    @property
    def direction_index(self) -> int:
        return _DIRECTION_NAMES.index(self.direction)

    @property
    def prompt(self) -> str:
        return GRAMMAR.format(colour=self.colour, shape=self.shape, direction=self.direction)


def all_prompts() -> list[str]:
    """All 72 prompts, colour-major then shape then direction (a stable order for tables/tests)."""
    return [GRAMMAR.format(colour=c, shape=s, direction=d) for c in _COLOUR_NAMES for s in SHAPES for d in _DIRECTION_NAMES]


def world_vocabulary() -> list[str]:
    """Every word a prompt can contain, sorted, so a tokenizer can be built without the data."""
    return sorted({"a", "moving", *_COLOUR_NAMES, *SHAPES, *_DIRECTION_NAMES})


def parse_prompt(text: str) -> Attributes:
    """Parse a prompt, ignoring case and extra spaces; errors name the grammar and valid words."""
    words = text.strip().lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"prompt {text!r} does not match the grammar {GRAMMAR!r}")
    colour, shape, direction = words[1], words[2], words[4]
    for slot, word, valid in (
        ("colour", colour, _COLOUR_NAMES),
        ("shape", shape, SHAPES),
        ("direction", direction, _DIRECTION_NAMES),
    ):
        if word not in valid:
            raise ValueError(f"prompt {text!r}: unknown {slot} {word!r}; expected one of {', '.join(valid)}")
    return Attributes(colour, shape, direction)


@dataclass(frozen=True)
class WorldConfig:
    """Video geometry and the ranges of the attributes a prompt leaves unspecified.

    ``min_size``/``max_size`` are the object's half-extent (circle radius, half the square's side,
    half the triangle's base and height) in pixels; speeds are pixels per frame.
    """

    frames: int = 8
    height: int = 32
    width: int = 32
    min_size: float = 4.0
    max_size: float = 7.0
    min_speed: float = 1.0
    max_speed: float = 2.0
    supersample: int = 4

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(f"frames must be >= 2 to show motion, got {self.frames}")
        if self.height < 4 or self.width < 4:
            raise ValueError(f"height and width must be >= 4, got {self.height}x{self.width}")
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got min_size={self.min_size}, max_size={self.max_size}")
        if not 0 < self.min_speed <= self.max_speed:
            raise ValueError(f"need 0 < min_speed <= max_speed, got min_speed={self.min_speed}, max_speed={self.max_speed}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")
        extent = 2 * self.max_size + self.max_speed * (self.frames - 1)
        if extent > min(self.height, self.width):
            raise ValueError(
                f"the largest object (2*max_size={2 * self.max_size:g} px) plus its longest path "
                f"(max_speed*(frames-1)={self.max_speed * (self.frames - 1):g} px) spans "
                f"{extent:g} px, which does not fit in a {self.height}x{self.width} frame"
            )

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of one video."""
        return (3, self.frames, self.height, self.width)


@dataclass
class WorldBatch:
    """Videos plus the ground truth behind them (indices into COLOURS, SHAPES, DIRECTIONS)."""

    videos: torch.Tensor  # (B, 3, F, H, W) float32 in [-1, 1]
    prompts: list[str]
    colour: torch.Tensor  # (B,) long
    shape: torch.Tensor  # (B,) long
    direction: torch.Tensor  # (B,) long
    start: torch.Tensor  # (B, 2) object centre (x, y) at frame 0, pixels
    size: torch.Tensor  # (B,) half-extent, pixels
    speed: torch.Tensor  # (B,) pixels per frame
    trajectory: torch.Tensor  # (B, F, 2) object centre (x, y) per frame

    def __len__(self) -> int:
        return len(self.prompts)


def random_prompts(n: int, rng: torch.Generator) -> list[str]:
    """``n`` prompts drawn uniformly (with replacement) from ``all_prompts()``."""
    prompts = all_prompts()
    idx = torch.randint(len(prompts), (n,), generator=rng)
    return [prompts[i] for i in idx.tolist()]


def _uniform(n: int, low: float, high: float, rng: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=rng, dtype=torch.float64)


def sample_videos(prompts: list[str], cfg: WorldConfig, rng: torch.Generator) -> WorldBatch:
    """One video per prompt; start, size and speed are random; the object never leaves the frame."""
    attrs = [parse_prompt(p) for p in prompts]
    b = len(attrs)
    colour = torch.tensor([a.colour_index for a in attrs], dtype=torch.long)
    shape = torch.tensor([a.shape_index for a in attrs], dtype=torch.long)
    direction = torch.tensor([a.direction_index for a in attrs], dtype=torch.long)

    size = _uniform(b, cfg.min_size, cfg.max_size, rng)
    speed = _uniform(b, cfg.min_speed, cfg.max_speed, rng)
    unit = torch.tensor(list(DIRECTIONS.values()), dtype=torch.float64)[direction]  # (B, 2)
    travel = (speed * (cfg.frames - 1))[:, None] * unit  # (B, 2) displacement frame 0 -> last
    # The centre must stay in [size, extent - size] on both axes at both ends of the path.
    extent = torch.tensor([cfg.width, cfg.height], dtype=torch.float64)
    low = size[:, None] - travel.clamp(max=0)
    high = extent - size[:, None] - travel.clamp(min=0)
    start = low + (high - low) * torch.rand(b, 2, generator=rng, dtype=torch.float64)
    t = torch.arange(cfg.frames, dtype=torch.float64)
    trajectory = start[:, None, :] + (t[None, :, None] * speed[:, None, None]) * unit[:, None, :]

    rgb = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[colour]  # (B, 3)
    f = cfg.frames
    cover = _coverage(
        trajectory.reshape(-1, 2).float(),
        size.float().repeat_interleave(f),
        shape.repeat_interleave(f),
        cfg,
    ).view(b, 1, f, cfg.height, cfg.width)
    videos = (cover * ((1.0 - BACKGROUND) * rgb[:, :, None, None, None])).add_(BACKGROUND)
    return WorldBatch(
        videos=videos,
        prompts=list(prompts),
        colour=colour,
        shape=shape,
        direction=direction,
        start=start.float(),
        size=size.float(),
        speed=speed.float(),
        trajectory=trajectory.float(),
    )


def _coverage(centre: torch.Tensor, size: torch.Tensor, shape: torch.Tensor, cfg: WorldConfig) -> torch.Tensor:
    """Fraction of each pixel covered by the object, (N, H, W); pixel j spans [j, j+1].

    Work is confined to a KxK window that holds the largest object, which is what makes rendering
    a thousand videos take a fraction of a second on CPU.
    """
    n, s, h, w = len(size), cfg.supersample, cfg.height, cfg.width
    k = min(math.ceil(2 * cfg.max_size) + 1, h, w)
    x0 = torch.floor(centre[:, 0] - size).clamp(0, w - k).long()
    y0 = torch.floor(centre[:, 1] - size).clamp(0, h - k).long()
    # Sub-column c spans [left, left + 1/s]; only the part inside |x - cx| <= r counts, which
    # makes vertical edges exact rather than quantised to 1/s.
    left = x0[:, None] + torch.arange(k * s, dtype=torch.float32) / s  # (N, K*s)
    cx, cy, r = centre[:, :1], centre[:, 1:], size[:, None]
    lo = torch.maximum(left, cx - r)
    hi = torch.minimum(left + 1.0 / s, cx + r)
    weight = ((hi - lo) * s).clamp(0, 1)
    dx = ((lo + hi) / 2 - cx).abs().clamp(max=r)
    half = torch.sqrt((r * r - dx * dx).clamp(min=0))
    kind = shape[:, None]
    circle = kind == SHAPES.index("circle")
    square = kind == SHAPES.index("square")
    top = torch.where(circle, cy - half, torch.where(square, cy - r, cy - r + 2 * dx))
    bottom = torch.where(circle, cy + half, cy + r)
    rows = (y0[:, None] + torch.arange(k))[:, :, None].float()  # (N, K, 1)
    overlap = torch.minimum(bottom[:, None, :], rows + 1) - torch.maximum(top[:, None, :], rows)
    window = (overlap.clamp_(0, 1) * weight[:, None, :]).view(n, k, k, s).mean(-1)
    index = (y0[:, None, None] + torch.arange(k)[None, :, None]) * w + (x0[:, None, None] + torch.arange(k)[None, None, :])
    frame = torch.zeros(n, h * w)
    frame.scatter_(1, index.view(n, -1), window.view(n, -1))
    return frame.view(n, h, w)
