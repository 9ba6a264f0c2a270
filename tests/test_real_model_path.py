"""The path of docs/real_models.md, end to end on a tiny random Wan pipeline that diffusers writes: a prompt list,
``tmd synthesize`` (a shard lost and the command resumed), TMD stage 1 and stage 2 from the shipped Wan2.1 configs (with sample videos during stage 2),
``tmd export --format pipeline``, then ``tmd generate`` and diffusers' own loader. Once in one process and once
under ``torchrun`` with 2 gloo processes; both must train the same student from the same synthesized data."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import assert_same_weights, torchrun
from test_generate import FRAMES, HEIGHT, SIZE, WIDTH, build_tiny_pipeline, generate_args, read_mp4

from tmd.pipelines.tmd_pipeline import TMDPipeline
from tmd.programs.cli import main

PROMPTS = "a red circle moving left\n\na blue square\na red square moving right\n"
# the shipped configs at the tiny model's scale: 1 of its 4 blocks as the head, 2 + 3 steps, fp32 (the CPU's bf16
# conv3d gradients are not finite, benchmarks/gpu_check_fsdp.py) and a global batch of 2 (1 per process)
SMALL = ["method.head_blocks=1", "train.batch_size=2", "train.precision=fp32", "train.log_every=1", "train.progress=false"]
SMALL += ["train.tensorboard=false", "train.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("wan"))


def one_process(*args):
    assert main([str(a) for a in args]) == 0


def two_processes(*args):
    torchrun(2, *[str(a) for a in args])


def documented_path(root, pipeline, launch):
    """Each command of docs/real_models.md with ``launch`` (one process or torchrun), at the tiny pipeline's size."""
    root.mkdir()
    prompts = root / "prompts.txt"
    prompts.write_text(PROMPTS)
    data = root / "data"
    synthesize = ["synthesize", "--model", pipeline, "--prompts", prompts, "--out", data, *SIZE, "--steps", 2, "--keep-noise"]
    launch(*synthesize, "--shard-size", 1)
    # interrupted: a shard lost (as a kill before its atomic rename leaves it), then the same command resumes
    lost = load_file(data / "shard-00001.safetensors")
    (data / "shard-00001.safetensors").unlink()
    launch(*synthesize, "--shard-size", 1)
    redone = load_file(data / "shard-00001.safetensors")
    assert redone.keys() == lost.keys() and all(torch.equal(redone[k], lost[k]) for k in lost)
    stage1, stage2 = root / "stage1", root / "stage2"
    launch(
        "train", "--config", "wan1.3b_tmd_stage1.yaml", f"data.path={data}", *SMALL, "train.steps=2", f"train.out_dir={stage1}"
    )
    sampling = ["train.sample_every=2", f"train.sample_prompts={prompts}"]
    init = f"method.init_from={stage1 / 'student.safetensors'}"
    launch(
        "train",
        "--config",
        "wan1.3b_tmd_stage2.yaml",
        f"data.path={data}",
        *SMALL,
        init,
        "train.steps=3",
        *sampling,
        f"train.out_dir={stage2}",
    )
    return data, stage2


def test_prompts_to_a_few_step_pipeline(tmp_path, pipeline):
    runs = {}
    for name, launch in (("one", one_process), ("two", two_processes)):
        data, runs[name] = documented_path(tmp_path / name, pipeline, launch)
        index = json.loads((data / "index.json").read_text())
        assert index["samples"] == 3 and index["model"] == str(pipeline.resolve())
        # sample videos before the first step, every 2 steps and after the last: one mp4 per prompt and a grid
        assert sorted(p.name for p in (runs[name] / "samples").iterdir()) == ["step_0000000", "step_0000002", "step_0000003"]
        last = runs[name] / "samples" / "step_0000003"
        assert len(list(last.glob("*.mp4"))) == 3 and (last / "grid.gif").is_file()
    # the same data and global batch on one process and on two: the same student
    assert_same_weights(runs["two"] / "student.safetensors", runs["one"] / "student.safetensors")

    exported = tmp_path / "pipeline"
    weights = runs["two"] / "student.safetensors"
    assert (
        main(["export", "--run", str(weights), "--teacher", str(pipeline), "--out", str(exported), "--format", "pipeline"]) == 0
    )
    assert main(generate_args(exported, tmp_path / "videos", "--steps", "2", "--inner-steps", "2")) == 0
    frames = read_mp4(tmp_path / "videos" / "0000-a-red-circle.mp4")
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)
    pipe = TMDPipeline.from_pretrained(exported)
    assert pipe.transformer is not None
