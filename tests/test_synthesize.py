"""``tmd synthesize``: a teacher's samples in ``tmd prepare``'s format, resumable and split over processes alike."""

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_distributed import torchrun
from test_generate import build_tiny_pipeline
from test_tmd_recipe import B, KnownVelocity, batch, seeded

from tmd.data import prepare
from tmd.data.prepare import PreparedDataset
from tmd.errors import OutputPathError, PromptError
from tmd.methods import dmd2, get_method
from tmd.models.text import TextEncoder
from tmd.models.wan import load_teacher
from tmd.programs import synthesis
from tmd.programs.cli import main
from tmd.programs.generate import generate
from tmd.programs.synthesis import synthesize
from tmd.programs.synthesize import read_prompt_file

PROMPTS = ["a red circle moving left", "a blue square", "a red square moving right"]
SIZE = {"frames": 5, "height": 32, "width": 32}  # latents (4, 2, 4, 4)
SETTINGS = {**SIZE, "steps": 2, "videos_per_prompt": 2, "shard_size": 2, "batch_size": 1, "negative_prompt": "a blue circle"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("wan"))


@pytest.fixture(scope="module")
def synthesized(pipeline, tmp_path_factory):
    """One uninterrupted run with noise kept: 6 samples in 3 shards."""
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, synthesize(out, pipeline, PROMPTS, keep_noise=True, progress=False, **SETTINGS)


def shards(folder):
    """Every tensor and metadata of every shard and of the negative embedding, and the index."""
    result = {}
    for path in sorted([*folder.glob("shard-*.safetensors"), folder / "negative.safetensors"]):
        with safe_open(str(path), framework="pt") as handle:
            result[path.name] = ({k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata())
    return result, json.loads((folder / "index.json").read_text())


def assert_same_folder(a, b, exact=True):
    (shards_a, index_a), (shards_b, index_b) = shards(a), shards(b)
    assert index_a == index_b and shards_a.keys() == shards_b.keys()
    for name, (tensors, metadata) in shards_a.items():
        assert metadata == shards_b[name][1], name
        assert tensors.keys() == shards_b[name][0].keys()
        for key, tensor in tensors.items():
            if exact:
                assert torch.equal(tensor, shards_b[name][0][key]), f"{name}: {key}"
            else:
                torch.testing.assert_close(tensor, shards_b[name][0][key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def test_format_is_prepares_and_the_samples_are_generates(synthesized, pipeline, tmp_path):
    out, index = synthesized
    assert index["samples"] == 6 and [s["samples"] for s in index["shards"]] == [2, 2, 2]
    assert index["latent_shape"] == [4, 2, 4, 4] and index["model"] == str(pipeline.resolve())
    assert not (out / ".embeddings").exists() and not list(out.glob("*.tmp"))
    settings = json.loads((out / "synthesize.json").read_text())
    assert settings["scheduler"] == "FlowMatchEulerDiscreteScheduler" and settings["shift"] == 3.0 and settings["guidance"] == 5.0

    data = PreparedDataset(out, batch_size=6)
    got = data.next_batch()
    assert got["x"].shape == got["noise"].shape == (6, 4, 2, 4, 4) and got["cond"].shape == (6, 16, 32)
    first, metadata = shards(out)[0]["shard-00000.safetensors"]
    assert json.loads(metadata["captions"]) == [PROMPTS[0]] * 2 and json.loads(metadata["seeds"]) == [0, 1]
    text = TextEncoder.from_pretrained(pipeline)
    torch.testing.assert_close(got["neg_cond"][0], text.encode(["a blue circle"])[0])
    # sample i is tmd generate's video i: the same noise (seed + i), scheduler, CFG and negative prompt
    records = generate(
        pipeline,
        PROMPTS[:1] * 2,
        tmp_path / "gen",
        steps=2,
        negative_prompt="a blue circle",
        save_latents=True,
        progress=False,
        **SIZE,
    )
    for i, record in enumerate(records):
        assert torch.equal(first["noise"][i], torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(i))[0])
        with safe_open(str(tmp_path / "gen" / record["file"].replace(".mp4", ".safetensors")), framework="pt") as handle:
            assert torch.equal(first["latents"][i], handle.get_tensor("latents"))
    assert not torch.equal(first["latents"][0], first["latents"][1])  # two videos of one prompt, from two noises


def test_a_killed_run_resumes_to_the_uninterrupted_one(synthesized, pipeline, tmp_path, monkeypatch):
    out = tmp_path / "data"
    calls = []

    def dies_in_the_second_shard(self, *args):
        calls.append(1)
        if len(calls) == 3:  # shard 0 written, shard 1 half sampled
            raise KeyboardInterrupt
        return real(self, *args)

    real = synthesis.Sampler.sample
    monkeypatch.setattr(synthesis.Sampler, "sample", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        synthesize(out, pipeline, PROMPTS, keep_noise=True, progress=False, **SETTINGS)
    assert [p.name for p in out.glob("shard-*")] == ["shard-00000.safetensors"] and not (out / "index.json").exists()
    monkeypatch.undo()
    stamp = (out / "shard-00000.safetensors").stat().st_mtime_ns
    synthesize(out, pipeline, PROMPTS, keep_noise=True, progress=False, **SETTINGS)
    assert_same_folder(out, synthesized[0])
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == stamp  # kept, not redone
    # a lost shard is redone, alone
    (out / "shard-00001.safetensors").unlink()
    synthesize(out, pipeline, PROMPTS, keep_noise=True, progress=False, **SETTINGS)
    assert_same_folder(out, synthesized[0])

    with pytest.raises(ValueError, match=r"other settings \(steps: 2 -> 3\)"):
        synthesize(out, pipeline, PROMPTS, keep_noise=True, progress=False, **{**SETTINGS, "steps": 3})
    with pytest.raises(ValueError, match="frames: 5 -> 9"):
        synthesize(out, pipeline, PROMPTS, keep_noise=True, progress=False, **{**SETTINGS, "frames": 9})


def test_a_full_disk_is_one_line_and_leaves_no_partial_shard(synthesized, pipeline, tmp_path, monkeypatch):
    out = tmp_path / "data"
    real = prepare.save_safetensors

    def disk_full(tensors, path, metadata=None):
        if Path(path) == out / "shard-00001.tmp":  # the second shard, not its staged embeddings
            Path(path).write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata)

    monkeypatch.setattr(prepare, "save_safetensors", disk_full)
    with pytest.raises(OutputPathError, match="cannot write shard-00001.safetensors \\(No space left on device\\)"):
        synthesize(out, pipeline, PROMPTS, keep_noise=True, progress=False, **SETTINGS)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors"]
    monkeypatch.undo()
    synthesize(out, pipeline, PROMPTS, keep_noise=True, progress=False, **SETTINGS)
    assert_same_folder(out, synthesized[0])


def test_two_processes_write_the_one_process_folder(synthesized, pipeline, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    torchrun(
        2,
        "synthesize",
        "--model",
        str(pipeline),
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "two"),
        "--keep-noise",
        *args,
    )
    # torchrun's ranks run at one thread; at another thread count here float reductions may round differently
    assert_same_folder(tmp_path / "two", synthesized[0], exact=torch.get_num_threads() == 1)


def test_training_reads_a_synthesized_folder(synthesized, tmp_path):
    config = tmp_path / "dmd2.yaml"
    config.write_text(
        "method_name: dmd2\ndata_kind: prepared\n"
        "method: {outer_steps: 1, kd_warmup_steps: 1, gan_weight: 0.0}\n"
        f"data: {{path: {synthesized[0]}}}\n"
        f"train: {{steps: 2, batch_size: 2, log_every: 1, progress: false, tensorboard: false, out_dir: {tmp_path / 'run'}}}\n"
    )
    assert main(["train", "--config", str(config)]) == 0
    assert (tmp_path / "run" / "student.safetensors").is_file()


def test_kd_warmup_trains_on_the_stored_noise_data_pairs(monkeypatch):
    """With the data's (noise, x) pairs the one-step output from exactly that noise regresses x; no teacher sampling."""
    cfg = get_method("dmd2").Config(outer_steps=1, gan_weight=0.0, kd_warmup_steps=2, kd_teacher_steps=3, guidance=2.0)
    method = seeded(get_method("dmd2")(cfg, KnownVelocity(), KnownVelocity(), KnownVelocity()))
    monkeypatch.setattr(dmd2, "sample_teacher", lambda *a: pytest.fail("the teacher sampled a KD target the data holds"))
    data = {**batch(), "noise": torch.randn(B, 4, generator=torch.Generator().manual_seed(3))}
    losses = []
    method.training_step(data, 0, lambda group, loss, terms=None: losses.append(loss))
    noise = data["noise"]
    torch.testing.assert_close(losses[0], ((noise - 0.999 * (0.5 * noise + 0.999)) - data["x"]).pow(2).mean())


def test_the_world_teacher_synthesizes_prepared_data(tmp_path):
    out = tmp_path / "world"
    prompts = ["a red circle moving left", "a blue square moving up"]
    index = synthesize(out, "world", prompts, steps=2, shard_size=2, decode=True, progress=False)
    assert index["latent_shape"] == [8, 4, 8, 8] and (index["frames"], index["height"], index["width"]) == (8, 32, 32)
    assert len(list((out / "previews").glob("*.mp4"))) == 2
    assert PreparedDataset(out, batch_size=2).next_batch()["x"].shape == (2, 8, 4, 8, 8)
    assert load_teacher(index["model"]).config.in_channels == 8  # what data_kind: prepared loads as the teacher
    # a run on it samples videos with the world's own text encoder and autoencoder
    run = tmp_path / "run"
    train = ["train", "--config", "world_tmd_stage1.yaml", "data_kind=prepared", f"data.path={out}", "train.steps=1"]
    sampling = ["train.sample_every=1", "train.sample_prompts=[a red circle moving left]", "train.progress=false"]
    assert main([*train, "train.batch_size=2", *sampling, f"train.out_dir={run}"]) == 0
    assert (run / "samples" / "step_0000001" / "a-red-circle-moving-left.mp4").is_file()
    with pytest.raises(ValueError, match="--frames 81: the world's videos are 8 x 32 x 32"):
        synthesize(tmp_path / "other", "world", prompts, frames=81, progress=False)


def test_bad_input_is_one_line(pipeline, tmp_path, capsys):
    def error(*args):
        assert main(["synthesize", "--model", str(pipeline), "--out", str(tmp_path / "out"), *args]) == 2
        message = capsys.readouterr().err
        assert message.count("\n") == 1, message
        return message

    empty, blank, unknown = tmp_path / "empty.txt", tmp_path / "blank.txt", tmp_path / "unknown.txt"
    empty.write_text("")
    blank.write_text("\n  \n\n")
    unknown.write_text("a red circle\na green circle\n")
    assert f"--prompts {empty}: no prompts (the file is empty)" in error("--prompts", str(empty))
    assert f"--prompts {blank}: no prompts (3 lines, all blank)" in error("--prompts", str(blank))
    message = error("--prompts", str(unknown), "--frames", "5", "--height", "32", "--width", "32")
    assert f"--prompts {unknown}: prompt 'a green circle' has unknown word(s) ['green']" in message
    good = tmp_path / "good.txt"
    good.write_text("a red circle\n")
    assert "frames must be 4 k + 1" in error("--prompts", str(good), "--frames", "6", "--height", "32", "--width", "32")
    assert "height must be a positive multiple of 16" in error("--prompts", str(good), "--frames", "5", "--height", "24")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert "holds files and no synthesize.json" in error(
        "--prompts", str(good), *("--frames", "5", "--height", "32", "--width", "32")
    )
    not_wan = tmp_path / "not_wan"
    (not_wan / "transformer").mkdir(parents=True)
    assert main(["synthesize", "--model", str(not_wan), "--prompts", str(good), "--out", str(tmp_path / "o2")]) == 2
    assert "is not a diffusers Wan pipeline root: it lacks transformer/config.json, vae/config.json" in capsys.readouterr().err


def test_blank_lines_are_skipped_with_a_count(tmp_path, caplog):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n  \na blue square\n")
    with caplog.at_level("INFO"):
        assert read_prompt_file(path) == ["a red circle", "a blue square"]
    assert "skipped 2 blank lines" in caplog.text
    with pytest.raises(PromptError, match="empty once cleaned"):
        synthesis.check_prompts(None, ["a red circle", "&nbsp;"], "--prompts p.txt")
