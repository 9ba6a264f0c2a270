"""UMT5 text encoder with Wan2.1's prompt-embedding convention.

Wan2.1 conditions on UMT5-XXL hidden states of length 512 (width 4096) in which every position after
the prompt's true tokens (those covered by the attention mask, ``</s>`` included) is exactly zero. The
synthetic CPU world runs the same code path with a tiny random UMT5 and a word-level tokenizer
(``tmd.world.text``).
"""

from __future__ import annotations

import html
import json
import re
import warnings
from pathlib import Path

import torch
from tokenizers import models
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5EncoderModel

from tmd.errors import PromptError, TmdWarning
from tmd.files import check_safetensors_folder, share_like_other_files
from tmd.models.folder import check_wan_folder

try:
    import ftfy
except ImportError:
    ftfy = None

__all__ = [
    "WAN_MAX_LENGTH",
    "WAN_NEGATIVE_PROMPT",
    "PAD_TOKEN",
    "EOS_TOKEN",
    "UNK_TOKEN",
    "TextEncoder",
    "clean_prompt",
    "check_known_words",
]

WAN_MAX_LENGTH = 512

# WanPipeline.__call__ has no default negative prompt (encode_prompt falls back to ""); this is the one
# used in the example docstring of diffusers' pipeline_wan.py, an English rendering of the original Wan
# repo's Chinese default ``sample_neg_prompt``.
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)

# T5's ids: pad 0, eos 1, unk 2.
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)

# Tokenizers saved without a length limit report a huge sentinel model_max_length.
_SANE_MAX_LENGTH = 1_000_000


def clean_prompt(text: str) -> str:
    """Same cleaning as diffusers' Wan ``prompt_clean`` so embeddings match the pipeline's."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _quoted(prompt: str, length: int = 60) -> str:
    return repr(prompt if len(prompt) <= length else prompt[: length - 3] + "...")


def check_known_words(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> None:
    """Fail loudly, naming each prompt, instead of silently conditioning on ``<unk>`` (word-level
    tokenizers only: a subword tokenizer such as UMT5's encodes any text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.model, models.WordLevel):
        return
    vocab = backend.get_vocab()
    problems = []
    for prompt in prompts:
        text = backend.normalizer.normalize_str(prompt) if backend.normalizer else prompt
        unknown = dict.fromkeys(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text) if word not in vocab)
        if unknown:
            problems.append(f"prompt {_quoted(prompt)} has unknown word(s) {list(unknown)}")
    if problems:
        known = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if w not in SPECIAL_TOKENS]
        listed = f"{known[:200]}{' and more' if len(known) > 200 else ''}"
        more = f"; and {len(problems) - 5} more prompts" if len(problems) > 5 else ""
        raise PromptError(f"{'; '.join(problems[:5])}{more}; the tokenizer's vocabulary is {listed}")


class TextEncoder:
    """Tokenizer + ``UMT5EncoderModel`` producing Wan-style zero-padded prompt embeddings."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: UMT5EncoderModel, max_length: int | None = None):
        if max_length is None:
            tok_max = tokenizer.model_max_length
            max_length = tok_max if tok_max and tok_max < _SANE_MAX_LENGTH else WAN_MAX_LENGTH
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = int(max_length)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    def tokenize(
        self, prompts: list[str], max_length: int | None = None, strict: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids and attention mask exactly as ``WanPipeline._get_t5_prompt_embeds`` builds them.

        ``strict`` refuses words a word-level tokenizer does not know (:func:`check_known_words`), where
        a typo would silently become ``<unk>``; without it unknown words map to ``<unk>`` as in diffusers,
        which is what a negative prompt the user never typed needs. A prompt longer than ``max_length``
        tokens is cut, as in Wan's pipeline, with a warning.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        prompts = [clean_prompt(p) for p in prompts]
        if strict:
            check_known_words(self.tokenizer, prompts)
        max_length = max_length or self.max_length
        full = self.tokenizer(prompts, add_special_tokens=True, verbose=False).input_ids
        for prompt, ids in zip(prompts, full):
            if len(ids) > max_length:
                # raised from here, not the caller: one place, so a prompt tokenized twice warns once
                warnings.warn(
                    f"prompt {_quoted(prompt)} is {len(ids)} tokens long; the text encoder reads its first "
                    f"{max_length} and the rest is cut",
                    TmdWarning,
                    stacklevel=1,
                )
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask

    @torch.no_grad()
    def encode(self, prompts: list[str], max_length: int | None = None, strict: bool = True) -> torch.Tensor:
        """(B, L, D) float32 embeddings, exactly zero after each prompt's true tokens."""
        ids, mask = self.tokenize(prompts, max_length, strict)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        # Right padding makes the mask a prefix, so this equals Wan's trim-to-length-then-zero-pad.
        keep = mask.gt(0).unsqueeze(-1)
        return torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).float()

    def save_pretrained(self, path: str | Path) -> None:
        """Write the diffusers Wan pipeline-root layout: ``text_encoder/`` and ``tokenizer/``."""
        path = Path(path)
        self.model.save_pretrained(path / "text_encoder")
        tok_dir = path / "tokenizer"
        self.tokenizer.save_pretrained(tok_dir)
        # transformers 5 records its own class name "TokenizersBackend", which 4.x cannot resolve;
        # "PreTrainedTokenizerFast" loads under both.
        cfg_file = tok_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
        share_like_other_files(path / "text_encoder", tok_dir)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
    ) -> TextEncoder:
        """Load from a Wan pipeline root (``text_encoder/`` + ``tokenizer/``) or a folder holding both."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder folder {path} does not exist")
        if (path / "text_encoder" / "config.json").is_file():
            check_wan_folder(path, experts=None)  # a pipeline root: refuse what tmd cannot represent
            model_dir, tok_dir = path / "text_encoder", path / "tokenizer"
            if not tok_dir.is_dir():
                raise FileNotFoundError(f"no tokenizer/ folder under {path} (next to text_encoder/)")
        elif (path / "config.json").is_file():
            model_dir = tok_dir = path
        else:
            raise FileNotFoundError(
                f"no text_encoder/config.json under {path}: expected a Wan pipeline root with text_encoder/ "
                "and tokenizer/ subfolders, or a folder holding config.json and tokenizer files"
            )

        try:
            model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
        except json.JSONDecodeError as e:
            raise ValueError(f"{model_dir / 'config.json'} is not valid JSON: {e}") from None
        if model_type != "umt5":
            raise ValueError(f"{model_dir / 'config.json'} has model_type {model_type!r}, expected 'umt5'")
        check_safetensors_folder(model_dir)
        if not any((tok_dir / name).is_file() for name in ("tokenizer.json", "spiece.model")):
            raise FileNotFoundError(f"no tokenizer files (tokenizer.json or spiece.model) in {tok_dir}")

        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
            model = UMT5EncoderModel.from_pretrained(model_dir, dtype=dtype, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"could not load the text encoder from {path}: {e}") from None
        return cls(tokenizer, model, max_length).to(device)
