import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

from tmd.models.split import TMDStudent
from tmd.models.text import build_tiny_text_encoder
from tmd.models.wan import TINY_CONFIG, build_transformer, load_teacher
from tmd.sampling import sample_few_step, sample_teacher, sample_tmd, teacher_grid


def test_teacher_sampler_matches_diffusers_pipeline(tmp_path, tiny_inputs):
    """Our Euler sampler with CFG equals WanPipeline + FlowMatchEulerDiscreteScheduler on the same inputs."""
    text_encoder = build_tiny_text_encoder(["a", "red", "circle"], dim=TINY_CONFIG["text_dim"])
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    pipe = WanPipeline(
        tokenizer=text_encoder.tokenizer,
        text_encoder=text_encoder.model,
        vae=vae,
        transformer=build_transformer(TINY_CONFIG, seed=5),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.save_pretrained(tmp_path)
    pipe = WanPipeline.from_pretrained(tmp_path)
    teacher = load_teacher(tmp_path)

    latents, text, negative = tiny_inputs
    reference = pipe(
        prompt_embeds=text,
        negative_prompt_embeds=negative,
        latents=latents,
        num_inference_steps=6,
        guidance_scale=4.0,
        num_frames=5,
        height=64,
        width=64,
        output_type="latent",
    ).frames
    ours = sample_teacher(teacher, latents, text, negative, steps=6, guidance=4.0, shift=3.0)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_teacher_grid_endpoints():
    grid = teacher_grid(4, shift=5.0)
    assert len(grid) == 5 and grid[0] == pytest.approx(1.0) and grid[-1] == 0


def test_samplers_are_seeded(tiny_teacher, tiny_inputs):
    noise, text, negative = tiny_inputs
    student = TMDStudent.from_teacher(tiny_teacher, head_blocks=1)

    def tmd(seed):
        return sample_tmd(student, noise, text, 2, 3, generator=torch.Generator().manual_seed(seed))

    assert tmd(0).shape == noise.shape
    assert torch.equal(tmd(0), tmd(0)) and not torch.equal(tmd(0), tmd(1))

    def few(seed):
        return sample_few_step(tiny_teacher, noise, text, 3, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(few(0), few(0)) and not torch.equal(few(0), few(1))
    # one step is deterministic: x0 from the first prediction, no re-noising
    one = sample_few_step(tiny_teacher, noise, text, 1)
    assert torch.isfinite(one).all()
    assert torch.equal(sample_teacher(tiny_teacher, noise, text, negative, 3), sample_teacher(tiny_teacher, noise, text, negative, 3))


def test_tmd_one_outer_one_inner_step_is_the_teacher_x0(tiny_teacher, tiny_inputs):
    """At initialisation, M = N = 1 makes the head return the teacher's velocity: x = x1 - 0.999 v."""
    noise, text, _ = tiny_inputs
    student = TMDStudent.from_teacher(tiny_teacher, head_blocks=2)
    ours = sample_tmd(student, noise, text, 1, 1, outer_shift=1.0, inner_shift=1.0)
    expected = noise - 0.999 * tiny_teacher.velocity(noise, 0.999, text)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, "steps must be an integer"),
        ({"guidance": -2.0}, "guidance scale"),
        ({"shift": 0.0}, "shift must be > 0"),
    ],
)
def test_teacher_sampler_errors(tiny_teacher, tiny_inputs, kwargs, match):
    noise, text, negative = tiny_inputs
    with pytest.raises(ValueError, match=match):
        sample_teacher(tiny_teacher, noise, text, negative, **kwargs)


def test_guidance_needs_negative(tiny_teacher, tiny_inputs):
    noise, text, _ = tiny_inputs
    with pytest.raises(ValueError, match="needs a negative condition"):
        sample_teacher(tiny_teacher, noise, text, None, steps=2, guidance=3.0)
    with pytest.raises(ValueError, match="negative condition of shape"):
        sample_teacher(tiny_teacher, noise, text, text[:, :2], steps=2, guidance=3.0)
