"""torchrun with 2 gloo processes on CPU: FSDP2-sharded TMD training equals one process with the same global
batch, resumes across world sizes, and its student exports and generates an mp4."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_generate import FRAMES, HEIGHT, WIDTH, generate_args, read_mp4
from test_prepare import pipeline, run_prepare, videos  # noqa: F401  (fixtures)

from tmd.models.wan import cast_floating
from tmd.programs.cli import main
from tmd.rng import BatchRandom
from tmd.train.distributed import DistContext, check_global_batch, slice_batch
from tmd.train.logging import read_metrics


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "tmd", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def losses(run_dir):
    return [{k: v for k, v in r.items() if k.startswith(("loss/", "generator/", "grad_norm/"))} for r in read_metrics(run_dir)]


def assert_close_records(a, b):
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key


def assert_same_weights(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def prepared_tmd_config(tmp_path, videos, pipeline, train):  # noqa: F811
    """The videos prepared into tmp_path / "data" and a TMD run on them whose train block is ``train``."""
    folder, captions = videos
    run_prepare(folder, captions, pipeline, tmp_path / "data")
    config = tmp_path / "tmd.yaml"
    config.write_text(
        "method_name: tmd\ndata_kind: prepared\n"
        "method: {head_blocks: 1, outer_steps: 2, inner_steps: 2, generator_every: 2, gan_weight: 0.03}\n"
        f"data: {{path: {tmp_path / 'data'}}}\n"
        f"train: {{{train}}}\n"
    )
    return config


def test_prepare_train_on_two_processes_export_generate(tmp_path, videos, pipeline):  # noqa: F811
    train = "steps: 4, batch_size: 4, log_every: 1, checkpoint_every: 2, progress: false, tensorboard: false"
    config = prepared_tmd_config(tmp_path, videos, pipeline, train)
    common = ["train", "--config", str(config)]
    assert main([*common, f"train.out_dir={tmp_path / 'one'}"]) == 0
    torchrun(2, *common, f"train.out_dir={tmp_path / 'two'}")
    # the same global batch of 4, split 2 + 2: the same losses, gradient norms and trained weights
    assert_close_records(losses(tmp_path / "two"), losses(tmp_path / "one"))
    assert_same_weights(tmp_path / "two" / "student.safetensors", tmp_path / "one" / "student.safetensors")
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step_0000004" / "state").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]

    # stopped after 2 steps on 2 processes, finished on 1: the uninterrupted run's result
    torchrun(2, *common, f"train.out_dir={tmp_path / 'resumed'}", "train.steps=2")
    assert main([*common, f"train.out_dir={tmp_path / 'resumed'}", "--resume"]) == 0
    assert_close_records(losses(tmp_path / "resumed"), losses(tmp_path / "one"))
    assert_same_weights(tmp_path / "resumed" / "student.safetensors", tmp_path / "one" / "student.safetensors")

    student = tmp_path / "student"
    assert (
        main(
            ["export", "--run", str(tmp_path / "two" / "student.safetensors"), "--teacher", str(pipeline), "--out", str(student)]
        )
        == 0
    )
    assert main(generate_args(student, tmp_path / "videos_out", "--steps", "2", "--inner-steps", "2")) == 0
    frames = read_mp4(tmp_path / "videos_out" / "0000-a-red-circle.mp4")
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)
    assert json.loads((tmp_path / "two" / "student.json").read_text())["step"] == 4


def test_batch_random_rows_do_not_depend_on_the_split():
    whole = BatchRandom(torch.Generator().manual_seed(3)).randn((6, 2, 3))
    parts = [BatchRandom(torch.Generator().manual_seed(3), rank, 3).randn((2, 2, 3)) for rank in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    uniform = [BatchRandom(torch.Generator().manual_seed(3), rank, 2) for rank in range(2)]
    assert torch.equal(torch.cat([u.rand(2) for u in uniform]), BatchRandom(torch.Generator().manual_seed(3)).rand(4))
    assert len({u.shared_randint(1000) for u in uniform}) == 1


def test_global_batch_slicing_and_errors():
    batch = {"x": torch.arange(8).reshape(4, 2), "neg_cond": torch.zeros(1, 3), "prompts": list("abcd"), "latent_shape": (4, 2)}
    part = slice_batch(batch, rank=1, world_size=2, global_size=4)
    assert part["x"].tolist() == [[4, 5], [6, 7]] and part["prompts"] == ["c", "d"]
    assert part["neg_cond"].shape == (1, 3) and part["latent_shape"] == (4, 2)
    with pytest.raises(ValueError, match="batch_size=6 is the global batch and must divide evenly over 4 processes"):
        check_global_batch(6, DistContext(rank=0, world_size=4))


CHECKPOINTED_BLOCK_INPUTS = """
import os, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
import tmd.models.wan as wan
from tmd.programs.gpu_check_spec import build_teacher, inputs, make_spec
from tmd.train.distributed import shard_model

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
seen, original = set(), wan.checkpoint
def spy(block, *args, **kwargs):
    seen.update(str(a.dtype) for a in torch.utils._pytree.tree_leaves(args) if a.is_floating_point())
    return original(block, *args, **kwargs)
wan.checkpoint = spy
spec = make_spec(True, "cpu")
teacher = build_teacher(spec, torch.float32).train()
teacher.activation_checkpointing = True
shard_model(teacher, init_device_mesh("cpu", (1,)), mixed_precision=True)
noise, cond, _ = inputs(spec)
with torch.autocast("cpu", dtype=torch.bfloat16):
    teacher.velocity(noise, torch.full((1,), 0.5), cond).square().mean().backward()
print(sorted(seen))
dist.destroy_process_group()
"""


def test_checkpointed_fsdp_blocks_receive_inputs_in_the_compute_dtype():
    """torch < 2.13 skips FSDP2's input cast when activation checkpointing recomputes a block, and the
    recompute then fails (bf16 saved, float32 recomputed; seen on an H200 with torch 2.11): the inputs must be
    cast before the checkpointed region, so the recompute sees what the forward saw on every torch version."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PORT": str(29500 + os.getpid() % 400)}
    result = subprocess.run(
        [sys.executable, "-c", CHECKPOINTED_BLOCK_INPUTS], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['torch.bfloat16']"


def test_cast_floating_leaves_complex_and_integer_tensors():
    real, complex_, index = torch.ones(2), torch.ones(2, dtype=torch.complex64), torch.arange(2)
    cast = cast_floating((real, [complex_, index]), torch.bfloat16)
    assert cast[0].dtype == torch.bfloat16 and cast[1][0].dtype == torch.complex64 and cast[1][1].dtype == torch.int64
    assert cast_floating(real, None) is real
