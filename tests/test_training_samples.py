"""Sample videos during training (``train.sample_every``): on the world and on prepared Wan data, in one process
and under torchrun; they change no weight and no logged loss."""

import numpy as np
import pytest
from safetensors.torch import load_file
from test_distributed import losses, prepared_tmd_config, torchrun
from test_generate import read_mp4
from test_prepare import FRAMES, SIZE, pipeline, videos  # noqa: F401  (fixtures)

from tmd.config import RunConfig, from_dict
from tmd.files import slug
from tmd.programs.cli import main
from tmd.train.hooks import curve_prompts
from tmd.train.samples import GRID_FILE, SAMPLES_DIR, WORLD_SCALE


def world_run(assets, out, **train):
    from tmd.train.run import train_run

    cfg = {
        "method_name": "tmd",
        "data_kind": "world",
        "data": {"assets": str(assets)},
        "method": {"head_blocks": 1, "outer_steps": 2, "inner_steps": 2, "generator_every": 2, "gan_weight": 0.03},
        "train": {"steps": 5, "batch_size": 2, "log_every": 1, "progress": False, "device": "cpu", "out_dir": str(out), **train},
    }
    return train_run(from_dict(RunConfig, cfg))


def step_folders(run_dir):
    return sorted(p.name for p in (run_dir / SAMPLES_DIR).iterdir())


def test_world_samples_at_the_steps_asked_for_and_the_run_is_unchanged(tiny_assets, tmp_path):
    # no prompts given: 4 of the world's 72
    sampled = world_run(tiny_assets, tmp_path / "sampled", sample_every=2, tensorboard=True)
    # before the first step, every 2 steps and after the last (5)
    assert step_folders(tmp_path / "sampled") == ["step_0000000", "step_0000002", "step_0000004", "step_0000005"]
    for folder in (tmp_path / "sampled" / SAMPLES_DIR).iterdir():
        assert sorted(p.name for p in folder.iterdir()) == sorted([GRID_FILE, *(f"{slug(p)}.mp4" for p in curve_prompts(4))])
        frames = read_mp4(folder / f"{slug(curve_prompts(4)[0])}.mp4")
        assert frames[0].shape == (32 * WORLD_SCALE, 32 * WORLD_SCALE, 3)
    events = list((tmp_path / "sampled" / "tensorboard").glob("events.*"))
    assert events and b"samples" in events[0].read_bytes()

    plain = world_run(tiny_assets, tmp_path / "plain", tensorboard=False)
    assert not (tmp_path / "plain" / SAMPLES_DIR).exists()
    assert losses(tmp_path / "sampled") == losses(tmp_path / "plain")  # bit-identical, not close
    a, b = load_file(str(sampled.weights)), load_file(str(plain.weights))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_prepared_data_samples_through_the_teachers_vae(tmp_path, videos, pipeline, capsys):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n\na blue square\n")
    train = f"steps: 2, batch_size: 2, progress: false, tensorboard: false, sample_every: 2, sample_prompts: {prompts}"
    config = prepared_tmd_config(tmp_path, videos, pipeline, train)
    assert main(["train", "--config", str(config), f"train.out_dir={tmp_path / 'run'}"]) == 0
    assert step_folders(tmp_path / "run") == ["step_0000000", "step_0000002"]
    for name in ("a-red-circle-moving-left", "a-blue-square"):
        frames = read_mp4(tmp_path / "run" / SAMPLES_DIR / "step_0000002" / f"{name}.mp4")
        assert len(frames) == FRAMES and frames[0].shape == (SIZE, SIZE, 3)
    assert (tmp_path / "run" / SAMPLES_DIR / "step_0000002" / GRID_FILE).is_file()
    # a word the teacher's tokenizer does not know stops the run before it trains
    bad = ["train", "--config", str(config), f"train.out_dir={tmp_path / 'bad'}", "train.sample_prompts=[a purple circle]"]
    assert main(bad) == 2
    assert "train.sample_prompts: prompt 'a purple circle' has unknown word(s) ['purple']" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow  # three runs, two of them two processes starting on CPU: about a minute
def test_samples_under_torchrun_are_written_by_rank_0_and_change_nothing(tmp_path, videos, pipeline):  # noqa: F811
    train = "steps: 2, batch_size: 2, log_every: 1, progress: false, tensorboard: false, sample_prompts: [a red circle]"
    config = prepared_tmd_config(tmp_path, videos, pipeline, train)
    common = ["train", "--config", str(config)]
    result = torchrun(2, *common, f"train.out_dir={tmp_path / 'two'}", "train.sample_every=1")
    assert step_folders(tmp_path / "two") == ["step_0000000", "step_0000001", "step_0000002"]
    assert result.stdout.count("samples at step 1 ") == 1  # rank 0 alone writes
    # the sharded generator got its training weights back after the samples between steps 1 and 2
    torchrun(2, *common, f"train.out_dir={tmp_path / 'plain'}")
    assert losses(tmp_path / "two") == losses(tmp_path / "plain")
    a, b = (load_file(str(tmp_path / run / "student.safetensors")) for run in ("two", "plain"))
    assert all((a[k] == b[k]).all() for k in a)
    # and sampled with the EMA weights as one process does (to the codec's rounding)
    assert main([*common, f"train.out_dir={tmp_path / 'one'}", "train.sample_every=2"]) == 0
    for run in ("one", "two"):
        frames = read_mp4(tmp_path / run / SAMPLES_DIR / "step_0000002" / "a-red-circle.mp4")
        assert len(frames) == FRAMES
    one, two = (np.stack(read_mp4(tmp_path / run / SAMPLES_DIR / "step_0000002" / "a-red-circle.mp4")) for run in ("one", "two"))
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.sample_every=-1", "sample_every must be >= 0"),
        ("train.sample_prompts=MISSING", "prompt file"),
        ("train.sample_prompts=EMPTY", "holds no prompts"),
        ("train.sample_prompts=[purple, hexagon]", "train.sample_prompts"),
    ],
)
def test_bad_sample_options_are_one_line_errors(tiny_assets, tmp_path, capsys, override, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    override = override.replace("MISSING", str(tmp_path / "missing.txt")).replace("EMPTY", str(empty))
    args = ["train", "--config", "world_dmd2.yaml", f"data.assets={tiny_assets}", f"train.out_dir={tmp_path / 'run'}"]
    assert main([*args, "train.sample_every=2", override, "train.progress=false"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not the loaders' bars
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_sample_videos_go_to_wandb_and_to_tensorboard_as_frames(tmp_path, monkeypatch):
    import sys
    import types

    import torch

    from tmd.train.logging import MetricLogger, frame_grid

    logged = []
    run = types.SimpleNamespace(log=lambda data, step: logged.append((data, step)), finish=lambda: None)
    fake = types.SimpleNamespace(init=lambda **kwargs: run, Video=lambda path: ("video", path))
    monkeypatch.setitem(sys.modules, "wandb", fake)  # wandb is not a dependency; its two calls are what matters
    logger = MetricLogger(tmp_path, tensorboard=True, wandb=True)
    clips = {"a": torch.zeros(12, 8, 6, 3, dtype=torch.uint8), "b": torch.full((12, 8, 6, 3), 255, dtype=torch.uint8)}
    logger.log_videos(4, clips, {"a": tmp_path / "a.mp4", "b": tmp_path / "b.mp4"}, fps=8)
    logger.close()
    assert logged == [({"samples/a": ("video", str(tmp_path / "a.mp4")), "samples/b": ("video", str(tmp_path / "b.mp4"))}, 4)]
    grid = frame_grid(list(clips.values()))  # a row per video, 8 of its 12 frames
    assert grid.shape == (16, 48, 3) and grid[:8].max() == 0 and grid[8:].min() == 255
    assert b"samples" in next((tmp_path / "tensorboard").glob("events.*")).read_bytes()


def test_ema_weights_swap_in_and_back_bit_for_bit():
    from torch import nn

    from tmd.train.samples import ema_weights
    from tmd.train.update import EMA

    module = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    module[0].requires_grad_(False)  # a LoRA run's base weight: its "EMA" is the weight itself
    ema = EMA(module, decay=0.5)
    for ema_value in ema.shadow.values():
        ema_value.add_(1.0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    frozen_storage = module[0].weight.data_ptr()
    with ema_weights(module.train(), ema.full_state()):
        assert not module.training
        assert all((module.state_dict()[k] == v).all() for k, v in ema.full_state().items())
    assert module.training and module[0].weight.data_ptr() == frozen_storage
    assert all((module.state_dict()[k] == v).all() for k, v in before.items())
