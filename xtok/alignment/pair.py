"""Aligning a student example with a stored teacher example, as the collator needs it.

`align_pair` is `align_arrays` plus what training data brings: either side may be truncated (then
one byte stream is a prefix of the other, and only the common prefix is aligned, by an exact merge
without a DP), and only text both sides have can align (the DP runs on each side cut to the other's
byte length plus slack). `run_filter` keeps only chunks inside long enough runs of equal text, so
an isolated common token that the DP found inside differing text is no training target.
`token_byte_offsets` is `streams.token_offsets` for a Tokenizer.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..tokens import Tokenizer
from .api import align_arrays
from .streams import common_prefix, token_offsets

__all__ = ["PairAlignment", "align_pair", "run_filter", "token_byte_offsets", "MIN_RUN_BYTES"]

MIN_RUN_BYTES = 16  # default minimum run of equal text (bytes) for a chunk to be a target


class PairAlignment(NamedTuple):
    """chunks int64 [n, 4] (t_start, t_end, s_start, s_end) over the uncut ids; path 'exact' | 'prefix'
    | 'dp'; teacher_cum int64 [T+1], student_cum int64 [S+1]: byte offsets (special tokens have no
    bytes, no dummy-prefix stripping)."""

    chunks: np.ndarray
    path: str
    teacher_cum: np.ndarray
    student_cum: np.ndarray


def token_byte_offsets(tok: Tokenizer, ids: np.ndarray, strip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(cum int64 [n+1], skip int64 [n]) of the token sequence `ids`: byte offsets (special tokens have
    no bytes) and 1 for a token whose leading dummy-prefix space is dropped (strip and a prefix_space
    tokenizer; see `streams.token_offsets`), 0 otherwise."""
    tb = tok.token_bytes
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    cum, elig = token_offsets(tb.data, tb.offsets, tb.is_special, ids, bool(tok.prefix_space), bool(strip))
    skip = elig.astype(np.int64) if strip else np.zeros(ids.shape[0], np.int64)
    return cum, skip


def _last_common(a: np.ndarray, b: np.ndarray, limit: int) -> int:
    """The largest value <= limit present in both sorted arrays (0 if none)."""
    a, b = a[: int(np.searchsorted(a, limit, side="right"))], b[: int(np.searchsorted(b, limit, side="right"))]
    if not a.size or not b.size:
        return 0
    idx = np.minimum(np.searchsorted(a, b), a.size - 1)
    hit = np.flatnonzero(a[idx] == b)
    return int(b[hit[-1]]) if hit.size else 0


def align_pair(teacher: Tokenizer, student: Tokenizer, t_ids: np.ndarray, s_ids: np.ndarray) -> PairAlignment:
    """Align a stored teacher example's ids with a student example's ids: `PairAlignment` (chunks int64
    [n, 4], the path taken 'exact' | 'prefix' | 'dp', and the byte offsets of both token sequences).

    When one byte stream is a prefix of the other (equal texts; truncation on either side), only the
    common prefix is aligned (an exact merge: chunks up to the last byte where both sides have a token
    boundary; the rest are gaps). Otherwise the aligner's DP runs, each side first cut to the other
    side's byte length (+ 1/8 + 256 bytes of slack): text one side lacks cannot align. Chunk indices
    refer to the uncut ids."""
    tb, sb = teacher.token_bytes, student.token_bytes
    tcum, _ = token_byte_offsets(teacher, t_ids, False)
    scum, _ = token_byte_offsets(student, s_ids, False)

    def run(t, s):
        ch, _tg, _sg, info = align_arrays(tb.data, tb.offsets, tb.is_special, sb.data, sb.offsets, sb.is_special,
                                          t, s, teacher.prefix_space, student.prefix_space)
        return np.asarray(ch, dtype=np.int64).reshape(-1, 4), str(info[0])

    modes = [False] + ([True] if teacher.prefix_space or student.prefix_space else [])
    for strip in modes:
        if strip:
            tc, tsk = token_byte_offsets(teacher, t_ids, True)
            sc, ssk = token_byte_offsets(student, s_ids, True)
        else:
            tc, sc = tcum, scum
            tsk, ssk = np.zeros(t_ids.shape[0], np.int64), np.zeros(s_ids.shape[0], np.int64)
        nt, ns = int(tc[-1]), int(sc[-1])
        L = common_prefix(tb.data, tb.offsets, t_ids, tc, tsk, sb.data, sb.offsets, s_ids, sc, ssk)
        if L < min(nt, ns):
            continue
        if nt == ns:  # equal streams
            ch, path = run(t_ids, s_ids)
            if path == "exact":
                return PairAlignment(ch, path, tcum, scum)
            continue
        b = _last_common(tc, sc, min(nt, ns))
        it = int(np.searchsorted(tc[1:], b, side="right"))
        js = int(np.searchsorted(sc[1:], b, side="right"))
        ch, path = run(t_ids[:it], s_ids[:js]) if it and js else (np.zeros((0, 4), np.int64), "exact")
        if path == "exact":
            return PairAlignment(ch, "prefix", tcum, scum)
    nt, ns = int(tcum[-1]), int(scum[-1])
    t_cut = t_ids[: int(np.searchsorted(tcum[1:], ns + ns // 8 + 256, side="right"))]
    s_cut = s_ids[: int(np.searchsorted(scum[1:], nt + nt // 8 + 256, side="right"))]
    ch, path = run(t_cut, s_cut)
    return PairAlignment(ch, path, tcum, scum)


def run_filter(chunks: np.ndarray, t_cum: np.ndarray, s_cum: np.ndarray, min_run_bytes: int = MIN_RUN_BYTES):
    """Which alignment chunks lie in a long enough run of equal text (bool [n]).

    chunks int [n, 4] (t_start, t_end, s_start, s_end), in order; t_cum/s_cum: byte offsets of the
    token sequences (special tokens have no bytes). A run is a maximal sequence of consecutive chunks
    with no byte between two of them on either side (only byte-less special tokens may sit between),
    so inside a run the teacher-minus-student byte offset is constant and the text from the run's start
    is byte-equal on both sides. A run is kept when its matched bytes (per chunk the smaller side's byte
    length) reach `min_run_bytes`, or when it starts at byte 0 on both sides (the whole preceding text
    is equal: empty)."""
    ch = np.asarray(chunks, dtype=np.int64).reshape(-1, 4)
    n = ch.shape[0]
    if n == 0 or min_run_bytes <= 0:
        return np.ones(n, bool)
    tb0, tb1, sb0, sb1 = t_cum[ch[:, 0]], t_cum[ch[:, 1]], s_cum[ch[:, 2]], s_cum[ch[:, 3]]
    brk = np.ones(n, bool)
    brk[1:] = (tb0[1:] != tb1[:-1]) | (sb0[1:] != sb1[:-1])
    starts = np.flatnonzero(brk)
    run_bytes = np.add.reduceat(np.minimum(tb1 - tb0, sb1 - sb0), starts)
    ok = (run_bytes >= min_run_bytes) | ((tb0[starts] == 0) & (sb0[starts] == 0))
    return ok[np.cumsum(brk) - 1]
