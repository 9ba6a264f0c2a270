import json
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import UMT5EncoderModel

from tmd.errors import PromptError, TmdWarning
from tmd.models.text import WAN_NEGATIVE_PROMPT, TextEncoder
from tmd.world.text import SYNTHETIC_NEGATIVE_PROMPT, build_tiny_text_encoder, build_word_tokenizer

VOCAB = ["a", "red", "blue", "circle", "square", "moves", "left", "right"]
PROMPTS = ["a red circle moves left", "A  BLUE square", SYNTHETIC_NEGATIVE_PROMPT]


@pytest.fixture(scope="module")
def encoder():
    return build_tiny_text_encoder(VOCAB, dim=32, layers=2, heads=2, ff=64, max_length=12, seed=0)


@pytest.fixture(scope="module")
def saved(encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_root")
    encoder.save_pretrained(root)
    return root


def test_word_tokenizer_round_trip(tmp_path):
    tok = build_word_tokenizer(VOCAB, model_max_length=8)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("A red circle")["input_ids"]
    assert ids == [3, 4, 6, 1]
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle"
    assert tok("")["input_ids"] == [1]

    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded("A red circle")["input_ids"] == ids
    assert loaded.model_max_length == 8 and loaded.pad_token_id == 0 and loaded.padding_side == "right"


def test_bad_vocabulary():
    with pytest.raises(ValueError, match="duplicate"):
        build_word_tokenizer(["red", "Red"])
    with pytest.raises(ValueError, match="single words"):
        build_word_tokenizer(["red car"])


def test_unknown_word_lists_word_and_vocabulary(encoder):
    with pytest.raises(PromptError) as err:
        encoder.encode(["a red circle", "a green circle", "a purple square"])
    msg = str(err.value)
    assert "prompt 'a green circle' has unknown word(s) ['green']" in msg
    assert "prompt 'a purple square' has unknown word(s) ['purple']" in msg and "red circle" not in msg
    assert all(repr(w) in msg for w in VOCAB)


def test_not_strict_maps_unknown_words_to_unk_as_diffusers_does(encoder):
    """A negative prompt the user never typed must encode with any vocabulary."""
    ids, mask = encoder.tokenize([WAN_NEGATIVE_PROMPT], max_length=100, strict=False)
    assert ids[0, :2].tolist() == [encoder.tokenizer.unk_token_id] * 2 and mask.sum() == 78  # 77 words and commas, </s>
    assert torch.equal(
        ids, encoder.tokenizer([WAN_NEGATIVE_PROMPT], padding="max_length", max_length=100, return_tensors="pt").input_ids
    )


def test_a_prompt_longer_than_the_encoder_reads_is_cut_with_a_warning(encoder):
    long = "a red circle moves left right left right a blue square moves"
    with pytest.warns(TmdWarning, match=r"prompt 'a red circle moves .*' is 13 tokens long; .* reads its first 12"):
        encoder.tokenize([long])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        encoder.tokenize([long])
        encoder.encode([long])  # tokenizes it again: still one warning
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.tokenize(PROMPTS)


def test_encode_shape_padding_determinism(encoder):
    emb = encoder.encode(PROMPTS)
    assert emb.shape == (3, encoder.max_length, encoder.dim) == (3, 12, 32)
    assert emb.dtype == torch.float32 and not emb.requires_grad
    for row, n_tokens in zip(emb, [6, 4, 1]):  # words + </s>
        assert row[:n_tokens].abs().sum(-1).gt(0).all()
        assert torch.equal(row[n_tokens:], torch.zeros_like(row[n_tokens:]))
    assert torch.equal(emb, encoder.encode(PROMPTS))
    assert encoder.encode(PROMPTS, max_length=20).shape == (3, 20, 32)

    again = build_tiny_text_encoder(VOCAB, dim=32, layers=2, heads=2, ff=64, max_length=12, seed=0)
    other = build_tiny_text_encoder(VOCAB, dim=32, layers=2, heads=2, ff=64, max_length=12, seed=1)
    assert torch.equal(emb, again.encode(PROMPTS))
    assert not torch.equal(emb, other.encode(PROMPTS))


def test_to_dtype_keeps_float32_output():
    enc = build_tiny_text_encoder(VOCAB, dim=32, layers=2, heads=2, ff=64, max_length=12)
    enc.to("cpu", torch.bfloat16)
    assert enc.dtype == torch.bfloat16 and enc.device.type == "cpu"
    assert enc.encode(PROMPTS[:1]).dtype == torch.float32


def test_save_load_round_trip(encoder, saved):
    assert (saved / "text_encoder" / "model.safetensors").is_file()
    assert (saved / "tokenizer" / "tokenizer.json").is_file()
    loaded = TextEncoder.from_pretrained(saved)
    assert loaded.max_length == encoder.max_length and loaded.dim == encoder.dim
    assert torch.equal(loaded.encode(PROMPTS), encoder.encode(PROMPTS))


def test_direct_layout_loads(encoder, saved, tmp_path):
    shutil.copytree(saved / "text_encoder", tmp_path, dirs_exist_ok=True)
    shutil.copytree(saved / "tokenizer", tmp_path, dirs_exist_ok=True)
    assert torch.equal(TextEncoder.from_pretrained(tmp_path).encode(PROMPTS), encoder.encode(PROMPTS))


def test_from_pretrained_errors(saved, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="no text_encoder/config.json under"):
        TextEncoder.from_pretrained(tmp_path)

    no_tok = tmp_path / "no_tok"
    shutil.copytree(saved / "text_encoder", no_tok / "text_encoder")
    with pytest.raises(FileNotFoundError, match="no tokenizer/ folder under"):
        TextEncoder.from_pretrained(no_tok)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(saved, no_weights)
    (no_weights / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no .safetensors weights in .*text_encoder"):
        TextEncoder.from_pretrained(no_weights)
    # pickled weights are never loaded, even where transformers would
    torch.save(
        UMT5EncoderModel.from_pretrained(saved / "text_encoder").state_dict(), no_weights / "text_encoder" / "pytorch_model.bin"
    )
    with pytest.raises(FileNotFoundError, match=r"tmd never loads pickled weights \(found pytorch_model.bin"):
        TextEncoder.from_pretrained(no_weights)

    truncated = tmp_path / "truncated"
    shutil.copytree(saved, truncated)
    weights = truncated / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model.safetensors is not a complete safetensors file"):
        TextEncoder.from_pretrained(truncated)

    wrong_type = tmp_path / "wrong_type"
    shutil.copytree(saved, wrong_type)
    cfg_file = wrong_type / "text_encoder" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_type": "clip"}))
    with pytest.raises(ValueError, match="expected 'umt5'"):
        TextEncoder.from_pretrained(wrong_type)


def test_matches_diffusers_wan_prompt_embeds(encoder):
    """Call diffusers' own method unbound on a stand-in object holding just what it reads."""
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    pipe = SimpleNamespace(tokenizer=encoder.tokenizer, text_encoder=encoder.model, _execution_device=torch.device("cpu"))
    prompts = PROMPTS + ["a red circle moves left right left right a blue square moves"]  # truncated
    expected = WanPipeline._get_t5_prompt_embeds(pipe, prompt=prompts, max_sequence_length=encoder.max_length)
    with pytest.warns(TmdWarning, match="is 13 tokens long"):
        assert torch.equal(encoder.encode(prompts), expected)


def test_negative_prompts():
    assert WAN_NEGATIVE_PROMPT.startswith("Bright tones, overexposed") and WAN_NEGATIVE_PROMPT.endswith("backwards")
    assert SYNTHETIC_NEGATIVE_PROMPT == ""
