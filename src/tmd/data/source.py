"""What the trainer draws its batches from: the ``DataSource`` protocol, and a source of generated batches.

The data kinds serve their batches through this protocol (prepared latents: ``tmd.data.prepare``'s
``PreparedDataset``; the synthetic world: a ``GeneratorDataSource``); its state is checkpointed with the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch


class DataSource(Protocol):
    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class GeneratorDataSource:
    """Batch i is ``fn(i, generator seeded from (seed, i))``: resuming only needs the index."""

    def __init__(self, fn: Callable[[int, torch.Generator], Any], seed: int, device: str | torch.device = "cpu"):
        self.fn = fn
        self.seed = seed
        self.device = torch.device(device)
        self.index = 0

    def next_batch(self) -> Any:
        # SeedSequence mixes (seed, i) so neighbouring batches get unrelated streams.
        mixed = int(np.random.SeedSequence([self.seed, self.index]).generate_state(1, np.uint64)[0])
        batch = self.fn(self.index, torch.Generator(self.device).manual_seed(mixed))
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"checkpoint was written with data seed {state['seed']}, this source has {self.seed}")
        self.index = state["index"]
