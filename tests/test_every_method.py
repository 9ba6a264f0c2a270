"""Every registered method trains through the entry point ``tmd train`` uses and exports its generator: a new
method is covered by being registered."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tmd.methods import METHODS, get_method
from tmd.methods.base import Method
from tmd.methods.linvideo import load_linearised
from tmd.methods.meanflow import sample_mean_flow
from tmd.methods.rcm import RCM
from tmd.models.wan import load_teacher
from tmd.programs.cli import main
from tmd.sampling import sample_few_step
from tmd.world.generate import load_world_model

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


PROMPT = "a red circle moving right"


@pytest.mark.parametrize("name", ["rcm", "meanflow"])
def test_tmd_generate_samples_a_few_step_run_as_its_method_does(tmp_path, tiny_assets, name, capsys):
    """rCM draws fresh noise on its own times and MeanFlow jumps as a flow map; sampled with DMD2-v's Eq. 18 steps
    instead (what `tmd generate` did before runs and student folders recorded their method) they would differ."""
    weights = train(tmp_path, name, tiny_assets)
    videos = tmp_path / "videos"
    args = ["generate", "--model", str(weights), "--prompt", PROMPT, "--steps", "2", "--save-latents", "--out", str(videos)]
    assert main(args) == 0
    generated = load_file(str(next(videos.glob("*.safetensors"))))["latents"]

    world = load_world_model(weights, torch.device("cpu"))
    noise = torch.randn(1, *world.assets.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond, _ = world.assets.encode_prompts([PROMPT])
    config = get_method(name).Config(**world.method["config"])
    with torch.no_grad():
        if name == "rcm":
            rng = torch.Generator().manual_seed(0)
            expected = RCM.sample(world.model, noise, cond, 2, rng, config.sigma_max, tuple(config.sample_times))
            assert (sample_few_step(world.model, noise, cond, 2) - expected).abs().max() > 1e-2  # Eq. 18 differs
        else:
            expected = sample_mean_flow(world.model, noise, cond, 2, config.outer_shift)
    torch.testing.assert_close(generated, expected[0], rtol=0, atol=1e-6)
    if name == "rcm":  # a stock WanPipeline's Euler steps are not rCM's: its pipeline export is refused in one line
        export = ["export", "--run", str(weights), "--teacher", str(tiny_assets / "teacher"), "--format", "pipeline"]
        assert main([*export, "--out", str(tmp_path / "pipe")]) == 2
        assert "samples with fresh noise at each step" in capsys.readouterr().err
