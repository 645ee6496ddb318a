"""The uniform `Tokenizer`: encode/decode text through a backend library (`backends`), with the
canonical `TokenBytes` of every id and a content hash.

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

import hashlib
import os
import re
from typing import Sequence

import numpy as np

from .backends import HFBackend
from .token_bytes import TokenBytes, char_to_byte_offsets


class TokenizerLoadError(ValueError):
    """A tokenizer spec that nothing could load; the message names the path and the fix."""


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

    @property
    def backend(self):
        """The library-level backend (`tokens.backends`: HFBackend / SentencePieceBackend / TekkenBackend),
        for tools that need the tokenizer library itself (e.g. the reference aligner built on its own
        token offsets). Training code uses the Tokenizer's methods."""
        return self._backend

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
        if isinstance(self._backend, HFBackend):
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
        for is_sp, part in self.split_special(text):
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

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False, parse_special: bool = True,
                     num_threads: int | None = None) -> list[np.ndarray]:
        """`[encode(t, add_special_tokens=..., parse_special=...) for t in texts]`, through the backend
        library's batch encoder (tokenizers `encode_batch`, sentencepiece `encode(list, num_threads)`,
        tiktoken `encode_ordinary_batch`). num_threads: threads of the SentencePiece / Tekken encoders
        (default min(cores, 8)); the Hugging Face library uses its own thread pool."""
        texts = list(texts)
        if not texts:
            return []
        nt = num_threads or max(1, min(os.cpu_count() or 1, 8))
        encoded = self._backend.encode_batch(texts, add_special_tokens, parse_special, self, nt)
        return [np.asarray(ids, dtype=np.int64) for ids in encoded]

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

    def split_special(self, text: str):
        """Yield (is_special, piece) parts of text, the strings of `special_tokens` split out (empty
        parts skipped). The SentencePiece and Tekken backends encode the other parts as plain text."""
        if self._special_re is None:
            yield False, text
            return
        for part in self._special_re.split(text):
            if not part:
                continue
            yield (part in self.special_tokens), part



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

