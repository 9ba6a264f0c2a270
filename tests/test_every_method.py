"""Every registered method trains through the entry point ``tmd train`` uses and exports its generator: a new
method is covered by being registered."""

import pytest
import yaml

from tmd.methods import METHODS, get_method
from tmd.methods.base import Method
from tmd.methods.linvideo import load_linearised
from tmd.models.wan import load_teacher
from tmd.programs.cli import main

SPLIT = {"head_blocks": 1, "outer_steps": 2, "inner_steps": 2}
METHOD_SETTINGS = {
    "tm": SPLIT,
    "tmd": {**SPLIT, "generator_every": 2},
    "dmd2": {"generator_every": 2},
    "rcm": {"tangent_warmup": 0},
}
"""What a method needs beyond its defaults on the tiny world (a head of one block; a generator turn in 2 steps)."""


def train(tmp_path, name, assets, **method):
    config = {
        "method_name": name,
        "data_kind": "world",
        "data": {"assets": str(assets)},
        "method": {**METHOD_SETTINGS.get(name, {}), **method},
        "train": {"steps": 2, "batch_size": 2, "log_every": 1, "progress": False, "tensorboard": False, "device": "cpu"},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / name
    assert main(["train", "--config", str(path), f"train.out_dir={run}", "--threads", "1"]) == 0
    return run / "student.safetensors"


def test_every_method_subclasses_the_method_interface():
    for name, cls in METHODS.items():
        assert issubclass(cls, Method), name
        assert cls.export_module, name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_through_tmd_train_and_exports(tmp_path, tiny_assets, name):
    extra = {"init_from": str(train(tmp_path / "stage1", "tm", tiny_assets))} if name == "tmd" else {}
    weights = train(tmp_path, name, tiny_assets, **extra)
    out = tmp_path / "export"
    cls = get_method(name)
    exported = main(["export", "--run", str(weights), "--teacher", str(tiny_assets / "teacher"), "--out", str(out)])
    if cls.exports_student_folder:
        assert exported == 0 and (out / "config.json").is_file()
    else:  # refused in one line
        assert exported == 2
    if name == "linvideo":  # its weights serve another run as data.linearised_teacher
        assert load_linearised(load_teacher(tiny_assets / "teacher"), weights) is not None
    outer, inner = cls.run_steps(cls.Config(**METHOD_SETTINGS.get(name, {})))
    assert outer >= 1 and (inner is not None) == cls.samples_with_inner_steps
