"""One teacher's training targets for one student example, and their batch layout.

Two steps, so that a live teacher can share the first one (it needs no logits):

1. `plan_targets(chunks, ...) -> TargetPlan`: from the alignment chunks, which student output
   positions get a KL target and from which teacher output position, and which chunks get a
   chunk-likelihood target (student span, teacher output positions). Rules (docs/collator.md):
   * chunks outside runs of >= `min_run_bytes` matched bytes are dropped (`run_filter`);
   * text match: kept chunks must cover >= `min_coverage` of the student's trained text tokens within
     the aligned range, else the example is a mismatch (present = False, no targets);
   * KL target for chunk (t_start, t_end, s_start, s_end) when t_start >= 1, s_start >= 1, the student
     token s_start is trained and the teacher output position t_start - 1 is available: the target of
     student output position s_start - 1;
   * chunk target when every teacher output position t_start-1 .. t_end-2 is available and every
     student token s_start .. s_end-1 is trained.
2. `stored_targets(plan, example, project) -> TeacherTargets`: the planned rows of a stored example
   projected into student ids (`project`: a `RowProjector`), and the chunk log-likelihoods summed from
   the stored `target_logprob`.

`pad_targets` lays a batch of TeacherTargets out as the collator's per-teacher tensors
(docs/architecture.md, "collate -> losses").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from ..alignment import MIN_RUN_BYTES, run_filter
from ..projection.kernels import fill_rows, grow_buffers, project_row_into, row_bound
from ..store.codec import decode_row_into

__all__ = ["TargetPlan", "TeacherTargets", "plan_targets", "stored_targets", "empty_targets", "pad_targets",
           "decode_project_rows", "TARGET_COUNTERS"]

# per-example counters of a teacher (summed per batch into batch["stats"][teacher])
TARGET_COUNTERS = ("targets", "missing_positions", "uncovered_tokens", "chunks", "chunks_masked", "mismatch",
                   "short_run_chunks")


@dataclass
class TargetPlan:
    """Which targets one teacher gives one student example (no teacher values yet)."""

    student_positions: np.ndarray   # int64 [n] student output positions with a KL target
    teacher_positions: np.ndarray   # int64 [n] the teacher output position giving each target
    chunk_spans: np.ndarray         # int64 [c, 2] student token spans [s_start, s_end)
    chunk_teacher: np.ndarray       # int64 [c, 2] teacher output positions [t_start - 1, t_end - 1)
    present: bool
    counts: dict


@dataclass
class TeacherTargets:
    """One teacher's targets for one student example (compact; padded at batch assembly)."""

    positions: np.ndarray        # int64 [n] student output positions
    flat_ids: np.ndarray         # int32 [nnz] projected student ids, rows back to back
    flat_probs: np.ndarray       # float32 [nnz]
    offsets: np.ndarray          # int64 [n + 1] row i = flat[offsets[i]:offsets[i+1]]
    tail_mass: np.ndarray        # float32 [n]
    chunk_spans: np.ndarray      # int64 [c, 2]
    chunk_logprob: np.ndarray    # float32 [c]
    present: bool
    counts: dict
    teacher_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64 [n]

    @property
    def width(self) -> int:
        return int(np.diff(self.offsets).max()) if self.offsets.shape[0] > 1 else 0

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n, K] int64, probs [n, K] float32), padded with 0 (for inspection and tests)."""
        n, K = self.positions.shape[0], self.width
        ids, pr = np.zeros((n, K), np.int64), np.zeros((n, K), np.float32)
        if n and K:
            fill_rows(self.flat_ids, self.flat_probs, self.offsets, ids, pr)
        return ids, pr


def empty_targets(present: bool, counts: dict) -> TeacherTargets:
    """No targets (a missing or mismatched example), with its counters."""
    return TeacherTargets(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32),
                          np.zeros(1, np.int64), np.zeros(0, np.float32), np.zeros((0, 2), np.int64),
                          np.zeros(0, np.float32), present, counts)


def _empty_plan(counts: dict) -> TargetPlan:
    e = np.zeros(0, np.int64)
    return TargetPlan(e, e, np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64), False, counts)


def _text_mismatch(chunks: np.ndarray, label_ok: np.ndarray, student_special: np.ndarray, min_coverage: float,
                   counts: dict) -> bool:
    """Whether the kept chunks cover too little of the student's trained text tokens (within the
    aligned range: up to the last chunk's end); sets counts['uncovered_tokens']."""
    text_trained = label_ok & ~student_special
    cum_text = np.zeros(label_ok.shape[0] + 1, np.int64)
    np.cumsum(text_trained, out=cum_text[1:])
    if not chunks.shape[0]:
        counts["uncovered_tokens"] = int(cum_text[-1])
        return counts["uncovered_tokens"] > 0
    s_start, s_end = chunks[:, 2], chunks[:, 3]
    covered = int((cum_text[s_end] - cum_text[s_start]).sum())  # chunks are disjoint and ordered
    in_range = int(cum_text[int(s_end.max())])
    counts["uncovered_tokens"] = int(cum_text[-1]) - covered
    return in_range > 0 and covered < min_coverage * in_range


def plan_targets(chunks: np.ndarray, teacher_len: int, available: np.ndarray, label_ok: np.ndarray,
                 student_special: np.ndarray, min_coverage: float = 0.5, t_cum: np.ndarray | None = None,
                 s_cum: np.ndarray | None = None, min_run_bytes: int = MIN_RUN_BYTES) -> TargetPlan:
    """The targets one teacher gives one student example (module doc, step 1).

    chunks int [n, 4] (t_start, t_end, s_start, s_end) aligning the teacher's `teacher_len` ids with
    the student's; available bool [teacher_len + 1]: teacher output positions that have values (a
    store's positions; every position < teacher_len - 1 for a live teacher); label_ok bool [S]
    (student token trained); student_special bool [S] (tokens without bytes, left out of the coverage
    test); t_cum/s_cum: byte offsets of both sides for the run filter (None: no filter)."""
    counts = dict.fromkeys(TARGET_COUNTERS, 0)
    S, T = label_ok.shape[0], int(teacher_len)
    chunks = np.asarray(chunks, dtype=np.int64).reshape(-1, 4)
    n_aligned = chunks.shape[0]
    if t_cum is not None and s_cum is not None:
        keep = run_filter(chunks, t_cum, s_cum, min_run_bytes)
        counts["short_run_chunks"] = int(n_aligned - keep.sum())
        chunks = chunks[keep]
    if _text_mismatch(chunks, label_ok, student_special, min_coverage, counts):
        counts["mismatch"] = 1
        return _empty_plan(counts)
    t_start, t_end, s_start, s_end = chunks[:, 0], chunks[:, 1], chunks[:, 2], chunks[:, 3]

    # KL targets at chunk starts
    sel = (t_start >= 1) & (s_start >= 1) & (t_end <= T)
    sel[sel] = label_ok[s_start[sel]]
    teacher_pos = t_start[sel] - 1
    student_pos = s_start[sel] - 1
    have = available[teacher_pos]
    counts["missing_positions"] = int((~have).sum())
    teacher_pos, student_pos = teacher_pos[have], student_pos[have]
    counts["targets"] = int(teacher_pos.shape[0])

    # chunk likelihoods: teacher output positions [t_start-1, t_end-1) all available, student tokens trained
    cum_avail = np.zeros(T + 2, np.int64)
    np.cumsum(available[: T + 1], out=cum_avail[1:])
    cum_trained = np.zeros(S + 1, np.int64)
    np.cumsum(label_ok, out=cum_trained[1:])
    ok = (t_start >= 1) & (s_start >= 1) & (t_end <= T) & (s_end <= S) & (t_end > t_start) & (s_end > s_start)
    first, stop = np.where(ok, t_start - 1, 0), np.where(ok, t_end - 1, 0)
    ok &= (cum_avail[stop] - cum_avail[first]) == (stop - first)
    s0, s1 = np.where(ok, s_start, 0), np.where(ok, s_end, 0)
    ok &= (cum_trained[s1] - cum_trained[s0]) == (s1 - s0)
    counts["chunks"] = int(ok.sum())
    counts["chunks_masked"] = int(n_aligned - ok.sum())
    return TargetPlan(student_pos, teacher_pos, np.stack([s_start[ok], s_end[ok]], axis=1),
                      np.stack([first[ok], stop[ok]], axis=1), True, counts)


def stored_targets(plan: TargetPlan, ex, project) -> TeacherTargets:
    """The plan's targets filled from a stored example `ex` (`PackedExample` or any object with
    positions / target_logprob / top-k fields): KL rows projected by `project(ex, rows)` -> flat CSR
    (ids, probs, offsets, tail); chunk log-likelihoods = sums of the stored target_logprob."""
    if not plan.present:
        return empty_targets(False, plan.counts)
    positions = np.asarray(ex.positions, dtype=np.int64)
    T = int(np.asarray(ex.input_ids).shape[0])
    inr = (positions >= 0) & (positions < T)
    row_of = np.full(T + 1, -1, np.int64)
    row_of[positions[inr]] = np.nonzero(inr)[0]
    rows = row_of[plan.teacher_positions]
    if rows.shape[0]:
        flat_ids, flat_p, offsets, tail = project(ex, rows)
    else:
        flat_ids, flat_p, offsets = np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(1, np.int64)
        tail = np.zeros(0, np.float32)
    logprob = np.zeros(T + 1, np.float64)
    logprob[positions[inr]] = np.asarray(ex.target_logprob, dtype=np.float64)[inr]
    cum_lp = np.zeros(T + 2, np.float64)
    np.cumsum(logprob, out=cum_lp[1:])
    first, stop = plan.chunk_teacher[:, 0], plan.chunk_teacher[:, 1]
    chunk_lp = (cum_lp[stop] - cum_lp[first]).astype(np.float32)
    return TeacherTargets(plan.student_positions, flat_ids, flat_p, offsets, tail, plan.chunk_spans, chunk_lp, True,
                          plan.counts, plan.teacher_positions)


@njit(cache=True, nogil=True)
def decode_project_rows(rows, src, w):
    """Store rows `rows` of a packed example (`src`: `store.codec.PackedRows`) decoded and projected
    through W (`w`: `projection.kernels.SparseW`) row by row: the codec's `decode_row_into` into a
    (k+m)-entry scratch that stays in L1, then the projection's `project_row_into`. Returns the flat CSR
    result (ids int32, probs float32, offsets int64 [n+1]) and the per-row tail float32 [n]."""
    n = rows.shape[0]
    width = src.k + src.m
    cap = max(16, n * width)
    out_ids = np.empty(cap, np.int32)
    out_p = np.empty(cap, np.float32)
    offsets = np.empty(n + 1, np.int64)
    tail = np.empty(n, np.float32)
    mark = np.full(w.n_student, -1, np.int64)
    codes = np.empty(max(src.k, 1), np.int64)
    row_ids = np.empty(width, np.int32)
    row_p = np.empty(width, np.float32)
    pos = 0
    for i in range(n):
        decode_row_into(src, rows[i], codes, row_ids, row_p)
        need = pos + row_bound(w, row_ids)
        if need > out_ids.shape[0]:
            out_ids, out_p = grow_buffers(out_ids, out_p, pos, need)
        offsets[i] = pos
        pos, tot = project_row_into(w, row_ids, row_p, False, i, mark, out_ids, out_p, pos)
        tail[i] = max(0.0, 1.0 - tot)
    offsets[n] = pos
    return out_ids[:pos], out_p[:pos], offsets, tail


def pad_targets(per: list[TeacherTargets], torch) -> dict:
    """A batch of one teacher's targets -> its tensors (positions, mask, target_ids int32, target_probs,
    tail_mass, chunk_spans, chunk_teacher_logprob, chunk_mask, present), zero padded."""
    B = len(per)
    P = max([t.positions.shape[0] for t in per] + [1])
    K = max([t.width for t in per] + [1])
    C = max([t.chunk_spans.shape[0] for t in per] + [1])
    positions = np.zeros((B, P), np.int64)
    mask = np.zeros((B, P), bool)
    target_ids = np.zeros((B, P, K), np.int32)  # int32: a third fewer bytes to pad and to send from the worker
    target_probs = np.zeros((B, P, K), np.float32)
    tail = np.zeros((B, P), np.float32)
    spans = np.zeros((B, C, 2), np.int64)
    chunk_lp = np.zeros((B, C), np.float32)
    chunk_mask = np.zeros((B, C), bool)
    present = np.zeros(B, bool)
    for i, t in enumerate(per):
        n, c = t.positions.shape[0], t.chunk_spans.shape[0]
        present[i] = t.present
        if n:
            positions[i, :n] = t.positions
            mask[i, :n] = True
            fill_rows(t.flat_ids, t.flat_probs, t.offsets, target_ids[i], target_probs[i])
            tail[i, :n] = t.tail_mass
        if c:
            spans[i, :c] = t.chunk_spans
            chunk_lp[i, :c] = t.chunk_logprob
            chunk_mask[i, :c] = True
    f = torch.from_numpy
    return {"positions": f(positions), "mask": f(mask), "target_ids": f(target_ids), "target_probs": f(target_probs),
            "tail_mass": f(tail), "chunk_spans": f(spans), "chunk_teacher_logprob": f(chunk_lp),
            "chunk_mask": f(chunk_mask), "present": f(present)}
