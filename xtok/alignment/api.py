"""`align()`: teacher tokens to student tokens over (nearly) the same text, through their bytes.

1. Each side becomes a byte stream (special tokens contribute no bytes) with cumulative token offsets
   (`streams.token_offsets`).
2. A monotone byte matching: equal streams match byte for byte (exact path); otherwise the DP of
   `match.byte_match`.
3. Chunks (`streams.chunk_pass`): the finest groups of tokens whose bytes are all matched, on one
   diagonal, whose byte spans start and end together on both sides. Every other token is a gap.

`align_arrays` takes only numpy arrays (DataLoader workers align without Python objects).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np

from ..tokens import TokenBytes, Tokenizer
from .match import byte_match, cut_flags
from .streams import chunk_pass, gap_runs, gather, streams_equal

__all__ = ["Alignment", "align", "align_arrays", "chunks_from_match", "token_bytes_and_prefix"]

TokLike = Union[Tokenizer, TokenBytes]


@dataclass
class Alignment:
    """Chunks of equal bytes between teacher and student tokens, plus gaps.

    chunks:        int32 [n, 4] (t_start, t_end, s_start, s_end), end-exclusive, in order
    teacher_gaps:  int32 [g, 2] teacher token runs in no chunk
    student_gaps:  int32 [h, 2] student token runs in no chunk
    stats:         dict (token counts, chunk counts, 1:1 share, gap tokens, matched bytes, path)
    """

    chunks: np.ndarray
    teacher_gaps: np.ndarray
    student_gaps: np.ndarray
    stats: dict = field(default_factory=dict)

    @property
    def one_to_one(self) -> np.ndarray:
        """bool [n]: chunks of exactly one teacher and one student token."""
        c = self.chunks
        return ((c[:, 1] - c[:, 0]) == 1) & ((c[:, 3] - c[:, 2]) == 1)

    def to_json(self, teacher_ids, student_ids) -> dict:
        return {
            "teacher_ids": [int(x) for x in teacher_ids],
            "student_ids": [int(x) for x in student_ids],
            "chunks": self.chunks.tolist(),
            "teacher_gaps": self.teacher_gaps.tolist(),
            "student_gaps": self.student_gaps.tolist(),
        }


def chunks_from_match(tcum, scum, mt=None, ms=None, tskip=None, sskip=None):
    """Chunks + per-token in-chunk flags from cumulative byte offsets and a byte matching
    (None = identity: the streams are equal)."""
    identity = mt is None
    if identity:
        mt = ms = np.empty(0, np.int64)
    tskip = np.zeros(len(tcum) - 1, np.int64) if tskip is None else tskip
    sskip = np.zeros(len(scum) - 1, np.int64) if sskip is None else sskip
    return chunk_pass(tcum, tskip, scum, sskip, mt, ms, identity)


def _skips(cum, elig, match):
    """1 for eligible tokens whose leading (dummy-prefix) space the matching left unmatched."""
    skip = np.zeros(elig.shape[0], np.int64)
    k = np.flatnonzero(elig)
    if k.size:
        skip[k] = match[cum[k]] < 0
    return skip


def align_arrays(t_data, t_offsets, t_special, s_data, s_offsets, s_special, teacher_ids, student_ids,
                 t_prefix_space=False, s_prefix_space=False):
    """Bulk entry point on raw TokenBytes arrays (no Python objects; safe in DataLoader workers).

    t_prefix_space/s_prefix_space: the tokenizer's `prefix_space` (SentencePiece dummy prefix);
    such a leading space on the first token after the stream start or a special token is not
    required to match anything.
    Returns (chunks int32 [n,4], teacher_gaps int32 [g,2], student_gaps int32 [h,2], info) where
    info = (path 'exact'|'dp', matched_bytes, teacher_bytes, student_bytes).
    """
    tids = np.ascontiguousarray(teacher_ids, dtype=np.int64)
    sids = np.ascontiguousarray(student_ids, dtype=np.int64)
    for what, ids, offs in (("teacher", tids, t_offsets), ("student", sids, s_offsets)):
        if ids.ndim != 1:
            raise ValueError(f"align_arrays(): {what}_ids must be 1-D, got shape {ids.shape}.")
        if ids.size and (ids.min() < 0 or ids.max() >= offs.shape[0] - 1):
            raise ValueError(f"align_arrays(): {what}_ids has ids outside [0, {offs.shape[0] - 1}) "
                             f"(min {ids.min()}, max {ids.max()}); strip padding (-100/-1) first.")
    ta, tcum, telig = gather(t_data, t_offsets, t_special, tids, bool(t_prefix_space), False)
    sa, scum, selig = gather(s_data, s_offsets, s_special, sids, bool(s_prefix_space), False)
    z0, z1 = np.zeros(tids.shape[0], np.int64), np.zeros(sids.shape[0], np.int64)
    e = np.empty(0, np.int64)
    if streams_equal(ta, sa):
        chunks, t_in, s_in = chunk_pass(tcum, z0, scum, z1, e, e, True)
        return chunks, gap_runs(t_in), gap_runs(s_in), ("exact", int(ta.shape[0]), int(ta.shape[0]), int(sa.shape[0]))
    if telig.any() or selig.any():  # equal once dummy-prefix spaces are dropped?
        ta2, tcum2, _ = gather(t_data, t_offsets, t_special, tids, bool(t_prefix_space), True)
        sa2, scum2, _ = gather(s_data, s_offsets, s_special, sids, bool(s_prefix_space), True)
        if streams_equal(ta2, sa2):
            chunks, t_in, s_in = chunk_pass(tcum2, z0, scum2, z1, e, e, True)
            return chunks, gap_runs(t_in), gap_runs(s_in), ("exact", int(ta2.shape[0]), int(ta.shape[0]), int(sa.shape[0]))
    mt, ms = byte_match(ta, sa, a_flags=cut_flags(tcum, telig, t_special[tids]),
                        b_flags=cut_flags(scum, selig, s_special[sids]))
    tskip, sskip = _skips(tcum, telig, mt), _skips(scum, selig, ms)
    chunks, t_in, s_in = chunk_pass(tcum, tskip, scum, sskip, mt, ms, False)
    return chunks, gap_runs(t_in), gap_runs(s_in), ("dp", int((mt >= 0).sum()), int(ta.shape[0]), int(sa.shape[0]))


def token_bytes_and_prefix(x, what: str = "tokenizer") -> tuple[TokenBytes, bool]:
    """(TokenBytes, prefix_space) of a Tokenizer (its own) or a TokenBytes (no dummy prefix)."""
    if isinstance(x, Tokenizer):
        return x.token_bytes, bool(x.prefix_space)
    if isinstance(x, TokenBytes):
        return x, False
    raise TypeError(f"align(): {what} must be a xtok Tokenizer or TokenBytes, got {type(x).__name__}.")


def _check_ids(ids, tb: TokenBytes, what: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"align(): {what}_ids must be a 1-D sequence of token ids, got shape {arr.shape}.")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"align(): {what}_ids must be integers, got dtype {arr.dtype}.")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= tb.vocab_size):
        bad = int(arr[(arr < 0) | (arr >= tb.vocab_size)][0])
        raise ValueError(f"align(): {what}_ids contains id {bad}, outside the {what} vocabulary "
                         f"(size {tb.vocab_size}); padding ids (-100, -1) must be removed first.")
    return arr


def align(teacher: TokLike, student: TokLike, teacher_ids: Sequence[int] | np.ndarray,
          student_ids: Sequence[int] | np.ndarray) -> Alignment:
    """Align teacher tokens to student tokens over (nearly) the same text. See module doc."""
    tt, tps = token_bytes_and_prefix(teacher, "teacher")
    st, sps = token_bytes_and_prefix(student, "student")
    tids, sids = _check_ids(teacher_ids, tt, "teacher"), _check_ids(student_ids, st, "student")
    chunks, tg, sg, (path, matched, tbytes, sbytes) = align_arrays(
        tt.data, tt.offsets, tt.is_special, st.data, st.offsets, st.is_special, tids, sids, tps, sps)
    n1 = int((((chunks[:, 1] - chunks[:, 0]) == 1) & ((chunks[:, 3] - chunks[:, 2]) == 1)).sum())
    stats = {
        "path": path,
        "teacher_tokens": int(tids.size),
        "student_tokens": int(sids.size),
        "chunks": int(chunks.shape[0]),
        "one_to_one": n1,
        "one_to_one_share": n1 / chunks.shape[0] if chunks.shape[0] else 0.0,
        "teacher_gap_tokens": int((tg[:, 1] - tg[:, 0]).sum()),
        "student_gap_tokens": int((sg[:, 1] - sg[:, 0]).sum()),
        "teacher_bytes": tbytes,
        "student_bytes": sbytes,
        "matched_bytes": matched,
    }
    return Alignment(chunks=chunks, teacher_gaps=tg, student_gaps=sg, stats=stats)
