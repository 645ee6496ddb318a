"""Tokenizers and their canonical token bytes.

This module owns one thing: for any tokenizer a user can name (a Hugging Face `tokenizer.json`
file or folder, a SentencePiece `.model`, a mistral-common Tekken `.json`, the tokenizer inside a
llama.cpp `.gguf` file, or a hub id), a
uniform `Tokenizer` object that encodes/decodes text and knows, for every token id, the exact
raw bytes that token stands for (`TokenBytes`). Everything downstream (alignment, projection,
extraction, collation) works on those bytes, never on tokenizer-specific token strings.

Byte conventions handled here:
- byte-level BPE (GPT-2 / Llama-3 / Qwen / DeepSeek): token strings use the GPT-2 byte->unicode map;
- SentencePiece / metaspace (Llama-2 / Mistral / Gemma): `▁` is a space, `<0xNN>` pieces are raw bytes
  (byte fallback; several of them may form one UTF-8 character);
- WordPiece (BERT): `##x` continues a word (bytes `x`), any other piece starts a word (bytes ` x`),
  then the WordPiece decoder's `cleanup` (when the tokenizer.json enables it) is applied to each piece
  exactly as the `tokenizers` decoder applies it to each token: `.` `,` `!` `?` (and pieces such as
  `...`) lose the space that would start a new word, so `hello, world!` has bytes ` hello` `,` ` world`
  `!` and concatenates to what the tokenizer's own decode gives. What per-token bytes cannot follow:
  the decoder adds no space before the first token of a sequence (our bytes keep it: `prefix_space`)
  and keeps `##` on a sequence-initial continuation; the cleanup's apostrophe rules (`" ' "` -> `'`,
  `" n't"`, `" 's"`, `" do not"` -> `" don't"`, ...) need the neighbouring token, which the `tokenizers`
  decoder does not look at either (it decodes `don't` as `don ' t`, and so do our bytes), while
  transformers' `clean_up_tokenization_spaces` applies them to the whole decoded string (`don't`):
  that string-level step is not reproduced. The BERT normaliser (lower-casing, accent stripping, spaces
  around CJK characters) also means the bytes spell the normalised text, not the input.
- Tekken: the vocabulary stores raw bytes directly.
Special / control tokens are flagged `is_special` and have no bytes.

`Tokenizer.content_hash` identifies a tokenizer by what it does, not by its file format: the sha256 of
the token-bytes table, the special flags and the ids the tokenizer gives for a fixed probe text
(`HASH_PROBE_TEXT`: English, code with indentation, digit runs, whitespace runs, CJK, emoji, combining
marks, words some BPE merge lists cannot reach). The same vocabulary in two formats (a tokenizer.json
and the SentencePiece .model it was converted from) shares a hash; the same vocabulary with different
merges, pre-tokenizer or normaliser (e.g. Llama-3's `"ignore_merges": false` vs `true`) gets a
different one, so W files and stores built for one are refused for the other.

`Tokenizer.prefix_space` says whether encoding a text adds a leading space (SentencePiece's dummy
prefix, WordPiece's word-start convention): concatenating the token bytes of `encode(text)` gives
`text` (for tokenizers that do not normalise) with one extra leading space exactly when it is True
(WordPiece: unless the text starts with glued punctuation such as `,`).

`encode(text, parse_special=False)` encodes special-token strings in the text (`<|im_start|>`, `<s>`)
as the plain text they are, for every backend (Hugging Face: a private copy of the tokenizer with
`encode_special_tokens = True`, so the shared one is never switched).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import lzma
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "HASH_PROBE_TEXT",
    "TokenBytes",
    "Tokenizer",
    "TokenizerLoadError",
    "load_tokenizer",
    "bytes_to_unicode",
    "char_to_byte_offsets",
]


class TokenizerLoadError(ValueError):
    """A tokenizer spec that nothing could load; the message names the path and the fix."""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable unicode character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

# The fixed text whose ids are part of `Tokenizer.content_hash` (changing it changes every hash).
# No special-token strings: formats legitimately differ on whether literal "<s>" in text is a token.
HASH_PROBE_TEXT = (
    "Hello world! The quick brown fox jumps over the lazy dog. It's 3:45 p.m., isn't it? I'd've said \"no\".\n"
    "    def f(x, y=2):\n\treturn {'a': [x ** y, -1.5e-3]}  # comment\n\n\n"
    "class A:\n    pass\n\n        deeply_indented = True\n"
    "0 7 42 123 4567 89012 3141592653589793 1,000,000.00 $19.99 2024-11-24 10^6 0x1F 1e-9\n"
    "   leading and trailing spaces   \n\t\ttabs\t \r\nCRLF\r\n \n  \n"
    "日本語のテキスト、中文文本。한국어 텍스트 Привет, мир! Ελληνικά עברית العربية हिन्दी ไทย ខ្មែរ\n"
    "Việt Nam, Cửa Việt; özellikle Türkiye; например, každý; використання; اطلاعات\n"
    "e\u0301 a\u0308 n\u0303 \u1e9b\u0323 Café naïve ﬁ Ⅻ ① 👍🏽 👨\u200d👩\u200d👧 🦙 ❤️ \u200b\u00a0\u3000!\n"
    "```python\nprint('x')\n``` ... ---- ==== \\\\ \" ' ` ~/a_b-c.d @user #tag 100% & | ^\n"
)


@dataclass(frozen=True)
class TokenBytes:
    """Token id -> raw bytes, as one flat buffer (numba-friendly).

    data:       uint8 [total]   all tokens' bytes concatenated
    offsets:    int64 [V + 1]   token i's bytes are data[offsets[i]:offsets[i+1]]
    is_special: bool  [V]       control/special tokens (no bytes; never aligned as text)
    word_start: bool  [V]       the token's bytes begin with a space (starts a new word)
    lengths:    int64 [V]       (property) np.diff(offsets): computed once, read-only, not pickled
    """

    data: np.ndarray
    offsets: np.ndarray
    is_special: np.ndarray
    word_start: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Byte length of each token (`np.diff(offsets)`; special tokens count their bytes, which
        `from_list` makes 0), computed once on first use and read-only (one array shared by every
        caller; copy it to modify). Not pickled: recomputed on first use after unpickling."""
        lengths = np.diff(self.offsets)
        lengths.flags.writeable = False
        return lengths

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("lengths", None)  # the cached_property's value
        return state

    def get(self, token_id: int) -> bytes:
        return self.data[self.offsets[token_id] : self.offsets[token_id + 1]].tobytes()

    def concat(self, ids: Sequence[int] | np.ndarray) -> bytes:
        """Bytes of a token sequence (special tokens contribute nothing). Vectorised."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return b""
        starts = self.offsets[ids]
        lens = self.offsets[ids + 1] - starts
        total = int(lens.sum())
        if total == 0:
            return b""
        # index of every output byte: start of its token + position inside it
        rep_starts = np.repeat(starts - np.concatenate(([0], np.cumsum(lens)[:-1])), lens)
        idx = rep_starts + np.arange(total)
        return self.data[idx].tobytes()

    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(self.offsets.astype("<i8").tobytes())
        h.update(self.data.tobytes())
        h.update(self.is_special.astype(np.uint8).tobytes())
        return h.hexdigest()

    @classmethod
    def from_list(cls, pieces: Sequence[bytes | None]) -> "TokenBytes":
        """Build from a per-id list of bytes (None = special token)."""
        lens = np.fromiter((0 if p is None else len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        data = np.frombuffer(b"".join(p for p in pieces if p), dtype=np.uint8).copy()
        is_special = np.fromiter((p is None for p in pieces), dtype=bool, count=len(pieces))
        first = np.zeros(len(pieces), dtype=np.int16) - 1
        nz = lens > 0
        first[nz] = data[offsets[:-1][nz]]
        word_start = first == 0x20
        return cls(data=data, offsets=offsets, is_special=is_special, word_start=word_start)


# --------------------------------------------------------------------------------------------
# The uniform tokenizer object
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """A loaded tokenizer with canonical token bytes. Picklable (for DataLoader workers).

    Attributes: name, kind ('byte_level' | 'sentencepiece' | 'wordpiece' | 'tekken' | 'raw'),
    vocab_size, prefix_space, bos_id/eos_id/pad_id/unk_id (int or None), chat_template (str or None),
    content_hash (sha256 of the token-bytes table, the special flags and the ids of `HASH_PROBE_TEXT`:
    two files describing the same tokenizer share it, the same vocabulary with other merges /
    pre-tokenizer / normaliser does not).
    """

    def __init__(self, backend, *, name: str, kind: str, pieces: list[bytes | None], prefix_space: bool,
                 special_tokens: dict[str, int], chat_template: str | None, bos_id=None, eos_id=None,
                 pad_id=None, unk_id=None, source: str = ""):
        self._backend = backend
        self.name = name
        self.kind = kind
        self.source = source
        self.token_bytes = TokenBytes.from_list(pieces)
        self.vocab_size = self.token_bytes.vocab_size
        self.prefix_space = prefix_space
        self.special_tokens = dict(special_tokens)  # text -> id, parsed out of text by encode()
        self.chat_template = chat_template
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self._special_re = (
            re.compile("(" + "|".join(re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)) + ")")
            if self.special_tokens else None
        )
        self.content_hash = self._content_hash()

    def _content_hash(self) -> str:
        """sha256 of the token-bytes table + special flags + the ids of HASH_PROBE_TEXT (see module doc)."""
        try:
            probe = np.asarray(self._backend.encode(HASH_PROBE_TEXT, False, True, self), dtype="<i8")
        except Exception:  # noqa: BLE001  (e.g. a vocabulary with no unk token for the probe's rarer scripts)
            parts = []
            for line in HASH_PROBE_TEXT.splitlines(keepends=True):  # what encodes, line by line; -1 for the rest
                try:
                    parts.append(np.asarray(self._backend.encode(line, False, True, self), dtype="<i8"))
                except Exception:  # noqa: BLE001
                    parts.append(np.array([-1], dtype="<i8"))
            probe = np.concatenate(parts)
        h = hashlib.sha256()
        h.update(b"xtok-tokenizer-v2\0")
        h.update(bytes.fromhex(self.token_bytes.sha256()))
        h.update(np.int64(probe.size).astype("<i8").tobytes())
        h.update(probe.tobytes())
        return h.hexdigest()

    def __repr__(self):
        return f"Tokenizer({self.name!r}, kind={self.kind}, vocab={self.vocab_size})"

    # -- text <-> ids ------------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = False, parse_special: bool = True) -> np.ndarray:
        """Token ids (int64) of `text`. With parse_special, special-token strings in the text
        (e.g. `<s>`, `[INST]`, `<|im_start|>`) become their ids, as chat templates need."""
        return np.asarray(self._backend.encode(text, add_special_tokens, parse_special, self), dtype=np.int64)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of `text` (special-token strings parsed) and each token's byte span
        `[start, end)` in `text.encode('utf-8')` as an int64 [n, 2] array.

        Special tokens span their own text; a SentencePiece dummy-prefix space that is not in the
        text is not counted. Tokenizers that normalise (lower-casing, NFKC) get the spans their
        backend reports (Hugging Face offsets; byte-fallback pieces of one character, which share
        its span there, split it by their byte lengths); others get exact cumulative byte lengths.
        """
        if isinstance(self._backend, _HFBackend):
            enc = self._backend.tok.encode(text, add_special_tokens=False)
            ids = np.asarray(enc.ids, dtype=np.int64)
            char_off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            text_b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            off = char_to_byte_offsets(text)[char_off]
            # exact byte spans when the token bytes reproduce the text (no normalisation):
            # HF offsets are char-granular, so a token holding part of a UTF-8 char needs this
            lens = self.token_bytes.lengths[ids].copy()
            sp = self.token_bytes.is_special[ids]
            lens[sp] = off[sp, 1] - off[sp, 0]
            if ids.size and lens.sum() == len(text_b):
                ends = np.cumsum(lens)
                exact = np.stack([ends - lens, ends], axis=1)
                keep = np.ones(len(text_b), dtype=bool)
                for s, e in exact[sp]:
                    keep[s:e] = False
                if np.array_equal(text_b[keep], np.frombuffer(self.token_bytes.concat(ids), dtype=np.uint8)):
                    return ids, exact
            return ids, _split_shared_spans(off, lens, sp)

        all_ids, all_off = [], []
        pos = 0
        for is_sp, part in self._split_special(text):
            nbytes = len(part.encode("utf-8"))
            if is_sp:
                all_ids.append(np.array([self.special_tokens[part]], dtype=np.int64))
                all_off.append(np.array([[pos, pos + nbytes]], dtype=np.int64))
            else:
                ids = np.asarray(self._backend.encode(part, False, False, self), dtype=np.int64)
                lens = self.token_bytes.lengths[ids].copy()
                if self.prefix_space and lens.size and lens.sum() == nbytes + 1 and self.token_bytes.word_start[ids[0]]:
                    # SentencePiece's dummy-prefix space is not in the text. It is added to every part,
                    # also one that starts with a space or newline (' What' -> '▁', '▁What'), so the
                    # first token may become zero-width.
                    lens[0] -= 1
                ends = pos + np.cumsum(lens)
                all_ids.append(ids)
                all_off.append(np.stack([ends - lens, ends], axis=1) if lens.size else np.zeros((0, 2), np.int64))
            pos += nbytes
        if not all_ids:
            return np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
        return np.concatenate(all_ids), np.concatenate(all_off)

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[np.ndarray]:
        return [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._backend.decode([int(i) for i in ids])

    def decode_bytes(self, ids) -> bytes:
        """Concatenated canonical bytes of `ids` (special tokens contribute nothing)."""
        return self.token_bytes.concat(ids)

    def token_str(self, token_id: int) -> str:
        """A readable rendering of one token (for CLIs): its text, or `<special>`."""
        if self.token_bytes.is_special[token_id]:
            return self._backend.id_to_text(token_id)
        return self.token_bytes.get(token_id).decode("utf-8", errors="backslashreplace")

    def id_of(self, token_text: str) -> int | None:
        return self.special_tokens.get(token_text)

    # -- helpers used by the backends ----------------------------------------------------
    def _split_special(self, text: str):
        """Yield (is_special, piece) parts of text, special-token strings split out."""
        if self._special_re is None:
            yield False, text
            return
        for part in self._special_re.split(text):
            if not part:
                continue
            yield (part in self.special_tokens), part


def char_to_byte_offsets(text: str) -> np.ndarray:
    """int64 [len(text) + 1]: the byte offset in `text.encode('utf-8')` of every char boundary
    (the last entry is the byte length). A lone surrogate raises UnicodeEncodeError, as encode does."""
    text_b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    c2b = np.zeros(len(text) + 1, dtype=np.int64)
    if text:  # count the non-continuation bytes
        c2b[:-1] = np.nonzero((text_b & 0xC0) != 0x80)[0]
        c2b[-1] = len(text_b)
    return c2b


def _split_shared_spans(off: np.ndarray, lens: np.ndarray, special: np.ndarray) -> np.ndarray:
    """HF offsets are char-granular: byte-fallback pieces of one character (`<0xE2><0x98><0x95>`)
    all get the character's span. Split each run of consecutive non-special tokens sharing one
    span whose byte lengths add up to it into consecutive exact sub-spans. Vectorised."""
    n = off.shape[0]
    if n < 2:
        return off
    same = np.all(off[1:] == off[:-1], axis=1)
    if not same.any():
        return off
    first = np.concatenate(([True], ~same))
    run = np.cumsum(first) - 1
    starts = np.nonzero(first)[0]
    count = np.bincount(run)
    total = np.bincount(run, weights=lens).astype(np.int64)
    has_sp = np.bincount(run, weights=special.astype(np.int64)) > 0
    ok = (count > 1) & ~has_sp & (total == off[starts, 1] - off[starts, 0])
    sel = ok[run]
    if not sel.any():
        return off
    cum = np.cumsum(lens)
    before = cum - lens - (cum[starts] - lens[starts])[run]  # bytes of the run before each token
    out = off.copy()
    out[sel, 0] = off[sel, 0] + before[sel]
    out[sel, 1] = out[sel, 0] + lens[sel]
    return out


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class _HFBackend:
    """tokenizers.Tokenizer (tokenizer.json)."""

    def __init__(self, tok):
        self.tok = tok
        self._literal = None

    def __getstate__(self):
        return {"tok": self.tok, "_literal": None}

    @property
    def literal(self):
        """A private copy of the tokenizer with `encode_special_tokens = True`: special-token strings
        in the text are encoded as the text they are. Built on first use (a copy, so the shared
        `tok` that other callers and threads use is never mutated)."""
        lit = self._literal
        if lit is None:
            from tokenizers import Tokenizer as HFTok

            lit = HFTok.from_str(self.tok.to_str())
            if not hasattr(lit, "encode_special_tokens"):
                raise RuntimeError("encode(parse_special=False) needs tokenizers >= 0.15.1 "
                                   "(Tokenizer.encode_special_tokens); upgrade with pip install -U tokenizers.")
            lit.encode_special_tokens = True
            self._literal = lit
        return lit

    def encode(self, text, add_special_tokens, parse_special, owner):
        tok = self.tok if parse_special else self.literal
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def id_to_text(self, i):
        return self.tok.id_to_token(i) or f"<{i}>"


class _SPMBackend:
    """sentencepiece.SentencePieceProcessor (.model files). Pickles by its serialized proto."""

    def __init__(self, proto: bytes):
        self._proto = proto
        self._sp = None

    @property
    def sp(self):
        if self._sp is None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            self._sp.LoadFromSerializedProto(self._proto)
        return self._sp

    def __getstate__(self):
        return {"_proto": self._proto, "_sp": None}

    def encode(self, text, add_special_tokens, parse_special, owner):
        out: list[int] = []
        if add_special_tokens and owner.bos_id is not None:
            out.append(owner.bos_id)
        parts = owner._split_special(text) if parse_special else [(False, text)]
        for is_sp, part in parts:
            if is_sp:
                out.append(owner.special_tokens[part])
            else:
                out.extend(self.sp.EncodeAsIds(part))
        return out

    def decode(self, ids):
        return self.sp.DecodeIds(ids)

    def id_to_text(self, i):
        return self.sp.IdToPiece(i)


class _TekkenBackend:
    """mistral-common Tekken vocabulary (tiktoken-style byte BPE, ids = n_special + rank)."""

    def __init__(self, pattern: str, ranks: list[bytes], n_special: int, special_names: list[str]):
        self.pattern, self.ranks, self.n_special, self.special_names = pattern, ranks, n_special, special_names
        self._enc = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_enc"] = None
        return d

    @property
    def enc(self):
        if self._enc is None:
            import tiktoken

            self._enc = tiktoken.Encoding(
                name="tekken", pat_str=self.pattern,
                mergeable_ranks={b: r for r, b in enumerate(self.ranks)}, special_tokens={},
            )
        return self._enc

    def encode(self, text, add_special_tokens, parse_special, owner):
        out: list[int] = []
        if add_special_tokens and owner.bos_id is not None:
            out.append(owner.bos_id)
        parts = owner._split_special(text) if parse_special else [(False, text)]
        for is_sp, part in parts:
            if is_sp:
                out.append(owner.special_tokens[part])
            else:
                out.extend(r + self.n_special for r in self.enc.encode_ordinary(part))
        return out

    def decode(self, ids):
        b = b"".join(self.ranks[i - self.n_special] for i in ids if i >= self.n_special)
        return b.decode("utf-8", errors="replace")

    def id_to_text(self, i):
        return self.special_names[i] if i < self.n_special else self.ranks[i - self.n_special].decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _decoder_types(dec) -> list[str]:
    if not dec:
        return []
    if dec.get("type") == "Sequence":
        return [t for d in dec.get("decoders", []) for t in _decoder_types(d)]
    return [dec.get("type")]


def _wordpiece_cleanup_enabled(dec) -> bool:
    """Whether the tokenizer.json decoder is a WordPiece decoder with `cleanup` on (its default)."""
    if not dec:
        return False
    if dec.get("type") == "Sequence":
        return any(_wordpiece_cleanup_enabled(d) for d in dec.get("decoders", []))
    return dec.get("type") == "WordPiece" and bool(dec.get("cleanup", True))


def _wordpiece_cleanup(s: str) -> str:
    """The `tokenizers` WordPiece decoder's cleanup, applied (as the decoder does) to one token's text."""
    return (s.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" do not", " don't")
            .replace(" 's", "'s").replace(" 've", "'ve").replace(" 're", "'re"))


def _json_has(obj, key_type: str) -> bool:
    """Whether any nested component of a tokenizer.json section has type key_type."""
    if isinstance(obj, dict):
        if obj.get("type") == key_type:
            return True
        return any(_json_has(v, key_type) for v in obj.values())
    if isinstance(obj, list):
        return any(_json_has(v, key_type) for v in obj)
    return False


def _hf_pieces(spec: dict, tok) -> tuple[str, list[bytes | None], bool]:
    """Per-id canonical bytes for a tokenizer.json; returns (kind, pieces, prefix_space)."""
    model = spec["model"]
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    id_to_tok: list[str | None] = [None] * vocab_size
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        for t, i in vocab.items():
            if i < vocab_size:
                id_to_tok[i] = t
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        for i, (t, _s) in enumerate(vocab):
            id_to_tok[i] = t
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    dec_types = _decoder_types(spec.get("decoder"))
    if "ByteLevel" in dec_types or _json_has(spec.get("pre_tokenizer"), "ByteLevel"):
        kind = "byte_level"
    elif model.get("type") == "WordPiece" or "WordPiece" in dec_types:
        kind = "wordpiece"
    elif "Metaspace" in dec_types or "Replace" in dec_types or _json_has(spec.get("pre_tokenizer"), "Metaspace"):
        kind = "sentencepiece"
    else:
        kind = "raw"

    u2b = _unicode_to_byte()
    prefix = model.get("continuing_subword_prefix") or "##"
    clean = _wordpiece_cleanup if _wordpiece_cleanup_enabled(spec.get("decoder")) else (lambda x: x)
    pieces: list[bytes | None] = []
    for i in range(vocab_size):
        a = added.get(i)
        t = id_to_tok[i]
        if a is not None:
            if a.get("special", False):
                pieces.append(None)
                continue
            pieces.append(a["content"].encode("utf-8"))  # added tokens are literal text
            continue
        if t is None:
            t = tok.id_to_token(i)
        if t is None:
            pieces.append(None)
            continue
        if kind == "byte_level":
            try:
                pieces.append(bytes(u2b[c] for c in t))
            except KeyError:  # not a byte-mapped string (rare added pieces)
                pieces.append(t.encode("utf-8"))
        elif kind == "sentencepiece":
            m = _BYTE_PIECE.match(t)
            pieces.append(bytes([int(m.group(1), 16)]) if m else t.replace("\u2581", " ").encode("utf-8"))
        elif kind == "wordpiece":
            if t.startswith(prefix):
                pieces.append(clean(t[len(prefix):]).encode("utf-8"))
            elif t.startswith("[") and t.endswith("]") and t.isupper():
                pieces.append(None)  # [UNK]-style markers
            else:  # a new word: " " + t, then the decoder's cleanup (" ," -> ",")
                pieces.append(clean(" " + t).encode("utf-8"))
        else:
            pieces.append(t.encode("utf-8"))
    # prefix space: whatever the tokenizer does with a word at text start
    probe = tok.encode("a", add_special_tokens=False).ids
    b = b"".join(pieces[i] or b"" for i in probe)
    prefix_space = b.startswith(b" ") and b.strip() == b"a"
    if model.get("unk_token") is not None and model.get("type") == "Unigram":
        pass
    return kind, pieces, prefix_space


def _read_json(path: Path) -> dict:
    if path.suffix == ".xz":
        with lzma.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_hf_json(path: Path, config_dir: Path | None) -> Tokenizer:
    spec = _read_json(path)
    cfg = {}
    if config_dir is not None and (config_dir / "tokenizer_config.json").exists():
        cfg = json.loads((config_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    chat = None
    if config_dir is not None and (config_dir / "chat_template.jinja").exists():
        chat = (config_dir / "chat_template.jinja").read_text(encoding="utf-8")
    name = config_dir.name if config_dir is not None else path.name
    return _load_hf_spec(spec, cfg, name=name, source=str(path), chat_fallback=chat)


def _load_hf_spec(spec: dict, cfg: dict, *, name: str, source: str, chat_fallback: str | None = None) -> Tokenizer:
    """A Tokenizer from a parsed tokenizer.json (`spec`) and tokenizer_config.json fields (`cfg`:
    bos/eos/pad/unk_token, chat_template)."""
    from tokenizers import Tokenizer as HFTok

    tok = HFTok.from_str(json.dumps(spec))
    kind, pieces, prefix_space = _hf_pieces(spec, tok)
    added_special = {a["content"]: a["id"] for a in spec.get("added_tokens", []) if a.get("special")}

    def tok_of(key):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if v is None:
            return None
        return tok.token_to_id(v)

    bos, eos, pad, unk = (tok_of(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token"))
    chat = cfg.get("chat_template")
    if isinstance(chat, list):  # named templates
        chat = next((c["template"] for c in chat if c.get("name") == "default"), chat[0]["template"])
    if chat is None:
        chat = chat_fallback
    return Tokenizer(_HFBackend(tok), name=name, kind=kind, pieces=pieces, prefix_space=prefix_space,
                     special_tokens=added_special, chat_template=chat, bos_id=bos, eos_id=eos, pad_id=pad,
                     unk_id=unk, source=source)


# --------------------------------------------------------------------------------------------
# GGUF files (llama.cpp): the tokenizer inside them
# --------------------------------------------------------------------------------------------

GGUF_EXTRA_HINT = "pip install 'xtok[gguf]' (the gguf and accelerate packages)"


def require_gguf(what: str, packages: Sequence[str] = ("gguf",)) -> None:
    """Raise TokenizerLoadError naming the `xtok[gguf]` extra when a package GGUF files need is missing."""
    import importlib.util

    missing = [m for m in packages if importlib.util.find_spec(m) is None]
    if missing:
        raise TokenizerLoadError(f"{what}: a GGUF file needs the {', '.join(missing)} package(s), which are not "
                                 f"installed. Install them with {GGUF_EXTRA_HINT}.")


def gguf_files(folder: Path) -> list[Path]:
    """The .gguf files directly in `folder`, sorted."""
    return sorted(f for f in folder.glob("*.gguf") if f.is_file())


def _cache_dir() -> Path:
    return Path(os.environ.get("XTOK_CACHE_DIR") or Path.home() / ".cache" / "xtok")


def _load_gguf(p: Path) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata, converted by transformers' GGUF reader to a
    tokenizer.json (+ specials and chat template). The conversion (seconds to tens of seconds for a
    262k vocabulary) is cached under $XTOK_CACHE_DIR (default ~/.cache/xtok), keyed by the file's
    path, size and modification time."""
    require_gguf(str(p))
    st = p.stat()
    key = hashlib.sha256(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = _cache_dir() / "gguf-tokenizers" / f"{key}.json"
    got = None
    if cached.is_file():
        try:
            got = json.loads(cached.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            got = None
    if got is None:
        try:
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                t = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            finally:
                hf_logging.set_verbosity(verbosity)
            spec = json.loads(t.backend_tokenizer.to_str())
        except Exception as e:  # noqa: BLE001 - transformers/gguf raise many types on odd files
            raise TokenizerLoadError(f"{p}: transformers could not read a tokenizer from this GGUF file "
                                     f"({type(e).__name__}: {str(e)[:300]}).") from e
        cfg = {k: getattr(t, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        cfg["chat_template"] = getattr(t, "chat_template", None)
        got = {"spec": spec, "config": {k: (str(v) if v is not None and k != "chat_template" else v)
                                        for k, v in cfg.items()}}
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(got), encoding="utf-8")
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only home: convert again next time
    return _load_hf_spec(got["spec"], got["config"], name=p.name, source=str(p))


def _load_spm(path: Path) -> Tokenizer:
    import sentencepiece as spm

    proto = path.read_bytes()
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except Exception as e:  # noqa: BLE001
        raise TokenizerLoadError(f"{path}: not a SentencePiece model ({e}).") from e
    pieces: list[bytes | None] = []
    specials: dict[str, int] = {}
    for i in range(sp.GetPieceSize()):
        p = sp.IdToPiece(i)
        if sp.IsControl(i) or sp.IsUnknown(i):
            pieces.append(None)
            specials[p] = i
        elif sp.IsByte(i):
            pieces.append(bytes([int(_BYTE_PIECE.match(p).group(1), 16)]))
        else:
            pieces.append(p.replace("\u2581", " ").encode("utf-8"))
    probe = sp.EncodeAsIds("a")
    prefix_space = b"".join(pieces[i] or b"" for i in probe).startswith(b" ")
    # SentencePiece user-defined / control symbols that look like "[INST]" should parse as specials
    specials = {k: v for k, v in specials.items() if k not in ("<unk>",)}
    ids = lambda i: i if i >= 0 else None  # noqa: E731
    return Tokenizer(_SPMBackend(proto), name=path.name, kind="sentencepiece", pieces=pieces,
                     prefix_space=prefix_space, special_tokens=specials, chat_template=None,
                     bos_id=ids(sp.bos_id()), eos_id=ids(sp.eos_id()), pad_id=ids(sp.pad_id()),
                     unk_id=ids(sp.unk_id()), source=str(path))


_TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[TOOL_CONTENT]"]


def _load_tekken(path: Path, spec: dict) -> Tokenizer:
    cfg = spec["config"]
    n_special = int(cfg.get("default_num_special_tokens", 1000))
    vocab_size = int(cfg.get("default_vocab_size", n_special + len(spec["vocab"])))
    n_ranks = vocab_size - n_special
    ranks = [base64.b64decode(v["token_bytes"]) for v in spec["vocab"][:n_ranks]]
    names = [s["token_str"] for s in spec.get("special_tokens", [])] or list(_TEKKEN_SPECIALS)
    names = names + [f"<SPECIAL_{i}>" for i in range(len(names), n_special)]
    pieces: list[bytes | None] = [None] * n_special + ranks
    specials = {n: i for i, n in enumerate(names) if not n.startswith("<SPECIAL_")}
    return Tokenizer(_TekkenBackend(cfg["pattern"], ranks, n_special, names), name=path.name, kind="tekken",
                     pieces=pieces, prefix_space=False, special_tokens=specials, chat_template=None,
                     bos_id=specials.get("<s>"), eos_id=specials.get("</s>"), pad_id=specials.get("<pad>"),
                     unk_id=specials.get("<unk>"), source=str(path))


def mistral_common_data_dir() -> Path | None:
    """Folder of real tokenizers shipped by the `mistral-common` package (or None)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("mistral_common")
    except Exception:  # noqa: BLE001
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    return d if d.is_dir() else None


def builtin_tokenizer_path(name: str) -> Path | None:
    """`mistral-common:<file>` names one of the tokenizers mistral-common ships."""
    if not name.startswith("mistral-common:"):
        return None
    d = mistral_common_data_dir()
    if d is None:
        raise TokenizerLoadError(f"{name}: the `mistral-common` package is not installed (pip install mistral-common).")
    p = d / name.split(":", 1)[1]
    if not p.exists():
        avail = ", ".join(sorted(x.name for x in d.iterdir() if not x.name.startswith("_")))
        raise TokenizerLoadError(f"{name}: no such file in {d}. Available: {avail}")
    return p


@functools.lru_cache(maxsize=16)
def _load_cached(spec: str) -> Tokenizer:
    return _load_uncached(spec)


def load_tokenizer(spec: "str | os.PathLike | Tokenizer", *, cache: bool = True) -> Tokenizer:
    """Load a tokenizer from a local folder/file, a `mistral-common:<file>` name, or a hub id.

    Accepted: a folder with tokenizer.json (+ tokenizer_config.json for specials/chat template) or
    tokenizer.model (or holding one .gguf file); a tokenizer.json (or .json.xz); a SentencePiece
    .model (also mistral's `.model.v1/.v3`); a Tekken .json; a llama.cpp .gguf file (its embedded
    tokenizer; needs `xtok[gguf]`); `mistral-common:tekken_240911.json`; a hub id (needs network
    or the HF cache). Raises TokenizerLoadError naming the path and what to do when nothing loads.
    """
    if isinstance(spec, Tokenizer):
        return spec
    spec = str(spec)
    return _load_cached(spec) if cache else _load_uncached(spec)


def _load_uncached(spec: str) -> Tokenizer:
    p = builtin_tokenizer_path(spec) or Path(spec).expanduser()
    if p.is_dir():
        for cand in ("tokenizer.json", "tokenizer.json.xz"):
            if (p / cand).exists():
                return _load_hf_json(p / cand, p)
        for cand in sorted(p.glob("*.model*")) + sorted(p.glob("tekken*.json")):
            return _load_file(cand)
        ggufs = gguf_files(p)
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0])
        if ggufs:
            raise TokenizerLoadError(f"{p}: folder holds several .gguf files ({', '.join(g.name for g in ggufs)}); "
                                     "pass the one you mean.")
        raise TokenizerLoadError(
            f"{p}: folder has no tokenizer.json, tokenizer.model, tekken*.json or .gguf file. "
            "Point --teacher/--student at a tokenizer folder or file.")
    if p.is_file():
        return _load_file(p)
    if spec.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise TokenizerLoadError(f"{spec}: no such file or folder (and not a hub id like 'org/name').")
    return _load_hub(spec)


def _load_file(p: Path) -> Tokenizer:
    name = p.name
    if name.endswith(".gguf"):
        return _load_gguf(p)
    if name.endswith((".json", ".json.xz")):
        try:
            spec = _read_json(p)
        except (json.JSONDecodeError, UnicodeDecodeError, lzma.LZMAError) as e:
            raise TokenizerLoadError(f"{p}: not valid JSON ({e}); expected a tokenizer.json or Tekken .json.") from e
        if isinstance(spec, dict) and "config" in spec and "vocab" in spec and isinstance(spec["vocab"], list):
            return _load_tekken(p, spec)
        if isinstance(spec, dict) and "model" in spec:
            cfg_dir = p.parent if (p.parent / "tokenizer_config.json").exists() else None
            try:
                t = _load_hf_json(p, cfg_dir)
            except TokenizerLoadError:
                raise
            except Exception as e:  # noqa: BLE001
                raise TokenizerLoadError(f"{p}: the tokenizers library could not load it ({e}).") from e
            if cfg_dir is None:
                t.name = p.name
            return t
        raise TokenizerLoadError(f"{p}: JSON without a 'model' (tokenizer.json) or 'config'+'vocab' (Tekken) section.")
    if ".model" in name or name.endswith(".spm"):
        return _load_spm(p)
    raise TokenizerLoadError(
        f"{p}: unknown tokenizer file type; expected tokenizer.json, a SentencePiece .model, a Tekken .json or a "
        ".gguf file.")


def _load_hub(spec: str) -> Tokenizer:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover
        raise TokenizerLoadError(f"{spec}: not a local path and huggingface_hub is missing.") from e
    try:
        path = Path(hf_hub_download(spec, "tokenizer.json"))
    except Exception as e:  # noqa: BLE001
        raise TokenizerLoadError(
            f"{spec}: not a local file/folder, and the hub copy could not be fetched ({type(e).__name__}). "
            "Pass a local tokenizer folder/file, or download it first with network access.") from e
    try:
        hf_hub_download(spec, "tokenizer_config.json")
    except Exception:  # noqa: BLE001
        pass
    t = _load_hf_json(path, path.parent)
    t.name = spec
    return t
