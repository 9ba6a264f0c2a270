"""Data-parallel training with FSDP2: the process group, sharding of the method's modules, batch slicing.

Launched by ``torchrun`` every rank trains on its slice of the global batch ``train.batch_size`` (one
torchrun process shards over itself: FSDP2's bf16 policy and wrapping, with nothing to split); without
torchrun, the same code runs as one process and nothing here costs anything. Sharding is ``fully_shard`` (FSDP2) on every block of every ``nn.ModuleList`` (transformer
blocks, discriminator heads), then on the model itself, so a rank holds ``1 / world_size`` of each
weight, gradient and AdamW state between uses. The frozen teacher is sharded the same way and gets no
optimizer state and no gradients.

Our models are not only called through ``forward``: the TMD student has ``backbone`` and ``head``, the
teacher ``velocity_and_features``. A model lists those in ``fsdp_entry_points`` and they are registered
with FSDP so that calling them gathers the model's own (non-block) weights, exactly as ``forward`` would.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tmd.models.wan import CHECKPOINT_INPUT_DTYPE


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized: bool = False
    """A process group exists (launched by torchrun, even with one process): the modules are FSDP2-sharded."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: Mapping[str, float]) -> dict[str, float]:
        """The mean of each value over ranks (one collective for all of them)."""
        if not self.enabled or not values:
            return dict(values)
        stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(stacked)
        return dict(zip(values, (stacked / self.world_size).tolist()))

    @property
    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    # torchrun sets TORCHELASTIC_RUN_ID for every process, so a 1-process torchrun runs the FSDP2 path too
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> DistContext:
    """The process group torchrun asked for (NCCL on CUDA, gloo on CPU), or a one-process context."""
    if not launched_by_torchrun():
        return DistContext(device=device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return DistContext(dist.get_rank(), dist.get_world_size(), device, initialized=True)


def check_global_batch(batch_size: int, ctx: DistContext, grad_accum: int = 1) -> int:
    """The micro-batch: the global ``train.batch_size`` split evenly over the ranks and their
    ``train.grad_accum`` micro-batches."""
    parts = ctx.world_size * grad_accum
    if batch_size % parts:
        into = "" if grad_accum == 1 else f" into train.grad_accum={grad_accum} micro-batches on each of"
        raise ValueError(
            f"train.batch_size={batch_size} is the global batch and must divide evenly{into or ' over'} "
            f"{ctx.world_size} processes; use a multiple of {parts}"
        )
    return batch_size // parts


def shard_model(module: nn.Module, mesh, mixed_precision: bool) -> nn.Module:
    """``fully_shard`` each block of each outermost ``nn.ModuleList`` in ``module``, then ``module``; in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # bf16 weights in compute, fp32 gradient reduction: the recipe of FastVideo and torchtitan
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    sharded: list[str] = []
    for name, sub in list(module.named_modules()):
        # only the outermost lists: a transformer block holds small ModuleLists of its own (to_out, ffn.net)
        if isinstance(sub, nn.ModuleList) and not any(name.startswith(f"{outer}.") for outer in sharded):
            for index, block in enumerate(sub):
                fully_shard(block, mesh=mesh, mp_policy=policy)
                if policy.param_dtype is not None:
                    setattr(block, CHECKPOINT_INPUT_DTYPE, policy.param_dtype)
                sharded.append(f"{name}.{index}")
    fully_shard(module, mesh=mesh, mp_policy=policy)
    for name in getattr(module, "fsdp_entry_points", ()):
        register_fsdp_forward_method(module, name)
    return module


def shard_modules(modules: Mapping[str, nn.Module], ctx: DistContext, mixed_precision: bool) -> None:
    """Shard every module of a run (state modules and the frozen teacher) when torchrun launched it."""
    if not ctx.initialized:
        return
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,), mesh_dim_names=("data_parallel",))
    seen: set[int] = set()
    for module in modules.values():
        if id(module) not in seen:
            seen.add(id(module))
            shard_model(module.to(ctx.device), mesh, mixed_precision)


def slice_batch(batch: Any, rank: int, world_size: int, global_size: int) -> Any:
    """Rank ``rank``'s rows of a global batch: every tensor or list whose length is ``global_size``.

    Entries of another length (a negative-prompt embedding stored once, a shape) are shared and kept.
    """
    local = global_size // world_size
    rows = slice(rank * local, (rank + 1) * local)
    if isinstance(batch, Tensor) and batch.ndim > 0 and batch.shape[0] == global_size:
        return batch[rows]
    if isinstance(batch, list) and len(batch) == global_size:
        return batch[rows]
    if isinstance(batch, Mapping):
        return type(batch)({k: slice_batch(v, rank, world_size, global_size) for k, v in batch.items()})
    return batch


def gather_full(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Plain CPU tensors from a state dict whose entries may be sharded DTensors (a collective)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in tensors.items()}
