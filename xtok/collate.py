"""`CrossTokenizerCollator`: dataset rows -> ready training tensors, inside DataLoader workers.

Per batch the collator tokenises every row with the student tokenizer (plain text, or chat
messages rendered with a template, assistant-only labels), and for every teacher:

1. fetches the teacher's stored example (`xtok extract` output) by the row's example key;
2. aligns the teacher's stored token ids with the student's ids (`xtok.align`: chunks of equal bytes);
3. for every aligned chunk `(t_start, t_end, s_start, s_end)` with `t_start >= 1`, `s_start >= 1`,
   the student token `s_start` trained (label != -100) and the teacher output position `t_start - 1`
   stored: projects the teacher's stored top-k (plus sampled tail ids, each of weight
   `tail_mass / m`, when the store has them) through W into a sparse student distribution, the target
   of student output position `s_start - 1`; `tail_mass` = teacher mass the target does not hold;
4. sums the teacher's `target_logprob` over each chunk's teacher tokens (positions `t_start-1 ..
   t_end-2`) -> `chunk_teacher_logprob`, with the chunk's student span `(s_start, s_end)`; a chunk
   whose teacher positions are not all stored, or whose student tokens are not all trained, is dropped.

Teachers lacking an example, or whose stored text does not match the student's (alignment chunks
cover less than `min_coverage` of the student's trained text tokens within the aligned range),
get `present = False` and all-masked targets, and a counter in `batch["stats"]`; never an exception.

Output layout: see docs/architecture.md "collate -> losses" and docs/collator.md.

Worker safety: `TeacherSpec` and the collator pickle as paths + small config; stores, projections
and tokenizers are opened lazily in each process; Numba kernels are compiled once per process
(`cache=True`, so workers load them from the on-disk cache); torch/numba are imported lazily.
All per-example work is vectorised numpy or a Numba kernel; Python loops run over the batch
and the teachers only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .tokens import Tokenizer, load_tokenizer

__all__ = ["TeacherSpec", "CrossTokenizerCollator", "TeacherTargets", "StudentExample", "example_key"]

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------
# Numba kernels (compiled lazily, once per process, cached on disk)
# ------------------------------------------------------------------------------------------


def _project_rows_py(indptr, cols, vals, n_student, max_row_nnz, rows, topk_ids, topk_p, tail_ids, tail_w):
    """Project stored teacher rows through a CSR matrix W [V_t, V_s], fused with the gather.

    For each i, store row r = rows[i]: teacher ids topk_ids[r] with probs topk_p[r], and
    tail_ids[r] with prob tail_w[r] each (tail_ids may have 0 columns); ids < 0 are padding. Each
    teacher id's W row is scaled by its prob and duplicate student ids are merged. Returns a flat
    CSR result (ids int32, probs float32, offsets int64 [n+1]) and the per-row tail
    `max(0, 1 - sum of the row's probs)` (float32 [n]); within a row the student ids are unique,
    in order of first appearance (deterministic)."""
    n = rows.shape[0]
    k = topk_ids.shape[1]
    m = tail_ids.shape[1]
    ub = n * (k + m) * max_row_nnz
    if ub > (1 << 24):  # large rows: count exactly instead of allocating the bound
        ub = 0
        for i in range(n):
            r = rows[i]
            for j in range(k):
                t = topk_ids[r, j]
                if t >= 0:
                    ub += indptr[t + 1] - indptr[t]
            for j in range(m):
                t = tail_ids[r, j]
                if t >= 0:
                    ub += indptr[t + 1] - indptr[t]
    out_ids = np.empty(ub, np.int32)
    out_p = np.empty(ub, np.float32)
    offsets = np.empty(n + 1, np.int64)
    tail = np.empty(n, np.float32)
    slot = np.full(n_student, -1, np.int32)  # student id -> index in the current row
    pos = 0
    for i in range(n):
        r = rows[i]
        base = pos
        offsets[i] = base
        for j in range(k + m):
            if j < k:
                t = topk_ids[r, j]
                p = topk_p[r, j]
            else:
                t = tail_ids[r, j - k]
                p = tail_w[r]
            if t < 0 or not p > 0:
                continue
            for z in range(indptr[t], indptr[t + 1]):
                c = cols[z]
                s = slot[c]
                if s < 0:
                    slot[c] = pos - base
                    out_ids[pos] = c
                    out_p[pos] = p * vals[z]
                    pos += 1
                else:
                    out_p[base + s] += p * vals[z]
        tot = 0.0
        for j in range(base, pos):  # row mass; reset the scratch for the next row
            tot += out_p[j]
            slot[out_ids[j]] = -1
        tail[i] = max(0.0, 1.0 - tot)
    offsets[n] = pos
    return out_ids[:pos], out_p[:pos], offsets, tail


def _project_rows_onehot_py(col_of, val_of, n_student, rows, topk_ids, topk_p, tail_ids, tail_w):
    """`_project_rows` for a W with at most one entry per row (first-token projections):
    col_of[t] / val_of[t] = the student id / weight of teacher id t's entry (-1: empty row)."""
    n = rows.shape[0]
    k = topk_ids.shape[1]
    m = tail_ids.shape[1]
    out_ids = np.empty(n * (k + m), np.int32)
    out_p = np.empty(n * (k + m), np.float32)
    offsets = np.empty(n + 1, np.int64)
    tail = np.empty(n, np.float32)
    slot = np.full(n_student, -1, np.int32)
    pos = 0
    for i in range(n):
        r = rows[i]
        base = pos
        offsets[i] = base
        for j in range(k + m):
            if j < k:
                t = topk_ids[r, j]
                p = topk_p[r, j]
            else:
                t = tail_ids[r, j - k]
                p = tail_w[r]
            if t < 0 or not p > 0:
                continue
            c = col_of[t]
            if c < 0:
                continue
            p = p * val_of[t]
            s = slot[c]
            if s < 0:
                slot[c] = pos - base
                out_ids[pos] = c
                out_p[pos] = p
                pos += 1
            else:
                out_p[base + s] += p
        tot = 0.0
        for j in range(base, pos):
            tot += out_p[j]
            slot[out_ids[j]] = -1
        tail[i] = max(0.0, 1.0 - tot)
    offsets[n] = pos
    return out_ids[:pos], out_p[:pos], offsets, tail


def _fill_rows_py(flat_ids, flat_p, offsets, out_ids, out_p):
    """Scatter a flat CSR result into padded [n, K] arrays (already zeroed)."""
    for i in range(offsets.shape[0] - 1):
        a = offsets[i]
        for j in range(offsets[i + 1] - a):
            out_ids[i, j] = flat_ids[a + j]
            out_p[i, j] = flat_p[a + j]


_KERNELS: dict[str, Any] = {}


def _kernel(name: str):
    """The Numba-compiled kernel `name` (compiled once per process; on-disk cache)."""
    fn = _KERNELS.get(name)
    if fn is None:
        import numba

        fn = numba.njit(cache=True, nogil=True)(globals()[name + "_py"])
        _KERNELS[name] = fn
    return fn


# ------------------------------------------------------------------------------------------
# Rows -> student tokens
# ------------------------------------------------------------------------------------------


def example_key(row: Mapping, key_column: str | None = None) -> str:
    """The key linking a dataset row to teacher-store examples: `xtok.store.example_key`, the rule
    `xtok extract` used (the key column / `id` / `key`, else a content hash)."""
    global _STORE_KEY
    if _STORE_KEY is None:
        from .store import example_key as _k

        _STORE_KEY = _k
    return _STORE_KEY(row, key_column)


_STORE_KEY = None


@dataclass
class StudentExample:
    key: str
    input_ids: np.ndarray   # int64 [S]
    labels: np.ndarray      # int64 [S], IGNORE_INDEX where no loss
    truncated: bool = False


# ------------------------------------------------------------------------------------------
# Teachers
# ------------------------------------------------------------------------------------------


@dataclass
class TeacherSpec:
    """One teacher: its tokenizer, its store (`xtok extract` output) and the projection W
    (`xtok build-projection` output) from its vocabulary into the student's.

    tokenizer/store/projection may be paths/specs (opened lazily in each worker; preferred) or
    already-loaded objects. `weight` is not used by the collator (the loss aggregator owns the
    weights; keep them here to configure both from one list). `min_coverage`: an example whose
    alignment covers less than this fraction of the student's trained text tokens (within the
    aligned range) is treated as a text mismatch (present = False). `check_hashes`: verify the
    store's and W's tokenizer hashes against the tokenizers.
    """

    name: str
    tokenizer: Any
    store: Any
    projection: Any
    weight: float = 1.0
    min_coverage: float = 0.5
    check_hashes: bool = True
    _tok: Any = field(default=None, init=False, repr=False, compare=False)
    _store: Any = field(default=None, init=False, repr=False, compare=False)
    _proj: Any = field(default=None, init=False, repr=False, compare=False)

    # -- pickling: paths travel, opened handles do not -----------------------------------------
    def __getstate__(self):
        d = dict(self.__dict__)
        if not _is_loaded(self.store):
            d["_store"] = None
        if not _is_loaded(self.projection):
            d["_proj"] = None
        if not isinstance(self.tokenizer, Tokenizer):
            d["_tok"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)

    # -- lazy handles ------------------------------------------------------------------------
    @property
    def tok(self) -> Tokenizer:
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer)
        return self._tok

    @property
    def teacher_store(self):
        if self._store is None:
            if _is_loaded(self.store):
                self._store = self.store
            else:
                from .store import TeacherStore

                self._store = TeacherStore(self.store)
            if self.check_hashes:
                self._check_store_hash(self._store)
        return self._store

    def projector(self, student: Tokenizer) -> "_Projector":
        """The (lazily loaded) projection W, wrapped for the collator."""
        if self._proj is None:
            proj = self.projection
            if not _is_loaded(proj):
                from .projection import ProjectionMatrix

                proj = ProjectionMatrix.load(proj, device="cpu", teacher=self.tok, student=student,
                                             check_hashes=self.check_hashes)
            elif self.check_hashes and hasattr(proj, "check_tokenizers"):
                proj.check_tokenizers(self.tok, student)
            self._proj = _Projector(proj)
        return self._proj

    def _check_store_hash(self, store) -> None:
        man = getattr(store, "manifest", None) or {}
        h = man.get("tokenizer_hash") if isinstance(man, Mapping) else None
        if h and h != self.tok.content_hash:
            raise ValueError(
                f"teacher {self.name!r}: store {self.store!s:.200} was extracted with tokenizer hash {h[:12]}…, "
                f"but the teacher tokenizer {self.tok.name!r} has hash {self.tok.content_hash[:12]}…. "
                "Pass the tokenizer the store was extracted with.")

    def lookup(self, key: str):
        """The stored example for `key`, or None when the store lacks it."""
        store = self.teacher_store
        try:
            return store[key]
        except (KeyError, IndexError):
            return None


def _is_loaded(x) -> bool:
    return not isinstance(x, (str, os.PathLike))


def _csr_of(proj):
    """(indptr int64, cols int32, vals float32, n_student) of W when the projection exposes its CSR
    arrays (`xtok.projection.ProjectionMatrix` does), else None (then `proj.project` is used)."""
    if all(hasattr(proj, a) for a in ("indptr", "indices", "data", "shape")):
        return (np.ascontiguousarray(proj.indptr, dtype=np.int64), np.ascontiguousarray(proj.indices, dtype=np.int32),
                np.ascontiguousarray(proj.data, dtype=np.float32), int(proj.shape[1]))
    return None


# ------------------------------------------------------------------------------------------
# Projection of stored rows
# ------------------------------------------------------------------------------------------


class _Projector:
    """Projects rows of a stored example into student space -> flat CSR (ids, probs, offsets).

    With W's CSR arrays (ProjectionMatrix) a fused Numba kernel does gather + exp + tail samples
    + projection + merge; any other projection object is used through its `project()`."""

    def __init__(self, proj):
        self.proj = proj
        self.csr = _csr_of(proj)
        self.onehot = None
        self.max_row_nnz = 1
        if self.csr is not None:
            indptr, cols, vals, _ = self.csr
            nnz = np.diff(indptr)
            self.max_row_nnz = int(nnz.max()) if nnz.size else 1
            if self.max_row_nnz <= 1:  # first-token W: one gather per teacher id
                has = nnz > 0
                col_of = np.full(nnz.shape[0], -1, np.int32)
                val_of = np.zeros(nnz.shape[0], np.float32)
                col_of[has] = cols[indptr[:-1][has]]
                val_of[has] = vals[indptr[:-1][has]]
                self.onehot = (col_of, val_of)

    def __call__(self, ex, rows: np.ndarray):
        topk_ids = np.asarray(ex.topk_ids)
        topk_lp = np.asarray(ex.topk_logprobs)
        tail_ids = getattr(ex, "tail_ids", None)
        tail_ids = None if tail_ids is None or np.asarray(tail_ids).size == 0 else np.asarray(tail_ids)
        if self.csr is not None:
            indptr, cols, vals, n_s = self.csr
            if rows.shape[0] * 2 < topk_lp.shape[0]:  # few rows used: gather first
                topk_ids, topk_lp = topk_ids[rows], topk_lp[rows]
                tw = _tail_weight(ex, tail_ids, rows)
                tail_ids = tail_ids[rows] if tail_ids is not None else None
                rows = np.arange(rows.shape[0], dtype=np.int64)
            else:
                tw = _tail_weight(ex, tail_ids, None)
            topk_p = np.exp(topk_lp, dtype=np.float32)  # numpy's SIMD exp
            if tail_ids is None:
                tail_ids, tw = np.zeros((1, 0), np.int32), np.zeros(1, np.float32)
            rows = np.ascontiguousarray(rows, dtype=np.int64)
            topk_ids, tail_ids = np.ascontiguousarray(topk_ids), np.ascontiguousarray(tail_ids)
            tw = np.ascontiguousarray(tw, dtype=np.float32)
            if self.onehot is not None:
                return _kernel("_project_rows_onehot")(self.onehot[0], self.onehot[1], n_s, rows, topk_ids, topk_p,
                                                       tail_ids, tw)
            return _kernel("_project_rows")(indptr, cols, vals, n_s, self.max_row_nnz, rows, topk_ids, topk_p,
                                            tail_ids, tw)
        ids = topk_ids[rows].astype(np.int64)
        probs = np.exp(topk_lp[rows], dtype=np.float32)
        if tail_ids is not None:
            tw = _tail_weight(ex, tail_ids, rows)
            ids = np.concatenate([ids, tail_ids[rows].astype(np.int64)], axis=1)
            probs = np.concatenate([probs, np.repeat(tw[:, None], tail_ids.shape[1], axis=1)], axis=1)
        o, p = self.proj.project(ids, probs)
        o, p = np.asarray(_to_numpy(o)), np.asarray(_to_numpy(p), dtype=np.float32)
        keep = (o >= 0) & (p > 0)
        offsets = np.zeros(o.shape[0] + 1, np.int64)
        np.cumsum(keep.sum(axis=1), out=offsets[1:])
        tail = np.clip(1.0 - np.where(keep, p, 0).sum(axis=1, dtype=np.float64), 0.0, 1.0).astype(np.float32)
        return o[keep].astype(np.int32), p[keep], offsets, tail


def _tail_weight(ex, tail_ids, rows):
    """Per-row weight of each sampled tail id: tail_mass / m (float32)."""
    if tail_ids is None:
        return None
    tm = np.asarray(ex.tail_mass, dtype=np.float32)
    if rows is not None:
        tm = tm[rows]
    return tm / np.float32(tail_ids.shape[1])


# ------------------------------------------------------------------------------------------
# Per-example targets
# ------------------------------------------------------------------------------------------


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

    @property
    def width(self) -> int:
        return int(np.diff(self.offsets).max()) if self.offsets.shape[0] > 1 else 0

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n, K] int64, probs [n, K] float32), padded with 0 (for inspection and tests)."""
        n, K = self.positions.shape[0], self.width
        ids, pr = np.zeros((n, K), np.int64), np.zeros((n, K), np.float32)
        if n and K:
            _kernel("_fill_rows")(self.flat_ids, self.flat_probs, self.offsets, ids, pr)
        return ids, pr


def _empty_targets(present: bool, counts: dict) -> TeacherTargets:
    return TeacherTargets(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32),
                          np.zeros(1, np.int64), np.zeros(0, np.float32), np.zeros((0, 2), np.int64),
                          np.zeros(0, np.float32), present, counts)


def _align_chunks(teacher: Tokenizer, student: Tokenizer, t_ids: np.ndarray, s_ids: np.ndarray) -> tuple[np.ndarray, str]:
    """Alignment chunks int64 [n, 4] and the path taken ('exact' | 'dp'), via the bulk entry point.

    Each side is first cut to the other side's byte length (+ 1/8 + 256 bytes of slack): text one side
    lacks cannot align, and stores extracted at a longer max_length than the student's then cost an
    exact merge instead of a DP over the whole cut-off tail. Chunk indices refer to the uncut ids."""
    from .align import align_arrays

    tb, sb = teacher.token_bytes, student.token_bytes
    t_end, s_end = np.cumsum(tb.lengths[t_ids]), np.cumsum(sb.lengths[s_ids])
    nt, ns = (int(t_end[-1]) if t_end.size else 0), (int(s_end[-1]) if s_end.size else 0)
    t_ids = t_ids[: int(np.searchsorted(t_end, ns + ns // 8 + 256, side="right"))]
    s_ids = s_ids[: int(np.searchsorted(s_end, nt + nt // 8 + 256, side="right"))]
    chunks, _tg, _sg, info = align_arrays(tb.data, tb.offsets, tb.is_special, sb.data, sb.offsets, sb.is_special,
                                          t_ids, s_ids)
    return np.asarray(chunks, dtype=np.int64).reshape(-1, 4), str(info[0])


def build_targets(chunks: np.ndarray, ex, label_ok: np.ndarray, project, student_special: np.ndarray,
                  min_coverage: float = 0.5) -> TeacherTargets:
    """Targets of one teacher for one student example.

    chunks int [n, 4] (t_start, t_end, s_start, s_end) aligning `ex.input_ids` with the student
    ids; `ex` a stored example; `label_ok` bool [S] (student token trained); `project(ex, rows)` ->
    flat CSR (ids, probs, offsets) of the projected stored rows; `student_special` bool [S]
    (student tokens without bytes, left out of the coverage test)."""
    S = label_ok.shape[0]
    counts = {"targets": 0, "missing_positions": 0, "uncovered_tokens": 0, "chunks": 0, "chunks_masked": 0,
              "mismatch": 0}
    T = int(np.asarray(ex.input_ids).shape[0])
    ch = np.asarray(chunks, dtype=np.int64).reshape(-1, 4)
    ts, te, ss, se = ch[:, 0], ch[:, 1], ch[:, 2], ch[:, 3]

    # -- text match: trained student text tokens inside chunks, within the aligned range --------
    text_lab = label_ok & ~student_special
    ctl = np.zeros(S + 1, np.int64)
    np.cumsum(text_lab, out=ctl[1:])
    if ch.shape[0]:  # chunks are disjoint and ordered: covered = sum over chunks
        num = int((ctl[se] - ctl[ss]).sum())
        denom = int(ctl[int(se.max())])
        counts["uncovered_tokens"] = int(ctl[S]) - num
        mismatch = denom > 0 and num < min_coverage * denom
    else:
        counts["uncovered_tokens"] = int(ctl[S])
        mismatch = counts["uncovered_tokens"] > 0
    if mismatch:
        counts["mismatch"] = 1
        return _empty_targets(False, counts)

    positions = np.asarray(ex.positions, dtype=np.int64)
    # row of every teacher output position in the store (-1: not stored)
    row_of = np.full(T + 1, -1, np.int64)
    inr = (positions >= 0) & (positions < T)
    row_of[positions[inr]] = np.nonzero(inr)[0]

    # -- KL targets at chunk starts ---------------------------------------------------------
    sel = (ts >= 1) & (ss >= 1) & (te <= T)
    sel[sel] = label_ok[ss[sel]]
    rows = row_of[ts[sel] - 1]
    sp = ss[sel] - 1
    have = rows >= 0
    counts["missing_positions"] = int((~have).sum())
    rows, sp = rows[have], sp[have]
    counts["targets"] = int(rows.shape[0])
    if rows.shape[0]:
        flat_ids, flat_p, offsets, tail = project(ex, rows)
    else:
        flat_ids, flat_p, offsets = np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(1, np.int64)
        tail = np.zeros(0, np.float32)

    # -- chunk log-likelihoods: teacher positions t_start-1 .. t_end-2 all stored ------------------
    lp = np.zeros(T + 1, np.float64)
    st = np.zeros(T + 1, np.int64)
    lp[positions[inr]] = np.asarray(ex.target_logprob, dtype=np.float64)[inr]
    st[positions[inr]] = 1
    clp = np.zeros(T + 2, np.float64)
    np.cumsum(lp, out=clp[1:])
    cst = np.zeros(T + 2, np.int64)
    np.cumsum(st, out=cst[1:])
    cl = np.zeros(S + 1, np.int64)
    np.cumsum(label_ok, out=cl[1:])
    csel = (ts >= 1) & (ss >= 1) & (te <= T) & (se <= S) & (te > ts) & (se > ss)
    a, b = np.where(csel, ts - 1, 0), np.where(csel, te - 1, 0)  # teacher positions [a, b)
    csel &= (cst[b] - cst[a]) == (b - a)                      # every teacher position stored
    s0, s1 = np.where(csel, ss, 0), np.where(csel, se, 0)
    csel &= (cl[s1] - cl[s0]) == (s1 - s0)                      # every student token trained
    counts["chunks"] = int(csel.sum())
    counts["chunks_masked"] = int(ch.shape[0] - csel.sum())
    spans = np.stack([ss[csel], se[csel]], axis=1)
    chunk_lp = (clp[b[csel]] - clp[a[csel]]).astype(np.float32)
    return TeacherTargets(sp, flat_ids, flat_p, offsets, tail, spans, chunk_lp, True, counts)


# ------------------------------------------------------------------------------------------
# The collator
# ------------------------------------------------------------------------------------------


_TEACHER_COUNTERS = ("examples", "present", "missing", "mismatch", "targets", "missing_positions",
                     "uncovered_tokens", "chunks", "chunks_masked", "dp_aligned")


class CrossTokenizerCollator:
    """`collate_fn` for a DataLoader over rows `{"text": str}` or `{"messages": [...]}` (plus the
    example key column; see `example_key`).

    Returns `input_ids [B,T] long, attention_mask [B,T] long, labels [B,T] long (-100 = no loss),
    teachers: {name: {positions, mask, target_ids, target_probs, tail_mass, chunk_spans,
    chunk_teacher_logprob, chunk_mask, present}}, stats: {..., name: counters}` (docs/collator.md).

    student_tokenizer: spec or Tokenizer. max_length: student tokens kept (right truncation).
    chat_template: template for chat rows (default: the student tokenizer's own / a built-in one).
    add_special_tokens: for text rows, whether the student encoding adds BOS (as its model expects).
    pad_to_multiple_of: round T up. validate: open stores / projections now (hash checks) and fail
    early; handles are dropped again when the collator is pickled into workers.
    """

    def __init__(self, student_tokenizer, teachers: Sequence[TeacherSpec] = (), *, max_length: int = 2048,
                 chat_template: str | None = None, add_special_tokens: bool = True,
                 text_column: str = "text", messages_column: str = "messages", key_column: str | None = None,
                 pad_to_multiple_of: int | None = None, validate: bool = True):
        self.student_spec = student_tokenizer
        self._student = student_tokenizer if isinstance(student_tokenizer, Tokenizer) else None
        self.teachers = list(teachers)
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        if "stats" in names or any(not isinstance(n, str) or not n for n in names):
            raise ValueError(f"teacher names must be non-empty strings other than 'stats', got {names}")
        self.max_length = int(max_length)
        self.chat_template = chat_template
        self.add_special_tokens = add_special_tokens
        self.text_column, self.messages_column, self.key_column = text_column, messages_column, key_column
        self.pad_to_multiple_of = pad_to_multiple_of
        if validate:
            for t in self.teachers:
                t.teacher_store  # noqa: B018  (opens it: hash check)
                t.projector(self.student)

    def __getstate__(self):
        d = dict(self.__dict__)
        if not isinstance(self.student_spec, Tokenizer):
            d["_student"] = None
        return d

    @property
    def student(self) -> Tokenizer:
        if self._student is None:
            self._student = load_tokenizer(self.student_spec)
        return self._student

    @property
    def pad_id(self) -> int:
        s = self.student
        for i in (s.pad_id, s.eos_id):
            if i is not None:
                return int(i)
        return 0

    # -- student side ------------------------------------------------------------------------
    def _key_row(self, row: Mapping) -> Mapping:
        """The fields the key rule reads, under the names `xtok extract` gives them."""
        if self.key_column is not None or any(row.get(c) is not None for c in ("id", "key")):
            return row
        if row.get(self.messages_column) is not None:
            return {"messages": row[self.messages_column]}
        if row.get(self.text_column) is not None:
            return {"text": row[self.text_column]}
        return {c: row[c] for c in ("user", "assistant") if c in row}

    def tokenize(self, row) -> StudentExample:
        """Student ids + labels of one row (text: every token; chat: assistant tokens)."""
        if isinstance(row, str):
            row = {self.text_column: row}
        key = example_key(self._key_row(row), self.key_column)
        msgs = row.get(self.messages_column)
        if msgs is None and row.get(self.text_column) is None and "user" in row and "assistant" in row:
            msgs = [{"role": "user", "content": row["user"]}, {"role": "assistant", "content": row["assistant"]}]
        if msgs is not None:
            from .chat import render_chat

            msgs = [{k: v for k, v in m.items() if v is not None} for m in msgs]
            r = render_chat(self.student, msgs, template=self.chat_template)
            ids = np.asarray(r.ids, dtype=np.int64)
            labels = np.where(r.assistant_mask, ids, IGNORE_INDEX)
        else:
            text = row.get(self.text_column)
            if not isinstance(text, str):
                raise ValueError(f"row has no {self.text_column!r} string, {self.messages_column!r} list or "
                                 f"'user'+'assistant' columns: keys {sorted(row)!r}")
            ids = self.student.encode(text, add_special_tokens=self.add_special_tokens)
            labels = ids.copy()
        trunc = ids.shape[0] > self.max_length
        if trunc:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return StudentExample(key, ids, labels, trunc)

    def targets(self, teacher: TeacherSpec, sx: StudentExample) -> TeacherTargets:
        """One teacher's targets for one student example (never raises for a missing/odd example)."""
        ex = teacher.lookup(sx.key)
        if ex is None:
            return _empty_targets(False, {"missing": 1})
        t_ids = np.asarray(ex.input_ids, dtype=np.int64)
        if t_ids.size and (t_ids.min() < 0 or t_ids.max() >= teacher.tok.vocab_size):
            return _empty_targets(False, {"mismatch": 1})  # not this tokenizer's ids
        chunks, path = _align_chunks(teacher.tok, self.student, t_ids, sx.input_ids)
        label_ok = sx.labels != IGNORE_INDEX
        special = self.student.token_bytes.is_special[sx.input_ids]
        tg = build_targets(chunks, ex, label_ok, teacher.projector(self.student), special, teacher.min_coverage)
        tg.counts["dp_aligned"] = int(path != "exact")
        return tg

    # -- batch -------------------------------------------------------------------------------
    def __call__(self, rows: Sequence) -> dict:
        import torch

        xs = [self.tokenize(r) for r in rows]
        B = len(xs)
        T = max([x.input_ids.shape[0] for x in xs] + [1])
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            T = (T + m - 1) // m * m
        input_ids = np.full((B, T), self.pad_id, np.int64)
        labels = np.full((B, T), IGNORE_INDEX, np.int64)
        attn = np.zeros((B, T), np.int64)
        for i, x in enumerate(xs):
            n = x.input_ids.shape[0]
            input_ids[i, :n] = x.input_ids
            labels[i, :n] = x.labels
            attn[i, :n] = 1
        out: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attn),
            "labels": torch.from_numpy(labels),
            "teachers": {},
        }
        stats: dict[str, Any] = {"examples": B, "tokens": int(attn.sum()),
                                 "label_tokens": int((labels != IGNORE_INDEX).sum()),
                                 "truncated": int(sum(x.truncated for x in xs))}
        for t in self.teachers:
            per = [self.targets(t, x) for x in xs]
            ts = dict.fromkeys(_TEACHER_COUNTERS, 0)
            ts["examples"] = B
            for tg in per:
                for k, v in tg.counts.items():
                    ts[k] = ts.get(k, 0) + int(v)
                ts["present"] += int(tg.present)
            out["teachers"][t.name] = _pad_teacher(per, torch)
            stats[t.name] = ts
        out["stats"] = stats
        return out


def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _pad_teacher(per: list[TeacherTargets], torch) -> dict:
    B = len(per)
    P = max([t.positions.shape[0] for t in per] + [1])
    K = max([t.width for t in per] + [1])
    C = max([t.chunk_spans.shape[0] for t in per] + [1])
    pos = np.zeros((B, P), np.int64)
    mask = np.zeros((B, P), bool)
    tid = np.zeros((B, P, K), np.int64)
    tpr = np.zeros((B, P, K), np.float32)
    tail = np.zeros((B, P), np.float32)
    spans = np.zeros((B, C, 2), np.int64)
    clp = np.zeros((B, C), np.float32)
    cmask = np.zeros((B, C), bool)
    present = np.zeros(B, bool)
    fill = _kernel("_fill_rows")
    for i, t in enumerate(per):
        n, c = t.positions.shape[0], t.chunk_spans.shape[0]
        present[i] = t.present
        if n:
            pos[i, :n] = t.positions
            mask[i, :n] = True
            fill(t.flat_ids, t.flat_probs, t.offsets, tid[i], tpr[i])
            tail[i, :n] = t.tail_mass
        if c:
            spans[i, :c] = t.chunk_spans
            clp[i, :c] = t.chunk_logprob
            cmask[i, :c] = True
    f = torch.from_numpy
    return {"positions": f(pos), "mask": f(mask), "target_ids": f(tid), "target_probs": f(tpr), "tail_mass": f(tail),
            "chunk_spans": f(spans), "chunk_teacher_logprob": f(clp), "chunk_mask": f(cmask), "present": f(present)}
