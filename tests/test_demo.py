"""`tmd train` and `tmd demo` end to end on tiny world assets built by `tmd train-teacher` in a temp folder."""

import json

import pytest
from safetensors.torch import load_file

from tmd.programs.cli import main
from tmd.programs.demo import PRESETS, Preset, run_demo


def test_train_stage1_then_stage2_from_its_export(tiny_assets, tmp_path):
    common = [f"data.assets={tiny_assets}", "train.steps=2", "train.batch_size=2", "train.progress=false", "method.head_blocks=1"]
    stage1 = tmp_path / "stage1"
    assert main(["train", "--config", "world_tmd_stage1.yaml", *common, f"train.out_dir={stage1}"]) == 0
    weights = load_file(str(stage1 / "student.safetensors"))
    assert "fusion.gate_logit" in weights and (stage1 / "config.yaml").is_file()

    stage2 = tmp_path / "stage2"
    args = [*common, f"train.out_dir={stage2}", f"method.init_from={stage1 / 'student.safetensors'}", "method.generator_every=2"]
    assert main(["train", "--config", "world_tmd_stage2.yaml", *args]) == 0
    assert (stage2 / "student.safetensors").is_file()
    records = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/generator", "loss/fake_score", "loss/discriminator"} <= set(records[-1])


def test_stage2_rejects_weights_of_another_split(tiny_assets, tmp_path, capsys):
    stage1 = tmp_path / "stage1"
    common = [f"data.assets={tiny_assets}", "train.steps=1", "train.batch_size=2", "train.progress=false"]
    assert main(["train", "--config", "world_tmd_stage1.yaml", *common, "method.head_blocks=1", f"train.out_dir={stage1}"]) == 0
    args = [
        *common,
        "method.head_blocks=2",
        f"method.init_from={stage1 / 'student.safetensors'}",
        f"train.out_dir={tmp_path / 's2'}",
    ]
    # parameter names are the same for every H: the export's metadata is what tells the splits apart
    assert main(["train", "--config", "world_tmd_stage2.yaml", *args]) == 2
    assert "was trained with head_blocks=1, this student has head_blocks=2" in capsys.readouterr().err
    assert main(["train", "--config", "world_tmd_stage2.yaml", *common, "method.init_from=/nope.safetensors"]) == 2
    assert "no student weights at /nope.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("methods", ["default", pytest.param("all", marks=pytest.mark.slow)])
def test_demo_writes_the_report(tiny_assets, tmp_path, monkeypatch, methods):
    monkeypatch.setitem(
        PRESETS,
        "micro",
        Preset(
            stage1_steps=2, stage2_steps=2, batch_size=2, head_blocks=1, teacher_steps=(3, 1), eval_seeds=1, generator_every=2
        ),
    )
    report = run_demo(tmp_path, "micro", str(tiny_assets), progress=False, methods=methods)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rows"] == report["rows"]
    samplers = {(r["method"], r["outer_steps"], r["inner_steps"]) for r in saved["rows"]}
    # the paper's Table 1 rows: DMD2-v at 1, 2 and 3 steps, TMD-N2 and TMD-N4 at M = 1 and 2, each its own student
    assert {("teacher", 3, None), ("dmd2", 1, None), ("dmd2", 2, None), ("dmd2", 3, None)} <= samplers
    assert {("tmd", m, n) for m in (1, 2) for n in (2, 4)} <= samplers
    assert {f"tmd_m{m}n{n}_stage{k}" for m in (1, 2) for n in (2, 4) for k in (1, 2)} | {"dmd2_m1", "dmd2_m3"} <= set(
        report["timings_s"]
    )
    if methods == "all":
        assert set(report["methods"]) == {
            "tmd",
            "dmd2",
            "decoupled_dmd",
            "phased_dmd",
            "tdm",
            "mdt_dist",
            "meanflow",
            "linvideo",
            "rcm",
            "anyflow",
        }
        assert ("phased_dmd", 2, None) in samplers and ("meanflow", 1, None) in samplers and ("linvideo", 8, None) in samplers
        assert {("rcm", 1, None), ("rcm", 2, None), ("rcm", 4, None)} <= samplers
        assert {("anyflow", steps, None) for steps in (1, 2, 4)} <= samplers  # one AnyFlow student at three step counts
        # TMD-N2 at M = 2 of the linearised teacher, after its own two stages
        assert ("linvideo_tmd", 2, 2) in samplers
        assert {"linvideo", "linvideo_tmd_stage1", "linvideo_tmd_stage2"} <= set(report["timings_s"])
        assert "Linearised teacher + TMD, M=" in (tmp_path / "report.md").read_text()
    for row in saved["rows"]:
        for key in ("effective_nfe", "latency_ms", "total", "quality", "semantic", "frechet", "diversity"):
            assert isinstance(row[key], float), key
    teacher = next(r for r in saved["rows"] if r["method"] == "teacher" and r["outer_steps"] == 3)
    assert teacher["effective_nfe"] == 6.0
    tmd = next(r for r in saved["rows"] if r["method"] == "tmd" and r["outer_steps"] == 2 and r["inner_steps"] == 4)
    assert tmd["effective_nfe"] == pytest.approx(2 * (1 + 3 * 1 / 3))
    text = (tmp_path / "report.md").read_text()
    assert "## What it shows" in text and "Target (TMD M=2" in text
    assert (tmp_path / "quality_vs_cost.png").stat().st_size > 1000 and (tmp_path / "samples.gif").stat().st_size > 1000
