"""Students as diffusers pipelines (TMDPipeline; DMD2-v in a stock WanPipeline) and the teacher sampled
with the scheduler its pipeline ships (UniPC), each against our own sampler."""

import json

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils import export_to_video
from safetensors.torch import load_file, save_file
from test_generate import (  # noqa: F401  (fixture)
    FRAMES,
    HEIGHT,
    WIDTH,
    build_tiny_pipeline,
    generate_args,
    perturbed,
    pipeline,
    read_mp4,
    wan_pipeline_latents,
)

from tmd import flow
from tmd.models.split import TMDStudent
from tmd.models.text import TextEncoder
from tmd.models.wan import load_teacher
from tmd.pipelines import TMDPipeline, export_pipeline
from tmd.pipelines.export import FEW_STEP_FILE, scheduler_grid
from tmd.programs.cli import main
from tmd.sampling import sample_few_step, sample_tmd, sample_with_scheduler

SIZE = {"height": HEIGHT, "width": WIDTH, "num_frames": FRAMES}


def inputs(pipeline):  # noqa: F811
    cond = TextEncoder.from_pretrained(pipeline).encode(["a red circle", "a blue square"])
    noise = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    return noise, cond


def test_tmd_pipeline_equals_the_tmd_sampler_and_exports_video(tmp_path, pipeline):  # noqa: F811
    student = perturbed(TMDStudent.from_teacher(load_teacher(pipeline), head_blocks=1, fusion="concat")).eval()
    export_pipeline(student, tmp_path / "tmd", pipeline, {"num_outer_steps": 2, "num_inner_steps": 3})
    index = json.loads((tmp_path / "tmd" / "model_index.json").read_text())
    assert index["_class_name"] == "TMDPipeline" and index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    pipe = TMDPipeline.from_pretrained(tmp_path / "tmd")
    noise, cond = inputs(pipeline)
    out = pipe(prompt_embeds=cond, latents=noise, generator=torch.Generator().manual_seed(1), output_type="latent", **SIZE)
    assert isinstance(out, WanPipelineOutput)  # the config's M = 2, N = 3 when the call names none
    torch.testing.assert_close(
        out.frames, sample_tmd(student, noise, cond, 2, 3, torch.Generator().manual_seed(1)), rtol=0, atol=0
    )
    latents = pipe(
        prompt_embeds=cond,
        latents=noise,
        num_outer_steps=1,
        num_inner_steps=2,
        output_type="latent",
        generator=torch.Generator().manual_seed(1),
        return_dict=False,
        **SIZE,
    )[0]
    torch.testing.assert_close(latents, sample_tmd(student, noise, cond, 1, 2, torch.Generator().manual_seed(1)), rtol=0, atol=0)

    # a WanPipeline user's script: prompt in, frames out, export_to_video
    frames = pipe(prompt="a red circle", negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **SIZE).frames
    assert frames.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    export_to_video(frames[0], str(tmp_path / "video.mp4"), fps=16)
    assert len(read_mp4(tmp_path / "video.mp4")) == FRAMES

    pipe.save_pretrained(tmp_path / "saved")
    again = TMDPipeline.from_pretrained(tmp_path / "saved")
    assert torch.equal(
        again(prompt_embeds=cond, latents=noise, generator=torch.Generator().manual_seed(1), output_type="latent", **SIZE).frames,
        out.frames,
    )
    # in bf16 the gap embedder stays fp32 (it reads the fp32 sinusoidal projection), as in TMDStudent
    half = TMDPipeline.from_pretrained(tmp_path / "tmd", torch_dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16 and half.tmd_parts.gap_embedder.linear_1.weight.dtype == torch.float32
    bf16 = half(
        prompt_embeds=cond, latents=noise, generator=torch.Generator().manual_seed(1), output_type="latent", **SIZE
    ).frames
    torch.testing.assert_close(bf16, out.frames, rtol=0.1, atol=0.1)
    args = generate_args(tmp_path / "tmd", tmp_path / "videos", "--steps", "2", "--inner-steps", "3", "--dtype", "bf16")
    assert main(args) == 0
    assert json.loads((tmp_path / "videos" / "generation.json").read_text())["settings"]["kind"] == "tmd_student"


@pytest.mark.parametrize("steps, tolerance", [(1, 1e-5), (2, 1e-5), (4, 5e-3)])
def test_stock_wan_pipeline_runs_a_dmd2_student(tmp_path, pipeline, steps, tolerance):  # noqa: F811
    """1 and 2 steps: the stock scheduler's grid is the student's (to the bit) and stock WanPipeline gives
    our sampler's output to float rounding; 4 steps: the closest stock grid starts at 1 instead of 0.999
    (its other points match), measured max |difference| 2.4e-3 on latents of size ~4."""
    generator = perturbed(load_teacher(pipeline), seed=3).eval()
    export_pipeline(generator, tmp_path / "dmd2", pipeline, {"num_outer_steps": steps})
    wan = WanPipeline.from_pretrained(tmp_path / "dmd2")
    grid, stock_grid = flow.outer_grid(steps).float(), scheduler_grid(wan.scheduler, steps).float()
    if steps <= 2:
        assert torch.equal(stock_grid, grid)
    else:
        assert float(stock_grid[0]) == 1.0 and torch.allclose(stock_grid[1:], grid[1:], atol=1e-6)
    noise, cond = inputs(pipeline)
    stock = wan(
        prompt_embeds=cond, latents=noise, num_inference_steps=steps, guidance_scale=1.0, output_type="latent", **SIZE
    ).frames
    ours = sample_few_step(generator, noise, cond, steps)
    difference = float((stock - ours).abs().max())
    assert difference <= tolerance, difference
    record = json.loads((tmp_path / "dmd2" / FEW_STEP_FILE).read_text())
    assert record["num_outer_steps"] == steps and record["grid"] == pytest.approx(grid.tolist())

    assert main(generate_args(tmp_path / "dmd2", tmp_path / "videos", "--steps", str(steps), "--save-latents")) == 0
    manifest = json.loads((tmp_path / "videos" / "generation.json").read_text())
    assert manifest["settings"]["kind"] == "few_step" and manifest["videos"][0]["effective_nfe"] == steps


def test_tmd_export_pipeline_format(tmp_path, pipeline, capsys):  # noqa: F811
    student = perturbed(TMDStudent.from_teacher(load_teacher(pipeline), head_blocks=2))
    config = {"head_blocks": 2, "fusion": "gated", "outer_steps": 2, "inner_steps": 2, "inner_shift": 5.0}
    save_file(
        student.state_dict(), tmp_path / "student.safetensors", metadata={"method": "tmd", "method_config": json.dumps(config)}
    )
    args = ["export", "--run", str(tmp_path / "student.safetensors"), "--teacher", str(pipeline), "--format", "pipeline"]
    assert main([*args, "--out", str(tmp_path / "pipe")]) == 0
    assert "pipeline folder written" in capsys.readouterr().out
    pipe = TMDPipeline.from_pretrained(tmp_path / "pipe")
    assert (pipe.tmd_parts.config.num_inner_steps, pipe.tmd_parts.config.inner_shift, pipe.tmd_parts.config.head_blocks) == (
        2,
        5.0,
        2,
    )
    assert all(torch.equal(v, pipe.student().state_dict()[k]) for k, v in student.state_dict().items())
    # the VAE and text encoder are the teacher's files
    assert (
        load_file(tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors").keys()
        == load_file(pipeline / "vae" / "diffusion_pytorch_model.safetensors").keys()
    )
    assert main([*args, "--out", str(tmp_path / "bad"), "--teacher", str(pipeline / "transformer")]) == 2
    assert "has no model_index.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def unipc_pipeline(tmp_path_factory):
    """A tiny Wan pipeline shipping UniPC configured as the published Wan2.1 pipelines are (flow sigmas)."""
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return build_tiny_pipeline(tmp_path_factory.mktemp("unipc"), scheduler)


def test_teacher_samples_with_its_pipelines_unipc_as_wan_pipeline_does(tmp_path, unipc_pipeline, tiny_inputs):
    wan = WanPipeline.from_pretrained(unipc_pipeline)
    reference = wan_pipeline_latents(wan, tiny_inputs)
    latents, text, negative = tiny_inputs
    ours = sample_with_scheduler(
        load_teacher(unipc_pipeline),
        latents,
        text,
        negative,
        UniPCMultistepScheduler.from_pretrained(unipc_pipeline / "scheduler"),
        6,
        4.0,
    )
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)

    # tmd generate from a seed = WanPipeline from the same seed and prompt (the tokenizer's length: 16)
    seeded = ["--negative-prompt", "", "--steps", "5", "--seed", "3", "--save-latents"]
    assert main(generate_args(unipc_pipeline, tmp_path / "unipc", *seeded)) == 0
    generated = load_file(tmp_path / "unipc" / "0000-a-red-circle.safetensors")["latents"]
    stock = wan(
        prompt="a red circle",
        negative_prompt="",
        generator=torch.Generator().manual_seed(3),
        num_inference_steps=5,
        max_sequence_length=16,
        output_type="latent",
        **SIZE,
    ).frames[0]
    torch.testing.assert_close(generated, stock, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "unipc" / "generation.json").read_text())["settings"]["scheduler"] == "UniPCMultistepScheduler"

    # the Euler sampler stays an option (and differs from UniPC)
    assert main(generate_args(unipc_pipeline, tmp_path / "euler", *seeded, "--scheduler", "euler")) == 0
    euler = load_file(tmp_path / "euler" / "0000-a-red-circle.safetensors")["latents"]
    assert not torch.allclose(euler, generated, atol=1e-3)
    assert json.loads((tmp_path / "euler" / "generation.json").read_text())["settings"]["scheduler"] == "euler"


def test_tmd_pipeline_keeps_the_students_inner_flow(tmp_path, pipeline):  # noqa: F811
    """A student with B.4's y = x target (and its implied velocity) samples the same from its pipeline folder."""
    teacher = load_teacher(pipeline)
    student = TMDStudent.from_teacher(teacher, head_blocks=1, inner_velocity="implied", transition_target="sample")
    student = perturbed(student).eval()
    export_pipeline(student, tmp_path / "tmd", pipeline, {"num_outer_steps": 2, "num_inner_steps": 2})
    loaded = TMDPipeline.from_pretrained(tmp_path / "tmd").student()
    assert (loaded.inner_velocity, loaded.transition_target) == ("implied", "sample")
    noise, cond = inputs(pipeline)
    torch.testing.assert_close(
        sample_tmd(loaded, noise, cond, 2, 2, torch.Generator().manual_seed(1)),
        sample_tmd(student, noise, cond, 2, 2, torch.Generator().manual_seed(1)),
        rtol=0,
        atol=0,
    )


def test_exports_written_with_the_old_gap_bias_still_load(tmp_path, pipeline):  # noqa: F811
    """Folders written before the gap embedder lost its output bias hold ``gap_embedder.linear_2.bias``: it
    cancelled in ``gap_embedding``, so both loaders drop it and sample exactly as before."""
    from tmd.models.export import export_student
    from tmd.models.folder import PARTS_FILE
    from tmd.models.split import OLD_GAP_BIAS

    student = perturbed(TMDStudent.from_teacher(load_teacher(pipeline), head_blocks=1)).eval()
    assert OLD_GAP_BIAS not in {f"gap_embedder.{k}" for k in student.gap_embedder.state_dict()}
    export_student(student, tmp_path / "student", pipeline)
    export_pipeline(student, tmp_path / "pipe", pipeline, {"num_outer_steps": 2, "num_inner_steps": 2})
    old_bias = torch.randn(student.gap_embedder.linear_1.out_features)
    pipe_parts = tmp_path / "pipe" / "tmd_parts" / "diffusion_pytorch_model.safetensors"
    for file, key in ((tmp_path / "student" / PARTS_FILE, OLD_GAP_BIAS), (pipe_parts, OLD_GAP_BIAS)):
        save_file({**load_file(str(file)), key: old_bias}, str(file))
    noise, cond = inputs(pipeline)
    expected = sample_tmd(student, noise, cond, 2, 2, torch.Generator().manual_seed(1))
    for loaded in (TMDStudent.from_pretrained(tmp_path / "student"), TMDPipeline.from_pretrained(tmp_path / "pipe").student()):
        torch.testing.assert_close(
            sample_tmd(loaded, noise, cond, 2, 2, torch.Generator().manual_seed(1)), expected, rtol=0, atol=0
        )
