import json

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_generate import build_tiny_pipeline

from tmd.config import ConfigError, RunConfig, load_config
from tmd.data import prepare as prep
from tmd.data.prepare import PreparedDataset, load_clip, prepare
from tmd.models.vae import load_vae, normalize_latents
from tmd.programs.cli import main

FRAMES, SIZE = 5, 32


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("wan"))


def write_video(path, frames, height=40, width=48, fps=16, seed=0):
    video = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    imageio.mimwrite(path, video, format="FFMPEG", fps=fps, macro_block_size=8)


@pytest.fixture
def videos(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "good.mp4", 10)
    write_video(folder / "short.mp4", 3)
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    write_video(folder / "slow.mp4", 4, height=48, width=40, fps=8, seed=1)  # 8 fps: each frame is used twice
    captions = tmp_path / "captions.json"
    captions.write_text(
        json.dumps(
            {
                "good.mp4": "a red circle moving left",
                "short.mp4": "a blue square",
                "corrupt.mp4": "a red square",
                "slow.mp4": "a blue circle moving right",
            }
        )
    )
    return folder, captions


def run_prepare(folder, captions, pipeline, out, **kwargs):
    return prepare(
        out,
        pipeline,
        videos=folder,
        captions=captions,
        frames=FRAMES,
        height=SIZE,
        width=SIZE,
        shard_size=2,
        workers=2,
        negative_prompt="",
        progress=False,
        **kwargs,
    )


def cli_args(pipeline, out, *extra):
    """`tmd prepare` arguments for the tiny pipeline at the clip size the other tests use."""
    return [
        "prepare",
        "--model",
        str(pipeline),
        "--out",
        str(out),
        "--frames",
        str(FRAMES),
        "--height",
        str(SIZE),
        "--width",
        str(SIZE),
        *extra,
    ]


def test_prepare_videos(tmp_path, videos, pipeline, monkeypatch, caplog):
    folder, captions = videos
    out = tmp_path / "data"
    index = run_prepare(folder, captions, pipeline, out)

    assert index["samples"] == 2 and index["skipped"] == 2 and len(index["shards"]) == 2
    reasons = {s["video"]: s["reason"] for s in index["skipped_videos"]}
    assert reasons["short.mp4"].startswith("too short") and reasons["corrupt.mp4"].startswith("cannot decode")
    assert "skipped corrupt.mp4" in caplog.text
    assert json.loads((out / "index.json").read_text()) == index
    assert index["latent_shape"] == [4, 2, 4, 4] and index["text_max_length"] == 16

    shard = load_file(out / "shard-00000.safetensors")
    assert shard["latents"].shape == (1, 4, 2, 4, 4)
    assert shard["cond"].shape == (1, 6, 32) and shard["cond_lengths"].tolist() == [6]  # 5 words + </s>
    vae = load_vae(pipeline)
    clip = load_clip(folder / "good.mp4", FRAMES, SIZE, SIZE, 16)
    assert clip.shape == (3, FRAMES, SIZE, SIZE) and -1 <= clip.min() and clip.max() <= 1
    expected = normalize_latents(vae, vae.encode(clip[None]).latent_dist.mode())[0]
    torch.testing.assert_close(shard["latents"][0], expected)
    slow = load_clip(folder / "slow.mp4", FRAMES, SIZE, SIZE, 16)
    assert torch.equal(slow[:, 0], slow[:, 1]) and not torch.equal(slow[:, 1], slow[:, 2])

    # resume: nothing left to do, so no video is decoded and no shard rewritten
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    monkeypatch.setattr(prep, "load_clip", lambda *a: pytest.fail("a resumed, finished run decoded a video"))
    assert run_prepare(folder, captions, pipeline, out) == index
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    monkeypatch.undo()
    # a lost shard is redone, alone, to the same index
    (out / "shard-00001.safetensors").unlink()
    assert run_prepare(folder, captions, pipeline, out) == index
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == stamps["shard-00000.safetensors"]

    with pytest.raises(ValueError, match="other settings"):
        prepare(
            out,
            pipeline,
            videos=folder,
            captions=captions,
            frames=9,
            height=SIZE,
            width=SIZE,
            shard_size=2,
            negative_prompt="",
            progress=False,
        )


def test_prepared_dataset(tmp_path, videos, pipeline):
    folder, captions = videos
    out = tmp_path / "data"
    run_prepare(folder, captions, pipeline, out)
    data = PreparedDataset(out, batch_size=3, seed=1)
    first = data.next_batch()  # 3 samples from 2: crosses into the second epoch
    assert first["x"].shape == (3, 4, 2, 4, 4)
    assert first["cond"].shape == first["neg_cond"].shape == (3, 16, 32)
    assert sorted(first["prompts"][:2]) == ["a blue circle moving right", "a red circle moving left"]
    negative = load_file(out / "negative.safetensors")["cond"][0]
    torch.testing.assert_close(first["neg_cond"][0, : negative.shape[0]], negative)
    assert first["neg_cond"][0, negative.shape[0] :].abs().sum() == 0

    state = data.state_dict()
    expected = data.next_batch()
    resumed = PreparedDataset(out, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    again = resumed.next_batch()
    assert again["prompts"] == expected["prompts"] and torch.equal(again["x"], expected["x"])
    with pytest.raises(ValueError, match="data seed"):
        PreparedDataset(out, batch_size=3, seed=2).load_state_dict(state)

    cfg = load_config(RunConfig, overrides=["method_name=tm", "data_kind=prepared", f"data.path={out}"])
    assert cfg.data.path == str(out)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, overrides=["method_name=tm", "data_kind=prepared", f"data.path={tmp_path / 'none'}"])


def test_prepare_text_only_cli(tmp_path, pipeline, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square moving left\na circle\n")
    out = tmp_path / "text"
    args = cli_args(pipeline, out, "--text-only", "--prompts", str(prompts), "--shard-size", "2", "--negative-prompt", "")
    assert main(args) == 0
    assert "3 samples in 2 shards" in capsys.readouterr().out
    batch = PreparedDataset(out, batch_size=2).next_batch()
    assert batch["latent_shape"] == (4, 2, 4, 4) and "x" not in batch and batch["cond"].shape == (2, 16, 32)

    assert main(["prepare", "--model", str(pipeline), "--out", str(out), "--prompts", str(prompts)]) == 2
    assert "--videos DIR and --captions FILE" in capsys.readouterr().err
    args = ["prepare", "--model", str(tmp_path), "--out", str(tmp_path / "x"), "--text-only", "--prompts", str(prompts)]
    assert main(args) == 2
    assert "pipeline root" in capsys.readouterr().err


def _run_config(tmp_path, method, data, extra_method=""):
    config = tmp_path / f"{method}.yaml"
    config.write_text(
        f"method_name: {method}\ndata_kind: prepared\nmethod: {{head_blocks: 1, outer_steps: 2{extra_method}}}\n"
        f"data: {{path: {data}}}\n"
        f"train: {{steps: 2, batch_size: 2, progress: false, tensorboard: false, out_dir: {tmp_path / method}}}\n"
    )
    return config


def test_train_on_prepared_data(tmp_path, videos, pipeline):
    """`tmd train` on a prepared folder distils the pipeline the data was prepared with."""
    folder, captions = videos
    data = tmp_path / "data"
    run_prepare(folder, captions, pipeline, data)
    assert main(["train", "--config", str(_run_config(tmp_path, "tm", data))]) == 0
    assert "fusion.gate_logit" in load_file(str(tmp_path / "tm" / "student.safetensors"))

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square moving left\n")
    text = tmp_path / "text"
    assert main(cli_args(pipeline, text, "--text-only", "--prompts", str(prompts), "--negative-prompt", "")) == 0
    # data-free: the DMD2 generator learns from prompts alone, from simulated noise (no data to noise, and
    # no GAN: it would need real latents)
    config = (
        _run_config(tmp_path, "dmd2", text, ", gan_weight: 0.0, student_input: backward")
        .read_text()
        .replace("head_blocks: 1, ", "")
    )
    (tmp_path / "dmd2.yaml").write_text(config)
    assert main(["train", "--config", str(tmp_path / "dmd2.yaml")]) == 0
    assert (tmp_path / "dmd2" / "student.safetensors").is_file()


def test_prepare_with_the_default_negative_prompt_and_a_failed_first_try(tmp_path, videos, pipeline, capsys, monkeypatch):
    """Wan's negative prompt encodes on a word-level pipeline; a try that fails before its first shard
    (a caption the tokenizer cannot encode, a crash in the VAE) does not hold the folder to its settings."""
    folder, captions = videos
    out = tmp_path / "data"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"good.mp4": "a red circle", "slow.mp4": "a green circle"}))
    args = cli_args(pipeline, out, "--videos", str(folder), "--shard-size", "2")
    assert main([*args, "--captions", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: prompt 'a green circle' has unknown word(s) ['green']" in err and "bright" not in err
    assert not (out / prep.SETTINGS_FILE).exists()

    def out_of_memory(self, clip):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(prep._Encoders, "encode_video", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_prepare(folder, captions, pipeline, out)
    assert (out / "negative.safetensors").is_file() and not (out / prep.SETTINGS_FILE).exists()
    monkeypatch.undo()
    # the same folder, now with good captions and another negative prompt
    assert main([*args, "--captions", str(captions), "--negative-prompt", "a square"]) == 0
    assert load_file(out / "negative.safetensors")["cond"].shape == (1, 3, 32)  # a square </s>: the new one
    assert json.loads((out / prep.SETTINGS_FILE).read_text())["negative_prompt"] == "a square"
    # the default (Wan's) negative prompt, most of whose words the tokenizer lacks
    text = tmp_path / "text"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert main(cli_args(pipeline, text, "--text-only", "--prompts", str(prompts))) == 0
    assert load_file(text / "negative.safetensors")["cond"].shape == (1, 16, 32)  # cut to the encoder's 16 tokens
