"""Canonical token bytes: `TokenBytes` (token id -> the raw bytes the token stands for, special and
word-start flags, as flat numba-friendly arrays), the GPT-2 byte <-> unicode map of byte-level BPE
vocabularies, SentencePiece byte pieces (`<0xNN>`) and char -> byte offsets of a text."""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np


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
def unicode_to_byte() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


# A SentencePiece byte-fallback piece: `<0xNN>` stands for the raw byte NN.
BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


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


def char_to_byte_offsets(text: str) -> np.ndarray:
    """int64 [len(text) + 1]: the byte offset in `text.encode('utf-8')` of every char boundary
    (the last entry is the byte length). A lone surrogate raises UnicodeEncodeError, as encode does."""
    text_b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    c2b = np.zeros(len(text) + 1, dtype=np.int64)
    if text:  # count the non-continuation bytes
        c2b[:-1] = np.nonzero((text_b & 0xC0) != 0x80)[0]
        c2b[-1] = len(text_b)
    return c2b

