from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from tmd.config import (
    ConfigError,
    RunConfig,
    TrainConfig,
    existing_path,
    find_config,
    from_dict,
    load_config,
    register_data_config,
    register_method_config,
    save_config,
    shipped_configs,
    to_dict,
)


@dataclass
class ToyMethodConfig:
    head_blocks: int = 5
    guidance: float = 3.0
    fusion: Literal["gate", "concat"] = "gate"
    steps: tuple[int, ...] = (2, 4)
    teacher: Optional[str] = existing_path(None)


@dataclass
class NeedsTeacherConfig:
    teacher: str = existing_path()


@dataclass
class ToyDataConfig:
    n_modes: int = 8
    scale: float = 1.0
    weights: list[float] = field(default_factory=list)


register_method_config("cfg_toy", ToyMethodConfig)
register_method_config("cfg_needs_teacher", NeedsTeacherConfig)
register_data_config("cfg_toy_data", ToyDataConfig)


def write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"method_name": "cfg_toy", "data_kind": "cfg_toy_data"}


def test_load_with_sections_overrides_and_coercion(tmp_path):
    path = write(tmp_path, {**BASE, "method": {"head_blocks": 3}, "train": {"lr": "2e-4", "betas": [0.8, 0.9]}})
    cfg = load_config(
        RunConfig,
        path,
        [
            "train.steps=7",
            "method.guidance=5",
            "method.fusion=concat",
            "data.weights=[1, 2]",
            "train.grad_clip=null",
            f"train.out_dir={tmp_path}/o",
        ],
    )
    assert isinstance(cfg.method, ToyMethodConfig) and isinstance(cfg.data, ToyDataConfig)
    assert cfg.method.head_blocks == 3 and cfg.method.guidance == 5.0 and isinstance(cfg.method.guidance, float)
    assert cfg.method.fusion == "concat" and cfg.method.steps == (2, 4)
    assert cfg.train.lr == 2e-4 and cfg.train.betas == (0.8, 0.9) and cfg.train.steps == 7
    assert cfg.train.grad_clip is None and cfg.data.weights == [1.0, 2.0]


def test_defaults_when_sections_absent():
    cfg = load_config(RunConfig, None, ["method_name=cfg_toy", "data_kind=cfg_toy_data"])
    assert cfg.method == ToyMethodConfig() and cfg.train == TrainConfig()
    assert RunConfig("cfg_toy", "cfg_toy_data").method == ToyMethodConfig()


def test_round_trip(tmp_path):
    cfg = load_config(RunConfig, write(tmp_path, {**BASE, "method": {"steps": [1, 2, 3]}}), ["train.lr_groups={a: 0.5}"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(RunConfig, tmp_path / "saved.yaml") == cfg
    assert to_dict(cfg)["method"]["steps"] == [1, 2, 3]


def test_unknown_key_in_file_names_key_file_and_allowed(tmp_path):
    path = write(tmp_path, {**BASE, "train": {"lrr": 1e-4}})
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path)
    msg = str(e.value)
    assert "'train.lrr'" in msg and str(path) in msg and "did you mean 'train.lr'" in msg
    assert "allowed keys in section 'train'" in msg and "batch_size" in msg


def test_unknown_key_in_method_section_checked_against_method_dataclass(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'method.head_block=3'.*'method.head_block'.*head_blocks, guidance"):
        load_config(RunConfig, write(tmp_path, BASE), ["method.head_block=3"])


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"unknown key 'optim'.*allowed keys in the top level: method_name"):
        from_dict(RunConfig, {**BASE, "optim": {}}, source="x.yaml")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps=1.5", r"'train.steps' expects int, got float 1.5"),
        ("train.steps=true", r"'train.steps' expects int, got bool"),
        ("train.lr=abc", r"'train.lr' expects float, got str 'abc'"),
        ("train.precision=fp16", r"'train.precision' expects one of 'fp32', 'bf16'"),
        ("train.betas=[0.9]", r"'train.betas' expects a list of 2 values \(float, float\)"),
        ("train.activation_checkpointing=1", r"expects bool, got int 1"),
        ("train.device=0", r"'train.device' expects str, got int 0 \(quote it"),
        ("method.steps=[1, x]", r"'method.steps\[1\]' expects int"),
        ("train.grad_clip=[1]", r"'train.grad_clip' expects float or null"),
        ("train=3", r"section 'train' must be a mapping"),
    ],
)
def test_wrong_types(tmp_path, override, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        load_config(RunConfig, write(tmp_path, BASE), [override])
    assert "override" in str(e.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=0", "lr must be > 0"),
        ("train.steps=0", "steps must be >= 1"),
        ("train.ema_decay=1", r"ema_decay must be in \[0, 1\)"),
        ("train.betas=[0.9, 1.5]", "betas must be two numbers"),
        ("train.grad_clip=-1", "grad_clip must be > 0"),
        ("train.device=tpu9", "device must be 'auto' or a torch device"),
        ("train.lr_groups={gen: -1}", "lr_groups.gen must be > 0"),
    ],
)
def test_bad_values(tmp_path, override, expected):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=expected) as e:
        load_config(RunConfig, path, [override])
    assert str(path) in str(e.value) and "invalid section 'train'" in str(e.value)


def test_unregistered_method_and_missing_required(tmp_path):
    with pytest.raises(ConfigError, match=r"method_name 'nope' is not registered; registered: .*cfg_toy"):
        load_config(RunConfig, write(tmp_path, {**BASE, "method_name": "nope"}))
    with pytest.raises(ConfigError, match=r"missing required key 'data_kind'"):
        load_config(RunConfig, write(tmp_path, {"method_name": "cfg_toy"}))


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must look like dotted.key=value"):
        load_config(RunConfig, write(tmp_path, BASE), ["train.lr"])
    with pytest.raises(ConfigError, match="override 'train.lr.x=1': key 'train.lr' expects float, got dict"):
        load_config(RunConfig, write(tmp_path, BASE), ["train.lr.x=1"])
    with pytest.raises(ConfigError, match="override 'train.lr.x=1': 'train.lr' is a value, not a section"):
        load_config(RunConfig, write(tmp_path, {**BASE, "train": {"lr": 0.1}}), ["train.lr.x=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "missing.yaml")


def test_paths_checked(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"'method.teacher': path '.*nowhere' does not exist"):
        load_config(RunConfig, path, [f"method.teacher={tmp_path}/nowhere"])
    assert load_config(RunConfig, path, [f"method.teacher={tmp_path}"]).method.teacher == str(tmp_path)
    with pytest.raises(ConfigError, match=r"missing required key 'method.teacher'"):
        load_config(RunConfig, path, ["method_name=cfg_needs_teacher"])
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=r"'train.out_dir': cannot create directory .*afile/run"):
        load_config(RunConfig, path, [f"train.out_dir={tmp_path}/afile/run"])
    with pytest.raises(ConfigError, match=r"'train.out_dir': '.*afile' exists and is not a directory"):
        load_config(RunConfig, path, [f"train.out_dir={tmp_path}/afile"])
    assert load_config(RunConfig, path, [f"train.out_dir={tmp_path}/new/deep"]).train.out_dir.endswith("new/deep")


@pytest.mark.parametrize("name", sorted(p.name for p in shipped_configs().glob("*.yaml")))
def test_every_shipped_config_loads(name, tmp_path, monkeypatch):
    """A shipped config that no test loads can rot unseen (a renamed option fails only on the user's cluster).
    The data folder and the earlier stage's weights it names are made empty in a working directory of its own."""
    import tmd.methods  # noqa: F401  (registers the methods' config sections)
    import tmd.train.run  # noqa: F401  (registers the data kinds' config sections)
    from tmd.programs.study.spec import load_study
    from tmd.world.teacher import WorldTeacherConfig

    if name.startswith("study_"):
        load_study(name)
        return
    if name == "world_teacher.yaml":
        load_config(WorldTeacherConfig, find_config(name))
        return
    path = find_config(name)
    raw = yaml.safe_load(path.read_text())
    monkeypatch.chdir(tmp_path)
    if (raw.get("data") or {}).get("path"):
        (tmp_path / raw["data"]["path"]).mkdir(parents=True)
    if (raw.get("method") or {}).get("init_from"):
        (tmp_path / raw["method"]["init_from"]).parent.mkdir(parents=True)
        (tmp_path / raw["method"]["init_from"]).touch()
    assert load_config(RunConfig, path).method_name == raw["method_name"]
