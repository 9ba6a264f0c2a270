"""`tmd study`: keys, resuming, the statistics, the report from records alone, and evaluation during training."""

import copy
import json
import math
import re
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tmd.config import ConfigError, RunConfig, from_dict
from tmd.eval.stats import paired_difference, t_interval, variance_components
from tmd.programs.cli import main
from tmd.programs.study import datasets as datasets_module
from tmd.programs.study import schedule as study_module
from tmd.programs.study.plan import plan, select, tasks
from tmd.programs.study.spec import StudyConfig, load_study


def tiny_study(assets, report_dir, **changes) -> dict:
    train = {"steps": 2, "batch_size": 2, "log_every": 1, "device": "cpu", "tensorboard": False}
    data = {
        "name": "tiny",
        "seeds": [0, 1],
        "eval": {"noise_seeds": [0, 1]},
        "report_dir": str(report_dir),
        "base": {"data_kind": "world", "data": {"assets": str(assets)}, "method": {"guidance": 3.0}, "train": train},
        "runs": {
            "teacher": {"method": "teacher", "score": [[2, None], [1, None]]},
            "dmd2": {"method": "dmd2", "config": {"method": {"outer_steps": 1, "generator_every": 2}}, "score": [[1, None]]},
            "stage1": {"method": "tm", "config": {"method": {"head_blocks": 1, "outer_steps": 1, "inner_steps": 2}}},
            "tmd": {
                "method": "tmd",
                "parent": "stage1",
                "label": "TMD 1x2",
                "config": {
                    "method": {"head_blocks": 1, "outer_steps": 1, "inner_steps": 2, "generator_every": 2},
                    "train": {"eval_every": 1, "eval_videos": 4},
                },
                "score": [[1, 2]],
            },
        },
        "paired": [{"a": "tmd", "b": "dmd2"}],
    }
    data.update(changes)
    return data


def write_study(tmp_path, data) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def study_args(tmp_path, path, *extra):
    return ["study", "--config", path, "--records", str(tmp_path / "records"), "--work", str(tmp_path / "work"), *extra]


def keys(data) -> dict:
    return {(r.name, r.seed): r.key for r in plan(from_dict(StudyConfig, copy.deepcopy(data)))}


# ---- statistics, against hand-computed values


def test_t_interval_and_paired_difference():
    interval = t_interval([1.0, 2.0, 3.0, 4.0])
    # sd 1.290994, t_{3, 0.975} = 3.182446: half width 3.182446 * 1.290994 / 2 = 2.054260
    assert interval.mean == 2.5 and interval.n == 4
    assert interval.low == pytest.approx(2.5 - 2.054260, abs=1e-6) and interval.high == pytest.approx(2.5 + 2.054260, abs=1e-6)
    assert t_interval([0.7]).as_list() == [None, None]
    diff = paired_difference({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 1.0, 2: 2.5, 3: 9.0})
    # differences 0.5, 1, 1.5 (seed 3 has no pair): sd 0.5, t_{2, 0.975} = 4.302653, half width 1.242069
    assert diff.seeds == [0, 1, 2] and diff.interval.mean == pytest.approx(1.0)
    assert diff.interval.as_list() == pytest.approx([1 - 1.242069, 1 + 1.242069], abs=1e-6)
    with pytest.raises(ValueError, match="no training seed in common"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_variance_components_recover_a_constructed_grid():
    # y_ij = a_i + b_j + c_i d_j with zero-sum a, b, c, d: row means a_i, column means b_j, residual c_i d_j exactly
    a, b, c, d = [-1.0, 0.0, 1.0], [-0.5, 0.5, -0.5, 0.5], [1.0, -2.0, 1.0], [0.1, -0.1, 0.1, -0.1]
    grid = [[a[i] + b[j] + c[i] * d[j] for j in range(4)] for i in range(3)]
    v = variance_components(grid)
    # MS_rows = 4 * 2 / 2 = 4, MS_cols = 3 * 1 / 3 = 1, MS_residual = 6 * 0.04 / 6 = 0.04
    assert v.residual == pytest.approx(0.04)
    assert v.training == pytest.approx((4 - 0.04) / 4) and v.noise_shared == pytest.approx((1 - 0.04) / 3)
    assert v.training_share == pytest.approx(0.99 / (0.99 + 0.32 + 0.04))
    assert v.mean_variance == pytest.approx(0.99 / 3 + 0.04 / 12)
    assert v.mean_variance_new_noise == pytest.approx(0.99 / 3 + 0.32 / 4 + 0.04 / 12)
    # a grid with no training-seed effect clips the negative estimate to 0
    assert variance_components([[0.0, 1.0], [1.0, 0.0]]).training == 0.0
    teacher = variance_components([[0.1, 0.3, 0.2]])
    assert (teacher.training, teacher.residual) == (0.0, pytest.approx(0.01))


# ---- the study file and keys


def test_keys_are_stable_and_sensitive_to_what_the_record_depends_on(tiny_assets, tmp_path):
    data = tiny_study(tiny_assets, tmp_path)
    base = keys(data)
    assert base == keys(data) and len(set(base.values())) == len(base)
    assert base[("teacher", None)] and base[("tmd", 0)] != base[("tmd", 1)]

    def changed(edit) -> dict:
        other = copy.deepcopy(data)
        edit(other)
        return keys(other)

    # where a run is written and how it shows progress are not part of it
    same = changed(lambda d: d["base"]["train"].update(progress=False, checkpoint_every=7, tensorboard=True))
    assert same == base
    # a stage-1 setting changes stage 1 and, through the parent's key, every stage 2 built on it
    lr = changed(lambda d: d["runs"]["stage1"]["config"].setdefault("train", {}).update(lr=3e-4))
    assert (
        lr[("stage1", 0)] != base[("stage1", 0)] and lr[("tmd", 0)] != base[("tmd", 0)] and lr[("dmd2", 0)] == base[("dmd2", 0)]
    )
    noise = changed(lambda d: d["eval"].update(noise_seeds=[0, 1, 2]))
    assert all(noise[k] != base[k] for k in base)
    assert changed(lambda d: d.update(version=2))[("dmd2", 0)] != base[("dmd2", 0)]

    # two declared stage-1 runs with one config are one run: their stage 2s share it
    def twin(d):
        d["runs"]["stage1_again"] = copy.deepcopy(d["runs"]["stage1"])
        d["runs"]["tmd_again"] = {**copy.deepcopy(d["runs"]["tmd"]), "parent": "stage1_again", "score": [[1, 2]]}

    twins = changed(twin)
    assert twins[("stage1_again", 0)] == twins[("stage1", 0)] and twins[("tmd_again", 0)] == twins[("tmd", 0)]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["runs"]["dmd2"]["config"]["method"].update(outer_stpes=2), "did you mean 'method.outer_steps'"),
        (lambda d: d["runs"]["dmd2"].update(scores=[[1, None]]), "did you mean 'runs.dmd2.score'"),
        (lambda d: d["runs"]["tmd"].update(parent="nope"), "parent 'nope' is not a run"),
        (lambda d: d["runs"]["dmd2"]["config"].update(train={"seed": 3}), "may not set train.seed"),
        (lambda d: d.update(paired=[{"a": "teacher@2", "b": "dmd2"}]), "teacher row"),
        (lambda d: d["runs"]["dmd2"].update(method="dmd3"), "'dmd3' is not registered"),
        (lambda d: d["runs"]["dmd2"].update(data="teacher_data"), "data 'teacher_data' is not one of the study's datasets"),
        (lambda d: d["runs"]["teacher"].update(data="x"), "a teacher run takes only 'score'"),
        (lambda d: d.update(datasets={"x": {"videos_per_prompt": 0}}), "videos_per_prompt must be >= 1"),
        (
            lambda d: (
                d.update(datasets={"x": {"videos_per_prompt": 1}})
                or d["runs"]["dmd2"].update(data="x", config={"data_kind": "world"})
            ),
            "config may not set data_kind where 'data' names a dataset",
        ),
    ],
)
def test_study_file_errors_name_the_key(tiny_assets, tmp_path, edit, message):
    data = tiny_study(tiny_assets, tmp_path)
    edit(data)
    with pytest.raises(ConfigError, match=message):
        plan(from_dict(StudyConfig, data))


def test_shipped_studies_plan_and_share_their_default_runs():
    main_study, _ = load_study("study_main.yaml")
    runs = plan(main_study)
    assert {r.name for r in runs} >= {"teacher", "dmd2_m1", "dmd2_m3", "tm_n4_m1", "tmd_n2_m1", "tmd_n4_m2"}
    assert sum(r.seed == 0 for r in runs) == 11 and {r.seed for r in runs} == {None, 0, 1, 2}
    assert len({r.key for r in runs}) == len(runs)
    ablations, _ = load_study("study_ablations.yaml")
    assert len(ablations.paired) == 11 and ablations.seeds == [0, 1]
    defaults = ("tm_n2_m2", "tmd_n2_m2", "dmd2_m2")
    shared = {(r.name, r.seed): r.key for r in plan(ablations) if r.name in defaults}
    assert len(shared) == 8 and shared == {(r.name, r.seed): r.key for r in runs if (r.name, r.seed) in shared}
    budget, _ = load_study("study_budget.yaml")
    stage1 = {(r.name, r.seed): r.key for r in plan(budget) if r.name == "tm_n2_m2"}
    assert stage1 == {(r.name, r.seed): r.key for r in runs if r.name == "tm_n2_m2" and r.seed in (0, 1)}
    paper, _ = load_study("study_paper_budget.yaml")
    stage1 = {(r.name, r.seed): r.key for r in plan(paper) if r.name == "tm_n2_m2"}
    assert len(stage1) == 3 and stage1 == {(r.name, r.seed): r.key for r in runs if r.name == "tm_n2_m2"}
    assert paper.checkpoint_every == 250 and {r.config["train"]["steps"] for r in plan(paper) if r.spec.score} == {4000}
    paper_data, _ = load_study("study_paper_data.yaml")
    world_rows = {(r.name, r.seed): r.key for r in plan(paper_data) if r.name in ("tm_n2_m2", "dmd2_m2", "tmd_n2_m2")}
    assert len(world_rows) == 9 and world_rows == {(r.name, r.seed): r.key for r in runs if (r.name, r.seed) in world_rows}
    on_teacher_data = [r for r in plan(paper_data) if r.dataset is not None]
    assert len(on_teacher_data) == 12 and {r.dataset.spec.videos_per_prompt for r in on_teacher_data} == {112}
    baselines, _ = load_study("study_baselines.yaml")
    read = ("dmd2_m1", "dmd2_m2", "tm_n2_m2", "tmd_n2_m2")  # read from the main table's records, not retrained
    assert {(r.name, r.seed): r.key for r in plan(baselines) if r.name in read} == {
        (r.name, r.seed): r.key for r in runs if r.name in read and r.seed in (0, 1)
    }


def test_select_keeps_named_runs_and_seeds_with_their_parents():
    study, _ = load_study("study_main.yaml")
    runs = plan(study)
    chosen = {(r.name, r.seed) for r in select(runs, ["tmd_n2_m1", "teacher"], study, [0])}
    assert chosen == {("teacher", None), ("tmd_n2_m1", 0), ("tm_n2_m1", 0)}
    assert {r.seed for r in select(runs, None, study, [1, 2])} == {None, 1, 2}
    with pytest.raises(ConfigError, match="--seeds: 7 not among"):
        select(runs, None, study, [7])


# ---- running, resuming, reporting


def test_study_trains_once_resumes_after_an_interruption_and_reports_from_records(tiny_assets, tmp_path, monkeypatch, capsys):
    report = tmp_path / "report"
    path = write_study(tmp_path, tiny_study(tiny_assets, report))
    executed = []
    real = study_module.execute

    def interrupted(payload):
        if executed:
            raise KeyboardInterrupt  # the study is stopped while its second run trains
        executed.append(payload["key"])
        real(payload)

    monkeypatch.setattr(study_module, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(study_args(tmp_path, path))
    assert [p.stem for p in (tmp_path / "records").glob("*.json")] == executed

    resumed = []
    monkeypatch.setattr(study_module, "execute", lambda payload: (resumed.append(payload["key"]), real(payload)))
    assert main(study_args(tmp_path, path)) == 0
    every = {r.key for r in plan(load_study(path)[0])}
    assert len(every) == 7 and set(resumed) == every - set(executed) and len(resumed) == 6
    assert "[6/6] done" in capsys.readouterr().out

    # a finished study trains nothing
    monkeypatch.setattr(study_module, "execute", lambda payload: pytest.fail("a finished run was trained again"))
    assert main(study_args(tmp_path, path)) == 0

    results = json.loads((report / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == {"teacher@2", "teacher@1", "dmd2", "tmd"}
    tmd = rows["tmd"]
    assert (tmd["method"], tmd["outer_steps"], tmd["inner_steps"], tmd["seeds"], tmd["videos"]) == (
        "tmd",
        1,
        2,
        [0, 1],
        2 * 2 * 72,
    )
    assert tmd["effective_nfe"] == pytest.approx(1 + 1 / 3) and len(tmd["total_ci95"]) == 2
    assert rows["teacher@2"]["seeds"] == [] and rows["teacher@2"]["effective_nfe"] == 4.0 and rows["teacher@2"]["videos"] == 144
    (pair,) = results["paired"]
    assert (pair["a"], pair["b"], pair["seeds"]) == ("tmd", "dmd2", [0, 1])
    assert pair["diff_mean"] == pytest.approx(tmd["total_mean"] - rows["dmd2"]["total_mean"])
    record = json.loads((tmp_path / "records" / f"{plan(load_study(path)[0])[-1].key}.json").read_text())
    assert [p["step"] for p in record["curve"]] == [0, 1, 2] and {"total", "train_seconds", "quality"} <= set(record["curve"][0])
    assert record["parent"] and record["parent_weights_sha256"] and record["machine"]["cores"] >= 1
    assert {s["noise_seed"] for s in record["scores"]} == {0, 1} and "sharpness" in record["scores"][0]

    # the report again, on a machine that has the records only
    written = {name: (report / name).read_bytes() for name in ("report.md", "results.json")}
    shutil.rmtree(tmp_path / "work")
    shutil.rmtree(report)
    # recorded stage 2s need nothing, though their stage-1 weights are gone
    assert tasks(plan(load_study(path)[0]), tmp_path / "records", tmp_path / "work", lambda task: 1.0) == []
    assert main(study_args(tmp_path, path, "--report")) == 0
    assert {name: (report / name).read_bytes() for name in written} == written
    assert all((report / png).stat().st_size > 1000 for png in ("quality_vs_nfe.png", "curves.png", "paired.png"))
    text = written["report.md"].decode()
    assert "## Paired differences" in text and "## Where the spread comes from" in text and "Student-t 95%" in text
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- tmd study tiny: begin -->\nold\n<!-- tmd study tiny: end -->\noutro\n")
    assert main(study_args(tmp_path, path, "--report", "--readme", str(readme))) == 0
    lines = readme.read_text().splitlines()
    assert (
        lines[0] == "intro"
        and lines[-1] == "outro"
        and "old" not in lines
        and any(line.startswith("| TMD 1x2 | tmd |") for line in lines)
    )

    # a fresh machine that must train a new stage 2 on a recorded stage 1 retrains that stage 1 for its weights only
    data = tiny_study(tiny_assets, report)
    data["runs"]["tmd"]["config"]["train"]["lr"] = 2e-4
    path = write_study(tmp_path, data)
    todo = tasks(plan(load_study(path)[0]), tmp_path / "records", tmp_path / "work", lambda task: 1.0)
    assert sorted((t.run.name, t.kind) for t in todo) == [
        ("stage1", "weights"),
        ("stage1", "weights"),
        ("tmd", "train"),
        ("tmd", "train"),
    ]
    stage1 = next(t.run.key for t in todo if t.kind == "weights")
    record_bytes = (tmp_path / "records" / f"{stage1}.json").read_bytes()
    monkeypatch.setattr(study_module, "execute", real)
    assert main(study_args(tmp_path, path, "--only", "tmd")) == 0
    assert (tmp_path / "records" / f"{stage1}.json").read_bytes() == record_bytes
    assert (tmp_path / "work" / stage1 / "student.safetensors").is_file()


def test_a_failed_run_skips_its_children_and_the_study_goes_on(tiny_assets, tmp_path, monkeypatch, capsys):
    data = tiny_study(tiny_assets, tmp_path / "report")
    data["runs"] = {name: data["runs"][name] for name in ("teacher", "stage1", "tmd")}
    data["paired"] = []
    path = write_study(tmp_path, data)
    real = study_module.execute

    def broken_stage1(payload):
        if payload["name"] == "stage1" and payload["seed"] == 1:
            raise RuntimeError("out of memory, say")
        real(payload)

    monkeypatch.setattr(study_module, "execute", broken_stage1)
    assert main(study_args(tmp_path, path)) == 1
    out = capsys.readouterr().out
    assert "FAILED train   stage1 seed 1" in out and "RuntimeError: out of memory, say" in out and "skipped tmd seed 1" in out
    assert len(list((tmp_path / "records").glob("*.json"))) == 3  # teacher, stage 1 seed 0 and its stage 2


def test_dry_run_lists_runs_and_state(tiny_assets, tmp_path, capsys):
    path = write_study(tmp_path, tiny_study(tiny_assets, tmp_path / "report"))
    assert main(study_args(tmp_path, path, "--dry-run", "--jobs", "2")) == 0
    out = capsys.readouterr().out
    assert out.count("pending") == 7 and "0 of 7 runs recorded" in out and "with --jobs 2" in out
    assert not (tmp_path / "records").exists()


@pytest.mark.slow
def test_two_jobs_train_in_worker_processes(tiny_assets, tmp_path):
    data = tiny_study(tiny_assets, tmp_path / "report")
    data["runs"] = {name: data["runs"][name] for name in ("dmd2", "stage1", "tmd")}
    # a dataset is made by two torchrun processes, each taking every other shard
    data["datasets"] = {"teacher_data": {"videos_per_prompt": 1, "steps": 2}}
    data["runs"]["dmd2"]["data"] = "teacher_data"
    path = write_study(tmp_path, data)
    assert main(study_args(tmp_path, path, "--jobs", "2")) == 0
    assert len(list((tmp_path / "records").glob("*.json"))) == 6
    (folder,) = (tmp_path / "work" / "data").glob("teacher_data-*/")
    assert json.loads((folder / "index.json").read_text())["samples"] == 72
    for run in plan(load_study(path)[0]):
        assert (tmp_path / "work" / f"{run.key}.log").is_file() and (
            tmp_path / "work" / run.key / "student.safetensors"
        ).is_file()


def test_runs_on_a_dataset_train_on_the_teachers_samples_made_once(tiny_assets, tmp_path, capsys, monkeypatch):
    """The study synthesizes the dataset with ``tmd synthesize`` before the runs that need it, trains them on
    it exactly as ``tmd train`` with ``data_kind: prepared`` does, scores and curves them on the world, and
    keys them apart from the same runs on the world's data."""
    from tmd.data.prepare import PreparedDataset
    from tmd.train.run import train_run
    from tmd.world.data import WorldAssets

    data = tiny_study(tiny_assets, tmp_path / "report", seeds=[0], eval={"noise_seeds": [0]})
    data["datasets"] = {"teacher_data": {"videos_per_prompt": 1, "steps": 2, "seed": 100}}
    on_data = copy.deepcopy(data["runs"]["tmd"]["config"])
    data["runs"] = {
        "dmd2": data["runs"]["dmd2"],
        "dmd2_on_data": {**copy.deepcopy(data["runs"]["dmd2"]), "data": "teacher_data"},
        "stage1_on_data": {**copy.deepcopy(data["runs"]["stage1"]), "data": "teacher_data"},
        "tmd_on_data": {
            "method": "tmd",
            "parent": "stage1_on_data",
            "data": "teacher_data",
            "config": on_data,
            "score": [[1, 2]],
        },
    }
    data["paired"] = [{"a": "dmd2_on_data", "b": "dmd2"}]
    path = write_study(tmp_path, data)
    runs = {r.name: r for r in plan(load_study(path)[0])}
    assert runs["dmd2_on_data"].key != runs["dmd2"].key
    more = copy.deepcopy(data)
    more["datasets"]["teacher_data"]["videos_per_prompt"] = 2
    assert keys(more)[("dmd2_on_data", 0)] != runs["dmd2_on_data"].key and keys(more)[("dmd2", 0)] == runs["dmd2"].key

    monkeypatch.setattr(datasets_module, "PROGRESS_EVERY_S", 0)  # a progress line at every poll
    assert main(study_args(tmp_path, path)) == 0
    out = capsys.readouterr().out
    assert out.count("synthesize dataset teacher_data") == 1 and "dataset teacher_data done" in out
    assert re.search(r"dataset teacher_data: [0-5]/5 shards", out)  # 72 videos in shards of 16
    folder = runs["dmd2_on_data"].dataset.folder(tmp_path / "work")
    index = json.loads((folder / "index.json").read_text())
    assert index["samples"] == 72
    # the runs see the conditioning the world's data and its benchmark give the same prompts
    batch = PreparedDataset(folder, 8, seed=0).next_batch()
    cond, neg_cond = WorldAssets(tiny_assets, teacher=False).encode_prompts(batch["prompts"])
    torch.testing.assert_close(batch["cond"], cond, rtol=0, atol=1e-5)  # the text encoder's batch differs: rounding
    torch.testing.assert_close(batch["neg_cond"], neg_cond, rtol=0, atol=1e-5)
    records = {r.name: json.loads((tmp_path / "records" / f"{r.key}.json").read_text()) for r in runs.values()}
    record = records["dmd2_on_data"]
    assert record["config"]["data_kind"] == "prepared" and record["config"]["data"]["path"] == str(folder)
    synthesized = record["dataset"]["synthesize"]
    assert record["dataset"]["key"] == runs["dmd2_on_data"].dataset.key
    assert (synthesized["steps"], synthesized["seed"], synthesized["videos_per_prompt"]) == (2, 100, 1)
    assert "dataset" not in records["dmd2"] and records["tmd_on_data"]["curve"]  # eval_every scores on the world
    # the same weights as tmd train on the folder
    direct = from_dict(
        RunConfig,
        {**copy.deepcopy(record["config"]), "train": {**record["config"]["train"], "out_dir": str(tmp_path / "direct")}},
    )
    weights = load_file(str(train_run(direct, tmp_path / "direct").weights))
    studied = load_file(str(tmp_path / "work" / runs["dmd2_on_data"].key / "student.safetensors"))
    assert weights.keys() == studied.keys() and all(weights[k].equal(studied[k]) for k in weights)

    report = (tmp_path / "report" / "report.md").read_text()
    assert "- Dataset `teacher_data`" in report and "72 samples of the world teacher, 1 per prompt (euler, 2 steps" in report
    assert "trained on by dmd2_on_data, stage1_on_data, tmd_on_data." in report

    assert main(study_args(tmp_path, path)) == 0  # everything recorded: nothing is synthesized or trained again
    assert "synthesize dataset" not in capsys.readouterr().out


# ---- evaluation during training


def test_eval_every_logs_curve_points_without_changing_the_run(tiny_assets, tmp_path):
    from tmd.train.logging import read_metrics
    from tmd.train.run import train_run

    def run(out, **train):
        return train_run(
            from_dict(
                RunConfig,
                {
                    "method_name": "dmd2",
                    "data_kind": "world",
                    "data": {"assets": str(tiny_assets)},
                    "method": {"outer_steps": 2, "generator_every": 2, "guidance": 3.0},
                    "train": {
                        "steps": 3,
                        "batch_size": 2,
                        "log_every": 1,
                        "progress": False,
                        "tensorboard": False,
                        "device": "cpu",
                        "out_dir": str(tmp_path / out),
                        **train,
                    },
                },
            )
        )

    with_eval = run("eval", eval_every=2, eval_videos=5)
    points = [m for m in read_metrics(tmp_path / "eval") if "eval/total" in m]
    assert [p["step"] for p in points] == [0, 2, 3]  # the initial weights, every eval_every steps and after the last
    assert all(0 <= p["eval/total"] <= 1 and p["eval/train_seconds"] >= 0 for p in points)
    assert points[2]["eval/train_seconds"] > points[1]["eval/train_seconds"] > points[0]["eval/train_seconds"]
    plain = run("plain", eval_every=0)
    assert not any("eval/total" in m for m in read_metrics(tmp_path / "plain"))
    a, b = load_file(str(with_eval.weights)), load_file(str(plain.weights))
    assert all((a[k] == b[k]).all() for k in a)
    assert math.isfinite(read_metrics(tmp_path / "plain")[-1]["loss/generator"])


def test_a_run_killed_mid_way_resumes_from_its_checkpoint_to_the_uninterrupted_record(tiny_assets, tmp_path, monkeypatch):
    from tmd.train.loop import Trainer

    data = tiny_study(tiny_assets, tmp_path / "report", checkpoint_every=2, seeds=[0], eval={"noise_seeds": [0]})
    data["runs"] = {name: data["runs"][name] for name in ("stage1", "tmd")}
    data["runs"]["tmd"]["config"]["train"].update(steps=6, eval_every=2)
    data["paired"] = []
    path = write_study(tmp_path, data)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(study_args(straight, path)) == 0

    real_save, saved = Trainer.save, []

    def killed_after_step_4(trainer):
        checkpoint = real_save(trainer)
        saved.append(trainer.step)
        if trainer.cfg.method_name == "tmd" and trainer.step == 4:
            raise KeyboardInterrupt  # the machine goes away right after the second checkpoint
        return checkpoint

    monkeypatch.setattr(Trainer, "save", killed_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        main(study_args(interrupted, path))
    monkeypatch.setattr(Trainer, "save", real_save)
    key = plan(load_study(path)[0])[-1].key
    assert not (interrupted / "records" / f"{key}.json").exists()
    assert (interrupted / "work" / key / "checkpoints" / "step_0000004").is_dir()
    assert main(study_args(interrupted, path)) == 0

    def comparable(run):
        record = json.loads((run / "records" / f"{key}.json").read_text())
        untimed = lambda row: {k: v for k, v in row.items() if "seconds" not in k and k != "time"}  # noqa: E731
        return {
            # not the files' hashes: their metadata names paths in each study's own work folder
            "weights": {k: v.tolist() for k, v in load_file(str(run / "work" / key / "student.safetensors")).items()},
            "scores": [untimed(row) for row in record["scores"]],
            "curve": [untimed(point) for point in record["curve"]],
            "final": untimed(record["final_metrics"]),
        }, record.get("resumed_from_steps")

    (resumed, steps), (uninterrupted, none) = comparable(interrupted), comparable(straight)
    assert steps == [4] and none is None
    assert [p["step"] for p in resumed["curve"]] == [0, 2, 4, 6]
    assert resumed == uninterrupted
