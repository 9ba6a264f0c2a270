import pytest
import torch
from mog import MLPVelocity

from tmd.models.fastpath import ATTENTION_KERNELS, attention_kernel, compile_blocks
from tmd.models.split import TMDStudent
from tmd.models.wan import load_teacher


@torch.no_grad()
def test_attention_kernels_agree_and_bad_names_are_named(tiny_teacher, tiny_inputs):
    latents, text, _ = tiny_inputs
    reference = tiny_teacher.velocity(latents, 0.5, text)
    for name in ("sdpa", "flash", "math"):  # the kernels a CPU has
        with attention_kernel(name):
            torch.testing.assert_close(tiny_teacher.velocity(latents, 0.5, text), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention kernel 'flash3'; choose one of " + ", ".join(ATTENTION_KERNELS)):
        with attention_kernel("flash3"):
            pass


def test_compile_needs_transformer_blocks():
    with pytest.raises(ValueError, match="MLPVelocity has no Wan transformer blocks"):
        compile_blocks(MLPVelocity(dim=2, cond_dim=2))


@pytest.mark.slow
@torch.no_grad()
def test_compiled_student_samples_like_eager(tiny_inputs):
    latents, text, _ = tiny_inputs
    student = TMDStudent.from_teacher(load_teacher("tiny", seed=0), head_blocks=1)
    features = student.backbone(latents, 0.5, text)
    eager = student.head(latents, 0.5, 0.25, features)
    compile_blocks(student)
    torch.testing.assert_close(
        student.head(latents, 0.5, 0.25, student.backbone(latents, 0.5, text)), eager, rtol=1e-4, atol=1e-4
    )
