"""What a new user's bad inputs get: one line naming the file, key or value and exit code 2, never a traceback."""

import os

import pytest
import torch
from safetensors.torch import save_file
from test_generate import SIZE, build_tiny_pipeline, generate_args

from tmd.errors import ConfigError, NonFiniteLossError
from tmd.models.export import export_student
from tmd.models.split import TMDStudent
from tmd.models.wan import load_teacher
from tmd.programs.cli import _parse, build_parser, main


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("wan"))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def one_line_error(capsys, command):
    """The error line; what comes before it on stderr may only be the loaders' progress bars."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    line = err.splitlines()[-1]
    assert line.startswith(f"tmd {command}: error: ") and err.endswith(line + "\n"), err
    return line


def test_a_truncated_safetensors_file_is_named(tmp_path, pipeline, capsys):
    weights = tmp_path / "student.safetensors"
    save_file({"w": torch.zeros(1000)}, weights, metadata={"method": "tmd", "method_config": "{}"})
    truncate(weights)
    # as init_from
    args = [
        "train",
        "--config",
        "world_tmd_stage2.yaml",
        f"method.init_from={weights}",
        f"train.out_dir={tmp_path / 'r'}",
    ]
    assert main(args) == 2
    err = one_line_error(capsys, "train")
    assert f"method.init_from: {weights} is not a complete safetensors file" in err
    # as --run
    assert main(["export", "--run", str(weights), "--teacher", str(pipeline), "--out", str(tmp_path / "s")]) == 2
    assert f"{weights} is not a complete safetensors file" in one_line_error(capsys, "export")
    # inside a pipeline folder, and inside a student folder
    broken = build_tiny_pipeline(tmp_path / "broken")
    transformer = truncate(broken / "transformer" / "diffusion_pytorch_model.safetensors")
    assert main(generate_args(broken, tmp_path / "v")) == 2
    assert f"{transformer} is not a complete safetensors file" in one_line_error(capsys, "generate")
    student = export_student(TMDStudent.from_teacher(load_teacher(pipeline), head_blocks=1), tmp_path / "student", pipeline)
    parts = truncate(student / "tmd_parts.safetensors")
    assert main(generate_args(student, tmp_path / "v")) == 2
    assert f"{parts} is not a complete safetensors file" in one_line_error(capsys, "generate")


def test_an_impossible_out_fails_before_any_model_is_loaded(tmp_path, pipeline, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    student = export_student(load_teacher(pipeline), tmp_path / "few", pipeline)
    weights = tmp_path / "run.safetensors"
    save_file(load_teacher(pipeline).state_dict(), weights, metadata={"method": "dmd2", "method_config": "{}"})
    monkeypatch.setattr("tmd.models.wan.WanTransformer3DModel.from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    commands = {
        "generate": ["--model", str(student), "--prompt", "a red circle", *SIZE],
        "export": ["--run", str(weights), "--teacher", str(pipeline)],
        "prepare": ["--model", str(pipeline), "--text-only", "--prompts", str(prompts), *SIZE],
        "sample": [],
    }
    for command, args in commands.items():
        folder = afile / "out"
        out = folder / "latents.safetensors" if command == "sample" else folder  # sample writes one file
        assert main([command, *args, "--out", str(out)]) == 2
        assert f"--out: cannot create directory '{folder}': '{afile}' is not a writable directory" in one_line_error(
            capsys, command
        )
        if command != "sample":
            assert main([command, *args, "--out", str(afile)]) == 2
            assert f"--out: '{afile}' exists and is not a directory" in one_line_error(capsys, command)


def test_a_nan_loss_is_one_line_with_the_step_metrics_jsonl_counts(tmp_path, capsys):
    # lr 1e30 blows the weights up in the first update: the second step's loss is NaN
    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        "world_tmd_stage1.yaml",
        "train.steps=3",
        "train.batch_size=2",
        "train.lr=1e30",
        "train.log_every=1",
        "train.progress=false",
        f"train.out_dir={out}",
    ]
    assert main(args) == 2
    err = one_line_error(capsys, "train")
    assert "non-finite loss at step 2 in group 'student'" in err and "no checkpoint was written yet" in err
    assert [int(line.split(",")[0].split(":")[1]) for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    with pytest.raises(NonFiniteLossError):
        main([*args, "--debug", f"train.out_dir={tmp_path / 'again'}"])


def test_debug_shows_the_traceback(tmp_path):
    for args in (["--debug", "train", "--config", str(tmp_path)], ["train", "--config", str(tmp_path), "--debug"]):
        with pytest.raises(ConfigError, match="is a directory"):
            main(args)


def test_a_directory_as_config_is_not_reported_missing(capsys, tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("train: {}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "configs"]) == 2
    err = one_line_error(capsys, "train")
    assert "'configs' is a directory; give a YAML file: one of configs/a.yaml" in err


def test_a_shipped_config_is_found_by_name_from_any_directory(capsys, tmp_path, monkeypatch):
    from tmd.config import RunConfig, find_config, load_config

    monkeypatch.chdir(tmp_path)
    assert load_config(RunConfig, "world_dmd2.yaml").method_name == "dmd2"
    assert find_config("study_main.yaml").parent == find_config("world_teacher.yaml").parent
    assert main(["train", "--config", "world_dmd3.yaml"]) == 2
    err = one_line_error(capsys, "train")
    assert "config file 'world_dmd3.yaml' does not exist (shipped configs, found by name:" in err and "world_dmd2.yaml" in err


def test_overrides_may_follow_other_options():
    args = _parse(["train", "--config", "c.yaml", "train.steps=1", "--resume", "train.lr=1e-3", "--threads", "1", "a.b=2"])
    assert args.overrides == ["train.steps=1", "train.lr=1e-3", "a.b=2"] and args.resume
    with pytest.raises(SystemExit):
        _parse(["train", "--config", "c.yaml", "train.steps=1", "--resume", "--bogus"])
    with pytest.raises(SystemExit):
        _parse(["generate", "--model", "m", "--prompt", "p", "--out", "o", "extra=1"])  # generate takes no overrides


def test_every_command_takes_threads_and_debug_and_documents_every_option(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        options = {s for a in command._actions for s in a.option_strings}
        assert {"--threads", "--debug"} <= options, name
        undocumented = [a.dest for a in command._actions if not a.help]
        assert not undocumented, f"tmd {name}: options without help: {undocumented}"
    assert _parse(["sample", "--threads", "2"]).threads == 2
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "video width in pixels (default: 832)" in text
        and "--seed SEED video i starts from noise seeded by seed + i (default: 0)" in text
    )


def test_sample_runs_on_the_threads_it_is_given(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["sample", "--threads", "2", "--steps", "2", "--out", str(tmp_path / "x" / "latents.safetensors")]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert "latents written to" in capsys.readouterr().out
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x" / "latents.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
