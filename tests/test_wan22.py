"""Wan2.2 on random-weight pipelines written by diffusers itself (issue 24).

TI2V-5B-shaped: the published transformer layout (patch (1, 2, 2), 48 latent channels in and out, qk and cross-attention
norms) at small width and 4 blocks, the published Wan2.2 VAE architecture (48 latent channels, 12 = 3 x 2 x 2 patchified
input channels, residual, 16x spatial, 4x temporal) at smaller channel widths (the published 160/256 base widths hold
~700M parameters, more than a CPU test should build), ``expand_timesteps=True`` and UniPC with the published flow shift
5. A14B-shaped: two experts of one shape, ``boundary_ratio=0.875``, UniPC with flow shift 12 (the published sample_shift).
"""

import json

import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
from safetensors.torch import load_file
from test_generate import VOCABULARY, read_mp4
from test_prepare import write_video
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tmd.config import RunConfig, load_config
from tmd.eval import flops
from tmd.methods import get_method
from tmd.models.experts import DualExpertTeacher
from tmd.models.folder import check_wan_folder
from tmd.models.split import TMDStudent
from tmd.models.text import TextEncoder
from tmd.models.vae import load_vae
from tmd.models.wan import TINY_CONFIG, WAN22_5B_CONFIG, WAN22_5B_LATENT, build_transformer, load_teacher
from tmd.programs.cli import main
from tmd.sampling import sample_few_step, sample_with_scheduler
from tmd.train.memory import stage2_memory_table
from tmd.world.text import build_tiny_text_encoder

TI2V_CONFIG = {
    **TINY_CONFIG,
    "in_channels": 48,
    "out_channels": 48,
    "num_layers": 4,
}
"""TI2V-5B's transformer layout (published: dim 3072 = 24 heads x 128, ffn 14336, 30 blocks) at test width."""
TI2V_VAE = {
    "base_dim": 16,
    "decoder_base_dim": 24,
    "z_dim": 48,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "is_residual": True,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
    "latents_mean": [0.01 * (i % 7) for i in range(48)],
    "latents_std": [0.5 + 0.02 * i for i in range(48)],
}
"""The Wan2.2 VAE's architecture (published: base_dim 160, decoder_base_dim 256, num_res_blocks 2) at test width."""
FRAMES, SIZE = 5, 64  # TI2V: 16x VAE x 2x patch = 32-pixel multiples; latents (48, 2, 4, 4)
TI2V_SIZE = ["--frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE)]
A14B_SIZE = ["--frames", "5", "--height", "32", "--width", "32"]
BOUNDARY = 0.875


def tiny_vae_21():
    return AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4, latents_std=[1.0] * 4
    )


def build_ti2v_pipeline(path, **extra):
    text_encoder = build_tiny_text_encoder(VOCABULARY, dim=TINY_CONFIG["text_dim"])
    WanPipeline(
        tokenizer=text_encoder.tokenizer,
        text_encoder=text_encoder.model,
        vae=AutoencoderKLWan(**TI2V_VAE),
        transformer=build_transformer(TI2V_CONFIG, seed=5),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0),
        expand_timesteps=True,
        **extra,
    ).save_pretrained(path)
    return path


def build_a14b_pipeline(path):
    text_encoder = build_tiny_text_encoder(VOCABULARY, dim=TINY_CONFIG["text_dim"])
    WanPipeline(
        tokenizer=text_encoder.tokenizer,
        text_encoder=text_encoder.model,
        vae=tiny_vae_21(),
        transformer=build_transformer(TINY_CONFIG, seed=5),
        transformer_2=build_transformer(TINY_CONFIG, seed=6),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=12.0),
        boundary_ratio=BOUNDARY,
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    return build_ti2v_pipeline(tmp_path_factory.mktemp("ti2v"))


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    return build_a14b_pipeline(tmp_path_factory.mktemp("a14b"))


def inputs(channels, latent=(2, 4, 4), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, channels, *latent, generator=g),
        torch.randn(batch, 5, TINY_CONFIG["text_dim"], generator=g),
        torch.randn(batch, 5, TINY_CONFIG["text_dim"], generator=g),
    )


def stock_latents(pipe, latents, text, negative, steps=6, **kwargs):
    return pipe(
        prompt_embeds=text,
        negative_prompt_embeds=negative,
        latents=latents,
        num_inference_steps=steps,
        num_frames=FRAMES,
        height=SIZE,
        width=SIZE,
        output_type="latent",
        **kwargs,
    ).frames


# ----------------------------------------------------------------------------------------------
# Never silently wrong.


def test_folders_tmd_cannot_represent_are_refused_in_one_line(tmp_path, a14b, ti2v):
    assert check_wan_folder(ti2v).family == "wan2.2-ti2v" and check_wan_folder(ti2v).expand_timesteps
    assert check_wan_folder(a14b, experts=None).boundary_ratio == BOUNDARY
    cases = {}
    with pytest.raises(ValueError, match="two-expert Wan2.2 A14B pipeline .* tmd export needs one transformer") as e:
        load_teacher(a14b, purpose="tmd export")
    cases["a14b"] = e
    index = json.loads((ti2v / "model_index.json").read_text())
    for name, component, message in (
        ("image", {"image_encoder": ["transformers", "CLIPVisionModel"]}, "image-to-video is not supported yet"),
        ("unknown", {"controlnet": ["diffusers", "SomeNet"]}, r"components tmd cannot represent: \['controlnet'\]"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({**index, **component}))
        for part in ("transformer", "vae", "text_encoder", "tokenizer"):
            (folder / part).symlink_to(ti2v / part)
        for loader in (load_teacher, load_vae, TextEncoder.from_pretrained):
            with pytest.raises(ValueError, match=message) as e:
                loader(folder)
            cases[name] = e
    with pytest.raises(ValueError, match="is a wan2.2-ti2v model but the config expects wan2.1"):
        load_teacher(ti2v, family="wan2.1")
    with pytest.raises(ValueError, match="is a wan2.2-a14b model but the config expects wan2.2-ti2v"):
        load_teacher(a14b, experts=None, family="wan2.2-ti2v")
    for e in cases.values():
        assert "\n" not in str(e.value)


def test_generate_refuses_an_a14b_as_a_student_an_image_and_guidance_2_on_one_expert(tmp_path, ti2v, capsys):
    prompt = ["generate", "--model", str(ti2v), "--prompt", "a red circle", "--out", str(tmp_path / "x"), *TI2V_SIZE]
    assert main([*prompt, "--image", "frame.png"]) != 0
    assert "image-to-video is not supported yet" in capsys.readouterr().err
    assert main([*prompt, "--guidance-2", "3"]) != 0
    assert "has one transformer" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# TI2V-5B.


def test_ti2v_teacher_equals_diffusers_with_per_token_timesteps(ti2v):
    """WanPipeline with expand_timesteps gives the transformer one timestep per token (B, tokens); for text-to-video
    they all equal t, so tmd's per-sample modulation broadcast over the tokens is the same arithmetic."""
    teacher = load_teacher(ti2v)
    x, text, _ = inputs(48)
    t = torch.tensor([0.9, 0.3])
    tokens = (x.shape[2] // 1) * (x.shape[3] // 2) * (x.shape[4] // 2)
    with torch.no_grad():
        reference = teacher.transformer(x, (1000 * t)[:, None].expand(2, tokens), text, return_dict=False)[0]
        ours = teacher.velocity(x, t, text)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)  # float32 reassociation only
    student = TMDStudent.from_teacher(teacher, head_blocks=1)
    features = student.backbone(x, t, text)
    # the untrained head equals the teacher (the split's zero initialisation), per-token timesteps included
    torch.testing.assert_close(student.head(x, t, t, features), ours, rtol=1e-5, atol=1e-6)


def test_ti2v_teacher_sampler_equals_wan_pipeline(ti2v):
    """UniPC with the published flow shift, CFG 5, expand_timesteps: tmd's sampler = WanPipeline on the same noise and
    embeddings; tolerance: the same float32 operations in another order (batched CFG), 6 steps."""
    latents, text, negative = inputs(48)
    reference = stock_latents(WanPipeline.from_pretrained(ti2v), latents, text, negative, guidance_scale=5.0)
    scheduler = UniPCMultistepScheduler.from_pretrained(ti2v / "scheduler")
    ours = sample_with_scheduler(load_teacher(ti2v), latents, text, negative, scheduler, 6, 5.0)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_ti2v_generate_decodes_with_the_wan22_vae(tmp_path, ti2v, capsys):
    args = ["generate", "--model", str(ti2v), "--prompt", "a red circle", "--steps", "2", "--negative-prompt", ""]
    assert main([*args, "--save-latents", "--out", str(tmp_path / "teacher"), *TI2V_SIZE]) == 0
    assert load_file(tmp_path / "teacher" / "0000-a-red-circle.safetensors")["latents"].shape == (48, 2, 4, 4)
    frames = read_mp4(tmp_path / "teacher" / "0000-a-red-circle.mp4")
    assert len(frames) == FRAMES and frames[0].shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("family", ["ti2v", "a14b"])
def test_synthesize_samples_wan22_teachers_as_generate_does(tmp_path, ti2v, a14b, family, capsys):
    """tmd synthesize's sample i is tmd generate's video i: TI2V-5B with the Wan2.2 VAE's 48 latent channels, and
    A14B with both experts and each one's CFG scale."""
    model, size = (ti2v, TI2V_SIZE) if family == "ti2v" else (a14b, A14B_SIZE)
    guidance = ["--guidance", "4", "--guidance-2", "3"] if family == "a14b" else []
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    common = ["--model", str(model), "--steps", "3", "--negative-prompt", "", *guidance, *size]
    assert main(["synthesize", "--prompts", str(prompts), "--out", str(tmp_path / "data"), *common]) == 0
    assert main(["generate", "--prompt", "a red circle", "--save-latents", "--out", str(tmp_path / "gen"), *common]) == 0
    synthesized = load_file(tmp_path / "data" / "shard-00000.safetensors")["latents"][0]
    generated = load_file(tmp_path / "gen" / "0000-a-red-circle.safetensors")["latents"]
    assert synthesized.shape == generated.shape and (family == "a14b" or synthesized.shape[0] == 48)
    assert torch.equal(synthesized, generated)
    if family == "ti2v":  # one transformer: no low-noise scale to set
        args = ["synthesize", "--prompts", str(prompts), "--out", str(tmp_path / "x"), *common, "--guidance-2", "3"]
        assert main(args) == 2 and "has one transformer" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# A14B as a teacher.


def test_a14b_teacher_routes_by_time_as_wan_pipeline_does(a14b):
    teacher = load_teacher(a14b, experts=None, guidance_2=3.0)
    assert isinstance(teacher, DualExpertTeacher) and teacher.boundary == BOUNDARY
    x, text, negative = inputs(4, latent=(2, 4, 4))
    t = torch.tensor([0.95, 0.5])
    with torch.no_grad():
        both, features = teacher.velocity_and_features(x, t, text, (1, 3))
        for rows, expert in ((slice(0, 1), teacher.high), (slice(1, 2), teacher.low)):
            v, f = expert.velocity_and_features(x[rows], t[rows], text[rows], (1, 3))
            torch.testing.assert_close(both[rows], v)
            for ours, theirs in zip(features, f):
                torch.testing.assert_close(ours[rows], theirs)
        assert not torch.allclose(both[1:], teacher.high.velocity(x[1:], t[1:], text[1:]), atol=1e-3)
    # the sampler: 8 UniPC steps with flow shift 12 cross the boundary; CFG 4 high, 3 low (diffusers' guidance_scale_2)
    pipe = WanPipeline.from_pretrained(a14b)
    reference = pipe(
        prompt_embeds=text,
        negative_prompt_embeds=negative,
        latents=x,
        num_inference_steps=8,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        num_frames=5,
        height=32,
        width=32,
        output_type="latent",
    ).frames
    scheduler = UniPCMultistepScheduler.from_pretrained(a14b / "scheduler")
    scheduler.set_timesteps(8)
    assert (scheduler.timesteps >= BOUNDARY * 1000).any() and (scheduler.timesteps < BOUNDARY * 1000).any()
    ours = sample_with_scheduler(teacher, x, text, negative, scheduler, 8, 4.0)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # one expert throughout (what tmd did before) is far off: the test can tell
    single = sample_with_scheduler(teacher.high, x, text, negative, scheduler, 8, 4.0)
    assert (single - reference).norm() > 0.1 * reference.norm()


def test_a14b_offload_keeps_one_expert_on_the_compute_device(a14b):
    teacher = load_teacher(a14b, experts=None, offload=True, device="meta")
    assert teacher.low.transformer.device.type == "cpu" and teacher.high.transformer.device.type == "cpu"
    teacher._resident(teacher.low)
    assert teacher.low.transformer.device.type == "meta" and teacher.high.transformer.device.type == "cpu"


def test_a14b_generate(tmp_path, a14b, capsys):
    args = ["generate", "--model", str(a14b), "--prompt", "a red circle", "--steps", "3", "--negative-prompt", ""]
    assert main([*args, "--guidance", "4", "--guidance-2", "3", "--out", str(tmp_path / "a14b"), *A14B_SIZE]) == 0
    assert len(read_mp4(tmp_path / "a14b" / "0000-a-red-circle.mp4")) == 5


# ----------------------------------------------------------------------------------------------
# TI2V-5B end to end: prepare, stage 1, stage 2, DMD2-v, exports, generation from the exports.


def run_config(tmp_path, method, data, method_args):
    config = tmp_path / f"{method}.yaml"
    config.write_text(
        f"method_name: {method}\ndata_kind: prepared\nmethod: {{{method_args}}}\ndata: {{path: {data}, wan: wan2.2-ti2v}}\n"
        f"train: {{steps: 2, batch_size: 2, progress: false, tensorboard: false, out_dir: {tmp_path / method}}}\n"
    )
    return config


def test_ti2v_prepare_distil_export_generate(tmp_path, ti2v, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        write_video(videos / f"{i}.mp4", FRAMES, height=SIZE, width=SIZE, seed=i)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"0.mp4": "a red circle", "1.mp4": "a blue square moving left"}))
    data = tmp_path / "data"
    prepare = ["prepare", "--model", str(ti2v), "--videos", str(videos), "--captions", str(captions), "--out", str(data)]
    assert main([*prepare, *TI2V_SIZE, "--negative-prompt", ""]) == 0
    assert load_file(data / "shard-00000.safetensors")["latents"].shape == (2, 48, 2, 4, 4)

    split = "head_blocks: 1, outer_steps: 2, inner_steps: 2"
    assert main(["train", "--config", str(run_config(tmp_path, "tm", data, split))]) == 0
    stage1 = tmp_path / "tm" / "student.safetensors"
    assert main(["train", "--config", str(run_config(tmp_path, "tmd", data, f"{split}, init_from: {stage1}"))]) == 0
    assert main(["train", "--config", str(run_config(tmp_path, "dmd2", data, "outer_steps: 2"))]) == 0
    # a Wan2.1 config given this Wan2.2 data's teacher: one line, before any training
    wrong = run_config(tmp_path, "dmd2", data, "outer_steps: 2")
    wrong.write_text(wrong.read_text().replace("wan2.2-ti2v", "wan2.1").replace("/dmd2}", "/wrong}"))
    assert main(["train", "--config", str(wrong)]) != 0
    assert "is a wan2.2-ti2v model but the config expects wan2.1" in capsys.readouterr().err

    for method in ("tmd", "dmd2"):
        export = ["export", "--run", str(tmp_path / method / "student.safetensors"), "--teacher", str(ti2v)]
        assert main([*export, "--format", "pipeline", "--out", str(tmp_path / f"{method}_pipe")]) == 0
        generate = ["generate", "--model", str(tmp_path / f"{method}_pipe"), "--prompt", "a red circle", "--steps", "2"]
        assert main([*generate, "--out", str(tmp_path / f"{method}_videos"), *TI2V_SIZE]) == 0
        assert len(read_mp4(tmp_path / f"{method}_videos" / "0000-a-red-circle.mp4")) == FRAMES

    # the DMD2-v export is a stock WanPipeline with expand_timesteps; diffusers runs it as our sampler does
    wan = WanPipeline.from_pretrained(tmp_path / "dmd2_pipe")
    assert wan.config.expand_timesteps
    noise, text, _ = inputs(48, batch=1)
    stock = wan(
        prompt_embeds=text,
        latents=noise,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="latent",
        num_frames=FRAMES,
        height=SIZE,
        width=SIZE,
    ).frames
    ours = sample_few_step(load_teacher(tmp_path / "dmd2_pipe"), noise, text, 2)
    torch.testing.assert_close(stock, ours, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Distilling A14B (docs/methods.md, "Wan2.2"): the student is cut from the expert of its outer times, the fake score
# copies both experts; outer times on both sides of the boundary are refused.


def test_a14b_distillation_trains_and_exports(tmp_path, a14b, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        write_video(videos / f"{i}.mp4", 5, height=32, width=32, seed=i)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"0.mp4": "a red circle", "1.mp4": "a blue square moving left"}))
    data = tmp_path / "data"
    prepare = ["prepare", "--model", str(a14b), "--videos", str(videos), "--captions", str(captions), "--out", str(data)]
    assert main([*prepare, *A14B_SIZE, "--negative-prompt", ""]) == 0

    def config(method, method_args):
        path = run_config(tmp_path, method, data, method_args)
        path.write_text(path.read_text().replace("wan: wan2.2-ti2v", "wan: wan2.2-a14b, guidance_2: 3.0"))
        return path

    method = get_method("dmd2").from_teacher(
        load_config(RunConfig, config("dmd2", "outer_steps: 2")).method, load_teacher(a14b, experts=None)
    )
    assert isinstance(method.fake_score, DualExpertTeacher) and not isinstance(method.student, DualExpertTeacher)
    assert torch.equal(method.student.transformer.proj_out.weight, method.teacher.high.transformer.proj_out.weight)

    # TMD stage 2 (real score, fake score and the GAN's teacher features all routed per sample) and DMD2-v
    assert main(["train", "--config", str(config("tmd", "head_blocks: 1, outer_steps: 2, inner_steps: 2"))]) == 0
    assert main(["train", "--config", str(config("dmd2", "outer_steps: 2"))]) == 0
    export = ["export", "--run", str(tmp_path / "dmd2" / "student.safetensors"), "--teacher", str(a14b)]
    assert main([*export, "--format", "pipeline", "--out", str(tmp_path / "dmd2_pipe")]) == 0
    wan = WanPipeline.from_pretrained(tmp_path / "dmd2_pipe")
    assert wan.transformer_2 is None and wan.config.boundary_ratio is None
    generate = ["generate", "--model", str(tmp_path / "dmd2_pipe"), "--prompt", "a red circle", "--steps", "2"]
    assert main([*generate, "--out", str(tmp_path / "videos_out"), *A14B_SIZE]) == 0

    # TMD stage 1 trains on the high-noise expert's cut; a method not built for two experts is refused in one line
    assert main(["train", "--config", str(config("tm", "head_blocks: 1, outer_steps: 2, inner_steps: 2"))]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(config("decoupled_dmd", "outer_steps: 2"))]) == 2
    assert "'decoupled_dmd' is not built for a two-expert (Wan2.2 A14B) teacher" in capsys.readouterr().err

    # M = 4 at the default shift 10 puts outer times (0.769) below the boundary 0.875: refused in one line
    m4 = config("dmd2", "outer_steps: 4")
    m4.write_text(m4.read_text().replace("/dmd2}", "/m4}"))
    assert main(["train", "--config", str(m4)]) != 0
    assert "straddle the A14B boundary 0.875" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The bench's FLOP and memory models.


def test_flop_model_counts_a_ti2v_shaped_teacher_and_student(ti2v):
    teacher = load_teacher(ti2v)
    config, latent = dict(teacher.config), (48, 2, 4, 4)
    x, text, _ = inputs(48)
    student = TMDStudent.from_teacher(teacher, head_blocks=1)
    features = student.backbone(x, 0.5, text)
    for fn, model in (
        (lambda: teacher.velocity(x, 0.5, text), flops.forward_flops(config, latent, 5)),
        (lambda: student.head(x, 0.5, 0.4, features), flops.head_flops(config, latent, 5, 1)),
    ):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        # batch 2; the model counts matmuls and convolutions only, as the counter does (tests/test_bench.py)
        assert counter.get_total_flops() == pytest.approx(x.shape[0] * model, rel=0.01)
    assert flops.tokens(WAN22_5B_CONFIG, WAN22_5B_LATENT) == 31 * 22 * 40


def test_bench_memory_table_has_an_a14b_stage2_estimate_at_8_and_16_processes():
    rows = stage2_memory_table(models=("wan2.2-a14b",))
    assert [row["processes"] for row in rows] == [8, 16]
    eight, sixteen = rows
    # teacher: two fp32 14B experts; trained: the student (one expert + the TMD parts) and the fake score (two experts)
    assert eight["teacher_gib"] == pytest.approx(2 * 14.3e9 * 4 / 2**30 / 8, rel=0.05)
    assert eight["trainable_gib"] == pytest.approx(3 * 14.3e9 * 16 / 2**30 / 8, rel=0.05)
    assert sixteen["total_gib"] == pytest.approx(eight["total_gib"] / 2, rel=0.01)
