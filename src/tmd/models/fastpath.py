"""Inference fast-path switches, each measurable on its own by ``tmd bench``: attention kernel, torch.compile.

bf16 is ``load_teacher(dtype=torch.bfloat16)`` (Wan's norms and embeddings stay fp32). Attention runs
through diffusers' dispatcher, so the kernel is chosen with its ``attention_backend`` context rather than
by patching the model; the names below are PyTorch's own SDPA kernels, which need no extra package.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads ATTENTION_KERNELS for its --help without importing torch
    from torch import nn

ATTENTION_KERNELS = {
    "sdpa": "native",  # PyTorch picks the kernel (flash where the shape and device allow)
    "flash": "_native_flash",
    "efficient": "_native_efficient",
    "cudnn": "_native_cudnn",
    "math": "_native_math",  # the unfused reference: softmax(QK^T)V materialised
}


@contextlib.contextmanager
def attention_kernel(name: str) -> Iterator[None]:
    """Run Wan attention with one SDPA kernel (``ATTENTION_KERNELS``) inside the block."""
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of {', '.join(ATTENTION_KERNELS)}")
    from diffusers.models.attention_dispatch import attention_backend

    with attention_backend(ATTENTION_KERNELS[name]):
        yield


def compile_blocks(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` every transformer block of ``model`` (and the TMD inner-state block) in place.

    Blocks, not the whole model: the TMD sampler calls backbone and head separately with the same block
    shapes, so per-block graphs are reused by both and by every inner step; shapes are static, so
    ``dynamic=False`` lets inductor specialise. ``backend="aot_eager"`` traces without generating code
    (a CPU smoke test of the compiled path in seconds rather than minutes).
    """
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from tmd.models.split import InnerStateBlock

    compiled = 0
    for module in model.modules():
        if isinstance(module, (WanTransformerBlock, InnerStateBlock)):
            module.compile(dynamic=False, backend=backend)
            compiled += 1
    if compiled == 0:
        raise ValueError(f"{type(model).__name__} has no Wan transformer blocks to compile")
    return model
