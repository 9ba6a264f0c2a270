"""benchmarks/gpu_check.sh --tiny: the GPU check's every section, end to end on the CPU (about 25 s)."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["skipped"] == [] and result["meta"]["model"] == "tiny"
    variants = [row["variant"] for row in result["latency"]]
    assert variants == ["default (SDPA's choice)", "SDPA kernel: math", "compiled blocks (aot_eager), SDPA's choice"]
    default = result["latency"][0]
    for key in ("teacher_50x2_ms", "teacher_50x2_measured_ms", "tmd_2x2_ms", "dmd2_2step_ms"):
        assert default[key] > 0, key
    assert [r["kernel"] for r in result["kernels"]] == ["sdpa", "math"]
    step = result["stage2_step"]
    assert step["generator_second_s"] > 0 and step["critic_second_s"] > 0
    assert set(step["grad_norms"]) == {"generator", "fake_score", "discriminator"}
    smoke = result["fsdp_smoke"]
    assert smoke["ok"] and len(smoke["losses"]) == 2 and "loss/generator" in smoke["losses"][0]
    assert not (tmp_path / "fsdp_smoke_work").exists()  # the smoke run's files are removed
    table = (tmp_path / "gpu_check.md").read_text()
    assert "## Latency per video (ms)" in table and "FSDP2 smoke run" in table and "ok: return code 0" in table
