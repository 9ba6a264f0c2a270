import pytest

from tmd.methods import get_method
from tmd.models.wan import load_teacher
from tmd.train.memory import EMA_BYTES, GIB, TRAINABLE_BYTES, describe, estimate_state_memory


def test_estimate_counts_teacher_trainable_and_ema():
    tiny_teacher = load_teacher("tiny")  # not the shared fixture: building a method freezes its teacher
    method = get_method("dmd2").from_teacher(get_method("dmd2").Config(gan_weight=0.0), tiny_teacher)
    n = sum(p.numel() for p in tiny_teacher.parameters())
    estimate = estimate_state_memory(method, tiny_teacher)
    # generator and fake score are teacher copies; the EMA follows the generator
    assert estimate["trainable"] == pytest.approx(2 * n * TRAINABLE_BYTES / GIB)
    assert estimate["ema"] == pytest.approx(n * EMA_BYTES / GIB)
    assert estimate["teacher"] == pytest.approx(n * 4 / GIB)
    halved = estimate_state_memory(method, tiny_teacher, world_size=2)
    assert halved["total"] == pytest.approx(estimate["total"] / 2)
    assert "activations come on top" in describe(estimate)


@pytest.mark.parametrize(
    "name",
    [
        "wan1.3b_tmd_stage1",
        "wan1.3b_tmd_stage2",
        "wan14b_tmd_stage1",
        "wan14b_tmd_stage2",
        "world_tmd_stage1",
        "world_tmd_stage2",
        "world_dmd2",
        "world_linvideo",
    ],
)
def test_shipped_run_configs_load(name, tmp_path):
    from tmd.config import RunConfig, load_config

    overrides = ["method.init_from=null"] if name.endswith("stage2") else []
    if name.startswith("wan"):
        overrides.append(f"data.path={tmp_path}")
    cfg = load_config(RunConfig, f"{name}.yaml", overrides)
    assert cfg.method_name in ("tm", "tmd", "dmd2", "linvideo")
    if name.startswith("wan"):
        # Table 7: batch 64, H = 5 (N2H5 of 30, N4H5 of 40), lr 1e-5 except 1.3B's stage 1 (3e-5)
        lr = 3e-5 if name == "wan1.3b_tmd_stage1" else 1e-5
        assert cfg.train.precision == "bf16" and cfg.train.lr == lr and cfg.method.head_blocks == 5
        assert cfg.train.batch_size == 64 and cfg.method.inner_velocity == "noise"
