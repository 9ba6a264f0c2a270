import json
import os
import shutil
from pathlib import Path

import imageio.v2 as imageio
import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
from safetensors.torch import load_file, save_file

from tmd.models.export import export_student
from tmd.models.split import TMDStudent
from tmd.models.vae import decode_video, denormalize_latents, load_vae, normalize_latents
from tmd.models.wan import TINY_CONFIG, build_transformer, load_teacher
from tmd.pipelines.export import export_run
from tmd.programs.cli import main
from tmd.programs.generate import generate
from tmd.sampling import sample_few_step, sample_tmd
from tmd.world.text import build_tiny_text_encoder

VOCABULARY = ["a", "red", "blue", "circle", "square", "moving", "left", "right"]
FRAMES, HEIGHT, WIDTH = 5, 32, 32  # latents (4, 2, 4, 4): 8 tokens
SIZE = ["--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH)]


def build_tiny_pipeline(path, scheduler=None):
    """A diffusers Wan pipeline root small enough to run end to end in a second or two."""
    text_encoder = build_tiny_text_encoder(VOCABULARY, dim=TINY_CONFIG["text_dim"])
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.5, 2.0, 1.0],
    )
    WanPipeline(
        tokenizer=text_encoder.tokenizer,
        text_encoder=text_encoder.model,
        vae=vae,
        transformer=build_transformer(TINY_CONFIG, seed=5),
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
    ).save_pretrained(path)
    return path


def generate_args(model, out, *extra):
    """`tmd generate` arguments for one prompt at the tiny pipeline's size."""
    return ["generate", "--model", str(model), "--prompt", "a red circle", *extra, *SIZE, "--out", str(out)]


def wan_pipeline_latents(pipe, tiny_inputs):
    """What a stock WanPipeline samples, with CFG, from the conftest's tiny_inputs: the samplers' reference."""
    latents, text, negative = tiny_inputs
    return pipe(
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


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("wan"))


def perturbed(module, seed=0):
    """Random offsets so that a round trip that drops or mixes up a parameter cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return module


@pytest.mark.parametrize("fusion", ["gated", "concat"])
def test_tmd_student_round_trip(tmp_path, tiny_teacher, tiny_inputs, fusion):
    student = perturbed(TMDStudent.from_teacher(tiny_teacher, head_blocks=1, fusion=fusion)).eval()
    export_student(student, tmp_path / "student", teacher_source="some/teacher")
    loaded = TMDStudent.from_pretrained(tmp_path / "student")

    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["kind"] == "tmd_student" and config["head_blocks"] == 1 and config["fusion"] == fusion
    assert (
        config["teacher"] == str(Path("some/teacher").resolve())
        and config["transformer"]["num_layers"] == TINY_CONFIG["num_layers"]
    )
    # the backbone + head weights carry the teacher's diffusers key names
    keys = set(load_file(tmp_path / "student" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert keys == set(tiny_teacher.transformer.state_dict())

    noise, text, _ = tiny_inputs
    run = lambda model: sample_tmd(model, noise, text, 2, 3, rng=torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.equal(run(loaded), run(student))


def test_few_step_round_trip(tmp_path, tiny_teacher, tiny_inputs):
    generator = perturbed(load_teacher("tiny", seed=1)).eval()
    export_student(generator, tmp_path / "dmd2", teacher_source=None)
    assert json.loads((tmp_path / "dmd2" / "config.json").read_text())["kind"] == "few_step"
    loaded = load_teacher(tmp_path / "dmd2" / "transformer")
    noise, text, _ = tiny_inputs
    run = lambda model: sample_few_step(model, noise, text, 2, rng=torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.equal(run(loaded), run(generator))


def test_export_run(tmp_path, pipeline, capsys):
    """A run's student.safetensors (EMA state dict + method metadata, as tmd.train.run writes it) -> folder."""
    student = perturbed(TMDStudent.from_teacher(load_teacher(pipeline), head_blocks=2, fusion="concat"))
    metadata = {"method": "tmd", "method_config": json.dumps({"head_blocks": 2, "fusion": "concat", "inner_steps": 4})}
    save_file(student.state_dict(), tmp_path / "student.safetensors", metadata=metadata)
    args = ["export", "--run", str(tmp_path / "student.safetensors"), "--teacher", str(pipeline), "--out"]
    assert main([*args, str(tmp_path / "tmd")]) == 0
    loaded = TMDStudent.from_pretrained(tmp_path / "tmd")
    assert loaded.head_blocks == 2 and loaded.fusion_kind == "concat"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in student.state_dict().items())
    assert json.loads((tmp_path / "tmd" / "config.json").read_text())["teacher"] == str(pipeline)

    generator = perturbed(load_teacher(pipeline))
    metadata = {"method": "dmd2", "method_config": json.dumps({"outer_steps": 2})}
    save_file(generator.state_dict(), tmp_path / "dmd2.safetensors", metadata=metadata)
    export_run(tmp_path / "dmd2.safetensors", pipeline, tmp_path / "few")
    assert torch.equal(
        load_teacher(tmp_path / "few" / "transformer").transformer.proj_out.weight, generator.transformer.proj_out.weight
    )

    # a TMD run's weights without the split in the metadata do not fit a plain transformer
    save_file(student.state_dict(), tmp_path / "bad.safetensors", metadata={"method": "x", "method_config": "{}"})
    assert main([*args[:2], str(tmp_path / "bad.safetensors"), *args[3:], str(tmp_path / "bad")]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_from_pretrained_errors(tmp_path, tiny_teacher, pipeline):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TMDStudent.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="pipeline root"):
        TMDStudent.from_pretrained(pipeline)
    export_student(tiny_teacher, tmp_path / "few")
    with pytest.raises(ValueError, match="not a TMD student"):
        TMDStudent.from_pretrained(tmp_path / "few")
    export_student(TMDStudent.from_teacher(tiny_teacher, head_blocks=1), tmp_path / "broken")
    (tmp_path / "broken" / "tmd_parts.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        TMDStudent.from_pretrained(tmp_path / "broken")


def test_latent_normalisation_matches_wan_pipeline(pipeline):
    vae = load_vae(pipeline)
    z = torch.randn(1, 4, 2, 4, 4)
    torch.testing.assert_close(denormalize_latents(vae, normalize_latents(vae, z)), z)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(denormalize_latents(vae, z), z * std + mean)
    video = decode_video(vae, z)
    assert video.dtype == torch.uint8 and video.shape == (1, FRAMES, HEIGHT, WIDTH, 3)


def read_mp4(path):
    return imageio.mimread(path, format="FFMPEG", memtest=False)


def test_generate_teacher_and_student(tmp_path, pipeline, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n\na blue square\nred square moving right\n")
    code = main(
        [
            "generate",
            "--model",
            str(pipeline),
            "--prompts",
            str(prompts),
            "--steps",
            "3",
            "--guidance",
            "4",
            "--negative-prompt",
            "",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "teacher"),
            "--save-latents",
            *SIZE,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "3 videos written" in out and "6 effective NFE" in out
    manifest = json.loads((tmp_path / "teacher" / "generation.json").read_text())
    assert [v["seed"] for v in manifest["videos"]] == [0, 1, 2] and manifest["settings"]["shift"] == 3.0
    for record in manifest["videos"]:
        frames = read_mp4(tmp_path / "teacher" / record["file"])
        assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)
    latents = load_file(tmp_path / "teacher" / manifest["videos"][0]["file"].replace(".mp4", ".safetensors"))["latents"]
    assert latents.shape == (4, 2, 4, 4)

    # video i depends on (seed, i) only, not on the batch it was generated in
    alone = generate(
        pipeline,
        ["a blue square"],
        tmp_path / "alone",
        steps=3,
        guidance=4.0,
        negative_prompt="",
        seed=1,
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        save_latents=True,
        progress=False,
    )
    assert torch.allclose(
        load_file(tmp_path / "alone" / "0000-a-blue-square.safetensors")["latents"],
        load_file(tmp_path / "teacher" / "0001-a-blue-square.safetensors")["latents"],
        atol=1e-5,
    )
    assert alone[0]["effective_nfe"] == 6

    student = TMDStudent.from_teacher(load_teacher(pipeline), head_blocks=2)
    export_student(student, tmp_path / "student", teacher_source=str(pipeline))
    assert main(generate_args(tmp_path / "student", tmp_path / "tmd", "--steps", "2", "--inner-steps", "3", "--seed", "7")) == 0
    assert "(4 effective NFE" in capsys.readouterr().out  # M (1 + (N - 1) H / L) = 2 (1 + 2 x 2 / 4)
    frames = read_mp4(tmp_path / "tmd" / "0000-a-red-circle.mp4")
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)


def test_generate_user_errors(tmp_path, pipeline, tiny_teacher, capsys):
    export_student(TMDStudent.from_teacher(tiny_teacher, head_blocks=1), tmp_path / "orphan")
    cases = [
        (["--model", str(tmp_path / "nowhere"), "--prompt", "a"], "does not exist"),
        (["--model", str(tmp_path / "orphan"), "--prompt", "a"], "pass --pipeline"),
        (["--model", str(tmp_path / "orphan"), "--pipeline", str(pipeline), "--prompt", "a", "--guidance", "3"], "without CFG"),
        (["--model", str(pipeline), "--prompt", "a", "--inner-steps", "2"], "TMD students only"),
        (["--model", str(pipeline), "--prompt", "a", "--frames", "6"], "4 k + 1"),
        (
            ["--model", str(pipeline), "--prompt", "a green circle", "--frames", "5", "--height", "32", "--width", "32"],
            "unknown word",
        ),
    ]
    for args, match in cases:
        assert main(["generate", *args, "--out", str(tmp_path / "out")]) == 2
        assert match in capsys.readouterr().err


def test_the_default_negative_prompt_works_with_any_vocabulary(tmp_path, pipeline, capsys):
    """Wan's negative prompt has words the tiny word-level tokenizer lacks: they map to <unk> as in diffusers;
    the user's own prompt is still checked, and the error names it."""
    common = ["generate", "--model", str(pipeline), "--steps", "2", "--guidance", "3", *SIZE]
    assert main([*common, "--prompt", "a red circle", "--out", str(tmp_path / "v")]) == 0
    assert (tmp_path / "v" / "0000-a-red-circle.mp4").is_file()
    assert main([*common, "--prompt", "a green circle", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "prompt 'a green circle' has unknown word(s) ['green']" in err and "bright" not in err


def test_an_exported_student_generates_from_any_working_directory(tmp_path, pipeline, monkeypatch):
    generator = load_teacher(pipeline)
    save_file(generator.state_dict(), tmp_path / "run.safetensors", metadata={"method": "dmd2", "method_config": "{}"})
    monkeypatch.chdir(pipeline.parent)
    assert (
        main(["export", "--run", str(tmp_path / "run.safetensors"), "--teacher", pipeline.name, "--out", str(tmp_path / "s")])
        == 0
    )
    assert json.loads((tmp_path / "s" / "config.json").read_text())["teacher"] == str(pipeline.resolve())
    monkeypatch.chdir(tmp_path)
    assert main(generate_args("s", "v")) == 0
    assert (tmp_path / "v" / "0000-a-red-circle.mp4").is_file()
    # a student folder from before, holding a relative path, says what to do
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    (tmp_path / "s" / "config.json").write_text(json.dumps({**config, "teacher": "wan"}))
    with pytest.raises(
        FileNotFoundError, match="records its teacher pipeline as wan, which does not exist here; pass --pipeline"
    ):
        generate("s", ["a red circle"], "v", frames=FRAMES, height=HEIGHT, width=WIDTH)
    assert main(generate_args("s", "v", "--pipeline", str(pipeline))) == 0


def test_exported_files_have_the_users_file_mode(tmp_path, pipeline):
    """safetensors writes mode 0600; a student is meant to be shared like any other file the user writes."""
    mask = os.umask(0)
    os.umask(mask)
    export_student(TMDStudent.from_teacher(load_teacher(pipeline), head_blocks=1), tmp_path / "s", pipeline)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert {"tmd_parts.safetensors", "diffusion_pytorch_model.safetensors"} <= modes.keys()
    assert set(modes.values()) == {0o666 & ~mask}


def test_pickled_vae_weights_are_refused(tmp_path, pipeline):
    shutil.copytree(pipeline, tmp_path / "wan")
    vae = tmp_path / "wan" / "vae"
    torch.save(AutoencoderKLWan.from_pretrained(vae).state_dict(), vae / "diffusion_pytorch_model.bin")
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no .safetensors weights in .*vae; tmd never loads pickled weights"):
        load_vae(tmp_path / "wan")
