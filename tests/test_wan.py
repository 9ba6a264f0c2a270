import json

import pytest
import torch
import yaml

from tmd.models.wan import TINY_CONFIG, WanTeacher, build_transformer, load_teacher, unpatchify_features


def test_velocity_equals_diffusers_forward(tiny_teacher, tiny_inputs):
    x, text, _ = tiny_inputs
    t = torch.tensor([0.3, 0.95])
    ours = tiny_teacher.velocity(x, t, text)
    reference = tiny_teacher.transformer(x, t * 1000, text, return_dict=False)[0]
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_features_are_unpatchified(tiny_teacher, tiny_inputs):
    """Features come at the latent's resolution with dim / prod(patch) channels, token j's channels
    spread over its patch the way the output projection's unpatchify spreads them."""
    x, text, _ = tiny_inputs
    v, feats = tiny_teacher.velocity_and_features(x, 0.5, text, feature_blocks=(0, 3))
    assert v.shape == x.shape and v.dtype == torch.float32
    assert [f.shape for f in feats] == [torch.Size([2, 8, 2, 8, 8])] * 2
    # the token at grid cell (frame 1, row 2, col 3) holds pixels (1, 4..5, 6..7), channels in (p_h, p_w, c) order
    tokens = torch.arange(2 * 32 * 32, dtype=torch.float32).reshape(2, 32, 32)
    grid = unpatchify_features(tokens, (2, 4, 4), (1, 2, 2))
    token = tokens[:, 1 * 16 + 2 * 4 + 3].reshape(2, 2, 2, 8)  # (batch, p_h, p_w, channels)
    torch.testing.assert_close(grid[:, :, 1, 4:6, 6:8], token.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="feature block 4 out of range"):
        tiny_teacher.velocity_and_features(x, 0.5, text, feature_blocks=(4,))


def _save(tmp_path, layout):
    transformer = build_transformer(TINY_CONFIG, seed=3)
    folder = tmp_path / "transformer" if layout == "pipeline" else tmp_path
    transformer.save_pretrained(folder)
    return transformer


@pytest.mark.parametrize("layout", ["pipeline", "transformer"])
def test_load_from_folder(tmp_path, tiny_inputs, layout):
    transformer = _save(tmp_path, layout)
    teacher = load_teacher(tmp_path)
    x, text, _ = tiny_inputs
    torch.testing.assert_close(teacher.velocity(x, 0.5, text), WanTeacher(transformer).velocity(x, 0.5, text))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_build_from_config_file(tmp_path, suffix):
    path = tmp_path / f"config{suffix}"
    path.write_text(json.dumps(TINY_CONFIG) if suffix == ".json" else yaml.safe_dump(TINY_CONFIG))
    teacher = load_teacher(path, seed=1)
    reference = load_teacher(dict(TINY_CONFIG), seed=1)
    assert teacher.num_blocks == 4
    for a, b in zip(teacher.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_bf16_and_activation_checkpointing(tiny_inputs):
    x, text, _ = tiny_inputs
    teacher = load_teacher("tiny", dtype=torch.bfloat16)
    assert teacher.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert teacher.transformer.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    v = teacher.velocity(x, 0.5, text)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()

    grads = []
    for checkpointing in (False, True):
        model = load_teacher("tiny")
        model.activation_checkpointing = checkpointing
        model.velocity(x, 0.5, text).square().mean().backward()
        grads.append(model.transformer.blocks[1].ffn.net[0].proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "no model config under"),
    ],
)
def test_folder_errors(tmp_path, make, match):
    with pytest.raises((FileNotFoundError, ValueError), match=match):
        load_teacher(make(tmp_path))


def test_wrong_class_and_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="not a WanTransformer3DModel"):
        load_teacher(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **TINY_CONFIG}))
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        load_teacher(tmp_path)


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown WanTransformer3DModel config keys \['num_blocks'\]"):
        load_teacher({**TINY_CONFIG, "num_blocks": 3})
    with pytest.raises(ValueError, match="image-to-video"):
        load_teacher({**TINY_CONFIG, "image_dim": 16, "added_kv_proj_dim": 32})


def test_input_errors(tiny_teacher, tiny_inputs):
    x, text, _ = tiny_inputs
    with pytest.raises(ValueError, match="height = 7 is not divisible by the patch size 2"):
        tiny_teacher.velocity(x[..., :7, :], 0.5, text)
    with pytest.raises(ValueError, match="3 channels but the model expects 4"):
        tiny_teacher.velocity(x[:, :3], 0.5, text)
    with pytest.raises(ValueError, match="must have shape"):
        tiny_teacher.velocity(x[0], 0.5, text)
    with pytest.raises(ValueError, match="width 16 but the model's text_dim is 32"):
        tiny_teacher.velocity(x, 0.5, text[..., :16])
    with pytest.raises(ValueError, match="batch 1 but the latents have batch 2"):
        tiny_teacher.velocity(x, 0.5, text[:1])
    with pytest.raises(ValueError, match=r"time must lie in \[0, 1\]"):
        tiny_teacher.velocity(x, 1000.0, text)
