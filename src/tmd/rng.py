"""Per-sample random draws that do not depend on how a batch is split over data-parallel ranks.

A data-parallel run must see exactly the noise a one-process run with the same global batch sees, or
"2 GPUs give the same losses as 1" cannot be tested and a resumed run could not change its number of
processes. So every rank keeps the *same* random state, draws for the whole global batch and keeps
its own rows. The price is ``world_size - 1`` local batches of extra noise per draw, negligible next to
a transformer pass; the gain is one random state, identical on all ranks, that any world size resumes.

Every training-time draw goes through a :class:`BatchRandom`; functions that also serve sampling accept
a plain ``torch.Generator`` (or None) and wrap it with :func:`as_batch_random`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
from torch import Tensor


class BatchRandom:
    """Draws for the local rows ``[rank * n, (rank + 1) * n)`` of a global batch of ``world_size * n``."""

    def __init__(self, source: torch.Generator | None = None, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.source = source
        """The torch generator every draw advances (the same state on every rank)."""
        self.rank = rank
        self.world_size = world_size

    def _rows(self, n: int, draw: Callable[[int], Tensor]) -> Tensor:
        if self.world_size == 1:
            return draw(n)
        return draw(n * self.world_size)[self.rank * n : (self.rank + 1) * n]

    def randn(self, shape: tuple[int, ...] | torch.Size, device=None) -> Tensor:
        """Standard normal float32 noise of ``shape``, whose first dimension is the local batch."""
        rest = tuple(shape[1:])
        return self._rows(shape[0], lambda n: torch.randn((n, *rest), generator=self.source, device=device, dtype=torch.float32))

    def rand(self, n: int, device=None) -> Tensor:
        """One U[0, 1) float32 value per local sample."""
        return self._rows(n, lambda m: torch.rand(m, generator=self.source, device=device, dtype=torch.float32))

    def randint(self, high: int, n: int, device=None) -> Tensor:
        """One integer in ``[0, high)`` per local sample."""
        return self._rows(n, lambda m: torch.randint(high, (m,), generator=self.source, device=device))

    def shared_randint(self, high: int, device=None) -> int:
        """One integer in ``[0, high)`` for the whole step, the same on every rank."""
        return int(torch.randint(high, (1,), generator=self.source, device=device))


Random = Union[BatchRandom, torch.Generator, None]


def as_batch_random(rng: Random) -> BatchRandom:
    return rng if isinstance(rng, BatchRandom) else BatchRandom(rng)
