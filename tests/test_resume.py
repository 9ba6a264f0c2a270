"""``--resume`` continues the run it names or refuses: a changed model or recipe never trains on silently."""

import json

import pytest
import yaml
from test_trainer import run

from tmd.errors import ResumeError
from tmd.programs.cli import main
from tmd.train.resume import CONFIG_FILE, HISTORY_FILE


def snapshot(folder):
    """Every file under ``folder`` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_changed_recipe_is_refused_naming_each_key_and_the_folder_is_untouched(tmp_path):
    run(tmp_path, steps=5)
    before = snapshot(tmp_path)
    with pytest.raises(ResumeError) as error:
        run(tmp_path, resume=True, lr=0.02, seed=3)
    message = str(error.value)
    assert "train.lr: 0.01 in the run, 0.02 now" in message and "train.seed: 0 in the run, 3 now" in message
    assert "train.steps" not in message.split("(a resume may change")[0]  # 5 -> 10 is allowed, not named as a cause
    assert snapshot(tmp_path) == before


def test_safe_changes_are_recorded_in_the_history_and_config_yaml_is_kept(tmp_path, capsys):
    run(tmp_path, steps=5)
    original = (tmp_path / CONFIG_FILE).read_text()
    capsys.readouterr()
    _, result = run(tmp_path, resume=True, steps=8, log_every=2, checkpoint_every=4)
    assert "resumed from step 5" in capsys.readouterr().out and result.step == 8
    assert (tmp_path / CONFIG_FILE).read_text() == original
    assert yaml.safe_load(original)["train"]["steps"] == 5
    _, result = run(tmp_path, resume=True, steps=9, log_every=2, checkpoint_every=4)
    history = [json.loads(line) for line in (tmp_path / HISTORY_FILE).read_text().splitlines()]
    assert [h["resumed_from_step"] for h in history] == [5, 8]
    assert history[0]["changes"] == {"train.steps": [5, 8], "train.log_every": [1, 2], "train.checkpoint_every": [5, 4]}
    # compared with the run as it stands after the first resume, not with config.yaml alone
    assert history[1]["changes"] == {"train.steps": [8, 9]}
    # and the run's recipe still reads from config.yaml: lr stays refused after safe changes
    with pytest.raises(ResumeError, match="train.lr: 0.01 in the run, 0.5 now"):
        run(tmp_path, resume=True, steps=9, log_every=2, checkpoint_every=4, lr=0.5)


def test_a_run_folder_without_its_config_is_not_resumed_blindly(tmp_path):
    run(tmp_path, steps=5)
    (tmp_path / CONFIG_FILE).unlink()
    with pytest.raises(ResumeError, match="holds checkpoints but no config.yaml"):
        run(tmp_path, resume=True)


def test_tmd_train_refuses_another_head_split(tmp_path, capsys):
    """The case a user hit: an H = 2 checkpoint resumed with method.head_blocks=3 trained an H = 3 student
    on H = 2 weights (the parameter names are the same for every split). The config's H is 1 now."""
    args = [
        "--config",
        "world_tmd_stage1.yaml",
        "train.steps=1",
        "train.batch_size=2",
        "train.progress=false",
        f"train.out_dir={tmp_path}",
    ]
    assert main(["train", *args]) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(["train", "--resume", *args, "method.head_blocks=3", "train.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tmd train: error: cannot resume")
    assert "method.head_blocks: 1 in the run, 3 now" in err and "train.lr: 0.0003 in the run, 0.001 now" in err
    assert snapshot(tmp_path) == before
