"""Tokenizers: the tiny default's word-level tokenizer, built locally, or a real checkpoint's.

The tiny tokenizer's vocabulary is the synthetic benchmark's words plus punctuation and the special
tokens of Qwen2.5-Omni (same spellings, so the same prompt code serves both) plus ``[SEG]``. It
lower-cases text; the answer parser is case-insensitive.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from aurora_core.data.synthetic import VOCABULARY
from aurora_core.reasoning import SEG_TOKEN

# Qwen2.5-Omni's multimodal and chat special tokens (the names its processor looks up).
MM_TOKENS = dict(
    image_token="<|IMAGE|>", video_token="<|VIDEO|>", audio_token="<|AUDIO|>",
    vision_bos_token="<|vision_bos|>", vision_eos_token="<|vision_eos|>",
    audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>",
)
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"
TINY_SPECIALS = ["<pad>", "<unk>", CHAT_START, CHAT_END, "<|endoftext|>", *MM_TOKENS.values(), SEG_TOKEN]
PUNCTUATION = list(".,:;!?'\"()-")
CHAT_WORDS = ["user", "assistant", "system"]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = TINY_SPECIALS + sorted(set(CHAT_WORDS + PUNCTUATION + list(VOCABULARY)))
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Added (special) tokens are matched before normalisation and never split: "<|VIDEO|>" stays whole.
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in TINY_SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token=CHAT_END,
        seg_token=SEG_TOKEN, padding_side="left", **MM_TOKENS)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A saved or real tokenizer from a local directory (never the hub); adds [SEG] if absent."""
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if tok.convert_tokens_to_ids(SEG_TOKEN) in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": [SEG_TOKEN]})
    for name, text in MM_TOKENS.items():
        if tok.convert_tokens_to_ids(text) in (None, tok.unk_token_id):
            raise ValueError(f"tokenizer at {path} lacks the Qwen2.5-Omni token {text} ({name}); "
                             "point model.llm_path at a Qwen2.5-Omni checkpoint")
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    tok.padding_side = "left"
    return tok


def token_id(tok: PreTrainedTokenizerBase, text: str) -> int:
    i = tok.convert_tokens_to_ids(text)
    if i is None or (i == tok.unk_token_id and text != tok.unk_token):
        raise ValueError(f"token {text!r} is not in the tokenizer's vocabulary")
    return int(i)
