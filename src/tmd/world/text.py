"""The synthetic world's text encoder: a tiny random UMT5 behind a T5-compatible word-level tokenizer.

It runs the same code path as Wan's UMT5-XXL (``tmd.models.text.TextEncoder``); tests build tiny Wan
pipelines with it too.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from tmd.models.text import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, UNK_TOKEN, WAN_MAX_LENGTH, TextEncoder

# Tokenizes to just ``</s>``, so it is valid for any word vocabulary.
SYNTHETIC_NEGATIVE_PROMPT = ""


def build_word_tokenizer(vocabulary: list[str], model_max_length: int = WAN_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """T5-compatible word-level tokenizer: lower-cased whitespace words, ``</s>`` appended, pad id 0."""
    words = [w.lower() for w in vocabulary]
    splitter = pre_tokenizers.Whitespace()
    bad = [w for w in words if [p for p, _ in splitter.pre_tokenize_str(w)] != [w] or w in SPECIAL_TOKENS]
    if bad:
        raise ValueError(f"vocabulary entries must be single words and not special tokens, got {bad}")
    duplicates = sorted({w for w in words if words.count(w) > 1})
    if duplicates:
        raise ValueError(f"vocabulary has duplicate words (case-insensitive): {duplicates}")

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = splitter
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}",
        pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(EOS_TOKEN, vocab[EOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
    )


def build_tiny_text_encoder(
    vocabulary: list[str],
    dim: int = 64,
    layers: int = 2,
    heads: int = 2,
    ff: int = 128,
    max_length: int = 16,
    seed: int = 0,
) -> TextEncoder:
    """Random tiny UMT5 for the synthetic world; same weights for the same arguments."""
    if dim % heads:
        raise ValueError(f"dim {dim} must be divisible by heads {heads}")
    tokenizer = build_word_tokenizer(vocabulary, model_max_length=max_length)
    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=dim,
        d_kv=dim // heads,
        num_heads=heads,
        num_layers=layers,
        d_ff=ff,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    return TextEncoder(tokenizer, model, max_length)
