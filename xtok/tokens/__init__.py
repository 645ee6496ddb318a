"""Tokenizers and their canonical token bytes.

This package owns one thing: for any tokenizer a user can name (a Hugging Face `tokenizer.json`
file or folder, a SentencePiece `.model`, a mistral-common Tekken `.json`, the tokenizer inside a
llama.cpp `.gguf` file, or a hub id), a uniform `Tokenizer` object that encodes/decodes text and
knows, for every token id, the exact raw bytes that token stands for (`TokenBytes`). Everything
downstream (alignment, projection, extraction, collation) works on those bytes, never on
tokenizer-specific token strings. Special / control tokens are flagged `is_special` and have no bytes.

Modules: `token_bytes` (TokenBytes, byte maps, char -> byte offsets), `tokenizer` (Tokenizer, its
content hash and offsets), `backends` (the tokenizers / sentencepiece / tiktoken libraries behind it),
`hf_json` (tokenizer.json: per-id bytes by vocabulary convention), `gguf` (the tokenizer inside a .gguf
file) and `load` (`load_tokenizer`: every spec -> Tokenizer; SentencePiece and Tekken files).
"""
from __future__ import annotations

from .gguf import GGUF_EXTRA_HINT, gguf_files, require_gguf
from .load import builtin_tokenizer_path, load_tokenizer, mistral_common_data_dir
from .token_bytes import TokenBytes, bytes_to_unicode, char_to_byte_offsets
from .tokenizer import HASH_PROBE_TEXT, Tokenizer, TokenizerLoadError

__all__ = [
    "HASH_PROBE_TEXT",
    "TokenBytes",
    "Tokenizer",
    "TokenizerLoadError",
    "load_tokenizer",
    "bytes_to_unicode",
    "char_to_byte_offsets",
    "builtin_tokenizer_path",
    "mistral_common_data_dir",
    "require_gguf",
    "gguf_files",
    "GGUF_EXTRA_HINT",
]
