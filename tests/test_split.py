import pytest
import torch

from tmd.flow import T_MAX
from tmd.models.split import TMDStudent
from tmd.models.wan import load_teacher


@pytest.mark.parametrize("fusion", ["gated", "concat"])
@pytest.mark.parametrize("head_blocks", [1, 3])
def test_student_equals_teacher_at_init(tiny_teacher, tiny_inputs, fusion, head_blocks):
    x, text, _ = tiny_inputs
    student = TMDStudent.from_teacher(tiny_teacher, head_blocks=head_blocks, fusion=fusion)
    features = student.backbone(x, T_MAX, text)
    y1 = torch.randn_like(x)
    for r in (T_MAX, 0.5, 0.0):
        y_hat = student.head(y1, T_MAX, r, features)
        torch.testing.assert_close(y_hat, tiny_teacher.velocity(x, T_MAX, text), rtol=1e-6, atol=1e-6)


def test_student_is_a_copy_and_all_new_parts_learn(tiny_teacher, tiny_inputs):
    x, text, _ = tiny_inputs
    student = TMDStudent.from_teacher(tiny_teacher, head_blocks=2)
    assert student.transformer is not tiny_teacher.transformer
    features = student.backbone(x, 0.7, text)
    y = student.head(torch.randn_like(x), 0.6, 0.2, features)
    y.square().mean().backward()
    # zero-initialised parts get a gradient on the first step, so training can move them
    assert student.fusion.proj.weight.grad.abs().sum() > 0
    assert student.gap_embedder.linear_2.weight.grad.abs().sum() > 0
    # an output bias would cancel in gap_embedding: a trained parameter with a zero gradient by construction
    assert student.gap_embedder.linear_2.bias is None
    assert student.transformer.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_teacher.parameters())
    # the inner block sits behind the zero fusion projection: it learns once that has moved
    with torch.no_grad():
        student.fusion.proj.weight.normal_(std=0.1)
    student.zero_grad()
    student.head(torch.randn_like(x), 0.6, 0.2, student.backbone(x, 0.7, text)).square().mean().backward()
    assert student.inner_block.modulation.weight.grad.abs().sum() > 0


def test_head_depends_on_inner_state_after_training_moves_gate(tiny_teacher, tiny_inputs):
    x, text, _ = tiny_inputs
    student = TMDStudent.from_teacher(tiny_teacher, head_blocks=1)
    with torch.no_grad():
        student.fusion.proj.weight.normal_(std=0.1)
    features = student.backbone(x, 0.7, text)
    a = student.head(torch.randn_like(x), 0.6, 0.2, features)
    b = student.head(torch.randn_like(x), 0.6, 0.2, features)
    assert not torch.allclose(a, b)


def test_split_errors(tiny_teacher, tiny_inputs):
    with pytest.raises(ValueError, match=r"head_blocks must be in \[1, 3\] for a teacher with 4 blocks, got 4"):
        TMDStudent.from_teacher(tiny_teacher, head_blocks=4)
    with pytest.raises(ValueError, match="unknown fusion"):
        TMDStudent.from_teacher(tiny_teacher, head_blocks=1, fusion="sum")
    x, text, _ = tiny_inputs
    student = TMDStudent.from_teacher(tiny_teacher, head_blocks=1)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        student.backbone(x[..., :7], 0.5, text)
    features = student.backbone(x, 0.5, text)
    with pytest.raises(ValueError, match="inner state of shape"):
        student.head(x[:1], 0.5, 0.0, features)


def test_student_of_a_frozen_teacher_trains(tiny_inputs):
    teacher = load_teacher("tiny").requires_grad_(False)
    student = TMDStudent.from_teacher(teacher, head_blocks=1)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
