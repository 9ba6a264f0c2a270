import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tmd.eval import flops
from tmd.models.split import TMDStudent
from tmd.models.wan import WAN_1_3B_CONFIG, WAN_1_3B_LATENT
from tmd.programs.bench import BenchSettings, format_report, run_bench

LATENT = (4, 2, 8, 8)
TEXT_LEN = 5


def counted(fn) -> int:
    """FLOPs torch counts; the math SDPA backend makes attention visible as bmm (the CPU flash kernel is not counted)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("head_blocks", [1, 3])
def test_flop_model_matches_the_counter(tiny_teacher, head_blocks):
    config = dict(tiny_teacher.config)
    batch = 2
    x = torch.randn(batch, *LATENT)
    text = torch.randn(batch, TEXT_LEN, config["text_dim"])
    student = TMDStudent.from_teacher(tiny_teacher, head_blocks=head_blocks)
    features = student.backbone(x, 0.5, text)
    cases = [
        (lambda: tiny_teacher.velocity(x, 0.5, text), flops.forward_flops(config, LATENT, TEXT_LEN)),
        (lambda: student.backbone(x, 0.5, text), flops.backbone_flops(config, LATENT, TEXT_LEN, head_blocks)),
        (lambda: student.head(x, 0.5, 0.25, features), flops.head_flops(config, LATENT, TEXT_LEN, head_blocks)),
    ]
    for fn, predicted in cases:
        assert batch * predicted == pytest.approx(counted(fn), rel=0.01)


def test_flop_model_of_wan_1_3b_is_attention_bound():
    """At 32760 tokens the n^2 attention terms make a block several times its projections and FFN."""
    n = flops.tokens(WAN_1_3B_CONFIG, WAN_1_3B_LATENT)
    assert n == 21 * 30 * 52
    forward = flops.forward_flops(WAN_1_3B_CONFIG, WAN_1_3B_LATENT, 512)
    assert 1e14 < forward < 1e15  # ~0.3 PFLOP per sample per forward
    attention = 30 * 4 * n * n * 1536
    assert 0.6 < attention / forward < 0.8


def test_run_bench_on_the_tiny_model():
    result = run_bench(BenchSettings(model="tiny", latent=LATENT, batch=2, repeats=1, warmup=0, quick=True, fast_path=True))
    expected = {
        "sampling": {"sampler", "eff_nfe", "nfe_speedup", "flop_speedup", "ms", "speedup", "measured/nfe", "tflop/s", "peak_mib"},
        "components": {"part", "nfe_cost", "flop_cost", "measured_cost", "ms", "tflop/s"},
        "training": {"step", "ms", "peak_mib"},
        "generator_step": {"head_blocks", "inner_steps", "tmd_ms", "dmd2_ms", "ratio"},
        "scaling": {"latent", "tokens", "forward_ms", "tmd2x4_ms", "forward_growth", "tmd2x4_growth"},
    }
    for table, keys in expected.items():
        assert result[table], table
        for row in result[table]:
            assert keys <= set(row), (table, keys - set(row))
            assert all(row[k] > 0 for k in keys if k.endswith("ms")), row
    samplers = [row["sampler"] for row in result["sampling"]]
    assert samplers[0].startswith("teacher 50x2") and "tmd 2x4 (H=1)" in samplers
    assert [row["step"] for row in result["training"]][0] == "tm"
    assert result["scaling"][1]["tokens"] == 2 * result["scaling"][0]["tokens"]
    assert result["meta"]["weights"] == "random"
    assert "teacher 50x2" in format_report(result)
    variants = {row["variant"]: row for row in result["fast_path"]}
    assert list(variants) == ["float32 eager, sdpa (PyTorch's choice)", "float32 eager, math kernel", "bfloat16 eager, sdpa"]
    assert variants["float32 eager, sdpa (PyTorch's choice)"]["tmd2x4_speedup"] == 1.0
    assert all(row["forward_ms"] > 0 and row["tmd2x4_ms"] > 0 for row in variants.values())
    assert "Fast path" in format_report(result)
    assert result["generator_step"][0]["head_blocks"] == "1/4" and "under 17% extra" in format_report(result)
    only = run_bench(BenchSettings(model="tiny", latent=LATENT, batch=2, repeats=1, warmup=0, generator_step_only=True))
    assert set(only) == {"meta", "generator_step"} and only["generator_step"][0]["ratio"] > 0


def test_wan_1_3b_is_refused_on_cpu():
    with pytest.raises(ValueError, match="GPU"):
        run_bench(BenchSettings(model="wan1.3b", device="cpu"))
