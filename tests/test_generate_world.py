"""tmd generate on the synthetic world: a run's student.safetensors, its export and the world teacher to mp4 + GIF."""

import json

import imageio.v2 as imageio
import torch
from safetensors.torch import load_file
from test_generate import read_mp4

from tmd.config import RunConfig, from_dict
from tmd.programs.cli import main
from tmd.sampling import sample_tmd
from tmd.train.run import train_run
from tmd.world.data import DEFAULT_ASSETS, TEACHER_DIR, WorldAssets
from tmd.world.generate import SCALE

PROMPT = "a red circle moving right"


def train_world_tmd(assets, out_dir, gan_weight=0.0, **train):
    """A few CPU steps of TMD stage 2 (H = 1, M = N = 2) on the world; ``train`` adds to its train block."""
    method = {"head_blocks": 1, "outer_steps": 2, "inner_steps": 2, "generator_every": 2, "gan_weight": gan_weight}
    train = {
        "steps": 2,
        "batch_size": 2,
        "progress": False,
        "tensorboard": False,
        "device": "cpu",
        "out_dir": str(out_dir),
        **train,
    }
    cfg = from_dict(RunConfig, {"method_name": "tmd", "data_kind": "world", "method": method, "train": train})
    return train_run(cfg, assets=assets)


def test_world_run_export_and_teacher_to_mp4_and_gif(tmp_path, capsys):
    assets = WorldAssets()
    run = train_world_tmd(assets, tmp_path / "run")
    common = ["--prompt", PROMPT, "--steps", "2", "--inner-steps", "2", "--seed", "5", "--save-latents"]
    assert main(["generate", "--model", str(run.weights), *common, "--out", str(tmp_path / "from_run")]) == 0
    assert "1 videos written" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "from_run" / "generation.json").read_text())
    record = manifest["videos"][0]
    assert manifest["settings"]["kind"] == "tmd_student" and record["effective_nfe"] == flow_nfe(run.generator)
    frames, height, width = 8, 32, 32  # the world's videos
    mp4 = read_mp4(tmp_path / "from_run" / record["file"])
    gif = imageio.mimread(tmp_path / "from_run" / record["gif"])
    assert len(mp4) == len(gif) == frames and mp4[0].shape == (height * SCALE, width * SCALE, 3)
    assert gif[0].shape[:2] == (height * SCALE, width * SCALE)

    # the latents are the student's from the seeded noise
    latents = load_file(tmp_path / "from_run" / record["file"].replace(".mp4", ".safetensors"))["latents"]
    noise = torch.randn(1, *assets.latent_shape(), generator=torch.Generator().manual_seed(5))
    cond, _ = assets.encode_prompts([PROMPT])
    expected = sample_tmd(run.generator, noise, cond, 2, 2, torch.Generator().manual_seed(5))
    torch.testing.assert_close(latents, expected[0], rtol=1e-5, atol=1e-5)

    # its export gives the same video
    teacher = DEFAULT_ASSETS / TEACHER_DIR
    assert main(["export", "--run", str(run.weights), "--teacher", str(teacher), "--out", str(tmp_path / "export")]) == 0
    assert main(["generate", "--model", str(tmp_path / "export"), *common, "--out", str(tmp_path / "from_export")]) == 0
    again = load_file(tmp_path / "from_export" / record["file"].replace(".mp4", ".safetensors"))["latents"]
    torch.testing.assert_close(again, latents, rtol=1e-5, atol=1e-5)

    # the world teacher itself, with the world's CFG scale and shift
    assert (
        main(["generate", "--model", str(teacher), "--prompt", PROMPT, "--steps", "2", "--out", str(tmp_path / "teacher")]) == 0
    )
    settings = json.loads((tmp_path / "teacher" / "generation.json").read_text())["settings"]
    assert settings["kind"] == "teacher" and settings["guidance"] == assets.guidance and settings["shift"] == assets.shift
    capsys.readouterr()

    assert main(["generate", "--model", str(run.weights), "--prompt", "a purple circle", "--out", str(tmp_path / "x")]) == 2
    assert "not one of the world's 72 prompts" in capsys.readouterr().err
    (tmp_path / "run" / "config.yaml").write_text("method_name: tmd\ndata_kind: prepared\n")
    assert main(["generate", "--model", str(run.weights), "--prompt", PROMPT, "--out", str(tmp_path / "x")]) == 2
    assert "not a world one: export it first" in capsys.readouterr().err


def flow_nfe(student):
    from tmd import flow

    return flow.tmd_effective_nfe(2, 2, student.head_blocks, student.num_blocks)


def test_a_linvideo_run_generates_like_a_teacher(tmp_path):
    """LinVideo's linearised teacher is a multi-step model: sampled with the world's CFG, as the teacher."""
    run = tmp_path / "linvideo"
    assert (
        main(
            [
                "train",
                "--config",
                "world_linvideo.yaml",
                "train.steps=1",
                "train.batch_size=2",
                "method.selection_steps=1",
                f"train.out_dir={run}",
                "train.progress=false",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "generate",
                "--model",
                str(run / "student.safetensors"),
                "--prompt",
                PROMPT,
                "--steps",
                "2",
                "--out",
                str(tmp_path / "videos"),
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "videos" / "generation.json").read_text())
    assert manifest["settings"]["kind"] == "teacher" and manifest["videos"][0]["effective_nfe"] == 4
    assert (tmp_path / "videos" / manifest["videos"][0]["gif"]).is_file()
