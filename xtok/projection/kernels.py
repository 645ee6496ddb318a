"""The CPU projection kernel: teacher rows (ids, probs) through W into student-space distributions.

One kernel family, used by `ProjectionMatrix.project` / `project_flat` and by the collator:

* `project_row_into(w, ids, probs, ...)`: one teacher row into a flat output buffer. Each teacher id's
  row of W is scaled by its prob; duplicate student ids are merged (probs summed) in order of first
  appearance (deterministic). W comes as a `SparseW`: CSR arrays, or, when every row of W has at most
  one entry (a first-token W), a dense [V_t, 2] (student id or -1, weight) table: one gather per id.
* `project_rows_flat(w, ids, probs, keep_zero, acc)`: every row -> flat CSR (ids, probs, offsets) and
  the per-row tail max(0, 1 - row mass); the accumulation dtype is `acc.dtype` (float32 or float64).
* `sort_pad_rows` (sorted by prob desc then id asc, padded to K: `project()`'s layout) and
  `fill_rows` (unsorted, zero padded: the collator's batch layout) turn the flat result into [n, K].

All are module-level `numba.njit(cache=True, nogil=True)`: compiled on first use, cached on disk.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

__all__ = ["SparseW", "sparse_w", "project_row_into", "row_bound", "grow_buffers", "project_rows_flat",
           "sort_pad_rows", "fill_rows"]

SparseW = namedtuple("SparseW", "onehot cv indptr cols vals n_teacher n_student")
SparseW.__doc__ = """W as the kernels read it. onehot: every row has <= 1 entry, read from cv float32
[V_t, 2] = (student id or -1, weight) (one cache line per teacher id); else the CSR arrays indptr int64
[V_t+1], cols int32 [nnz], vals float32 [nnz]. n_teacher, n_student: the shape of W."""


def sparse_w(indptr: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> SparseW:
    """The `SparseW` of CSR arrays (the one-hot table when every row has at most one entry and student
    ids fit float32 exactly)."""
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    cols = np.ascontiguousarray(cols, dtype=np.int32)
    vals = np.ascontiguousarray(vals, dtype=np.float32)
    n_t, n_s = int(shape[0]), int(shape[1])
    nnz = np.diff(indptr)
    if (nnz.max() if nnz.size else 0) <= 1 and n_s < (1 << 24):
        has = nnz > 0
        cv = np.zeros((nnz.shape[0], 2), np.float32)
        cv[:, 0] = -1
        cv[has, 0] = cols[indptr[:-1][has]]
        cv[has, 1] = vals[indptr[:-1][has]]
        return SparseW(True, cv, indptr, cols, vals, n_t, n_s)
    return SparseW(False, np.zeros((1, 2), np.float32), indptr, cols, vals, n_t, n_s)


@njit(cache=True, nogil=True, inline="always")
def _merge(c, q, row, base, pos, mark, out_ids, out_p):
    """Add weight q for student id c to the row being written at out_ids/out_p[base:pos]: onto c's
    entry when the row has one, else as a new entry at pos. Returns the new pos. mark int64 [V_s] =
    (row << 32) | index in the row of student id c, valid only when its high half is this row's
    number (no reset pass between rows)."""
    v = mark[c]
    if (v >> 32) == row:
        out_p[base + (v & 0xFFFFFFFF)] += q
        return pos
    mark[c] = (np.int64(row) << 32) | (pos - base)
    out_ids[pos] = c
    out_p[pos] = q
    return pos + 1


@njit(cache=True, nogil=True)
def project_row_into(w, ids, probs, keep_zero, row, mark, out_ids, out_p, pos):
    """Project one teacher row (ids int [k], < 0 = none; probs float [k]) into out_ids/out_p from
    index pos (capacity: `row_bound`). Entries with prob <= 0 (or nan) are skipped unless keep_zero.
    Returns (new pos, row mass). IndexError for a teacher id >= n_teacher."""
    base = pos
    tot = 0.0
    for j in range(ids.shape[0]):
        t = ids[j]
        p = probs[j]
        if t < 0 or not (p > 0 or (keep_zero and p == 0)):
            continue
        if t >= w.n_teacher:
            raise IndexError("teacher id out of range for W (more rows in the model's output than W has)")
        if w.onehot:
            c = np.int64(w.cv[t, 0])
            if c < 0:
                continue
            q = p * w.cv[t, 1]
            pos = _merge(c, q, row, base, pos, mark, out_ids, out_p)
            tot += q
        else:
            for z in range(w.indptr[t], w.indptr[t + 1]):
                q = p * w.vals[z]
                pos = _merge(w.cols[z], q, row, base, pos, mark, out_ids, out_p)
                tot += q
    return pos, tot


@njit(cache=True, nogil=True)
def row_bound(w, ids):
    """Upper bound on the projected entries of one teacher row."""
    if w.onehot:
        return ids.shape[0]
    ub = 0
    for j in range(ids.shape[0]):
        t = ids[j]
        if 0 <= t < w.n_teacher:
            ub += w.indptr[t + 1] - w.indptr[t]
    return ub


@njit(cache=True, nogil=True, inline="always")
def grow_buffers(out_ids, out_p, pos, need):
    """Larger copies of the output buffers (the first pos entries kept): capacity max(2 * old, need)."""
    cap = max(2 * out_ids.shape[0], need)
    a = np.empty(cap, out_ids.dtype)
    a[:pos] = out_ids[:pos]
    b = np.empty(cap, out_p.dtype)
    b[:pos] = out_p[:pos]
    return a, b


@njit(cache=True, nogil=True)
def project_rows_flat(w, ids, probs, keep_zero, acc):
    """Project teacher rows (ids int [n, k], probs float [n, k]) through W (`project_row_into`).

    Returns a flat CSR result: ids int32 [nnz], probs [nnz] of acc.dtype, offsets int64 [n+1], and the
    per-row tail `max(0, 1 - row mass)` (float32 [n])."""
    n = ids.shape[0]
    cap = max(16, n * ids.shape[1])  # grown when a row needs more
    out_ids = np.empty(cap, np.int32)
    out_p = np.empty(cap, acc.dtype)
    offsets = np.empty(n + 1, np.int64)
    tail = np.empty(n, np.float32)
    mark = np.full(w.n_student, -1, np.int64)
    pos = 0
    for i in range(n):
        need = pos + row_bound(w, ids[i])
        if need > out_ids.shape[0]:
            out_ids, out_p = grow_buffers(out_ids, out_p, pos, need)
        offsets[i] = pos
        pos, tot = project_row_into(w, ids[i], probs[i], keep_zero, i, mark, out_ids, out_p, pos)
        tail[i] = max(0.0, 1.0 - tot)
    offsets[n] = pos
    return out_ids[:pos], out_p[:pos], offsets, tail


@njit(cache=True, nogil=True)
def sort_pad_rows(flat_ids, flat_p, offsets, pad_id, out_ids, out_p):
    """Flat CSR rows -> out_ids/out_p [n, K]: each row sorted by (prob desc, id asc), the first K
    entries kept, the rest padded with (pad_id, 0). Shell sort in place (rows are short)."""
    K = out_ids.shape[1]
    for i in range(offsets.shape[0] - 1):
        a = offsets[i]
        m = offsets[i + 1] - a
        gap = 1
        while gap < m // 3:
            gap = 3 * gap + 1
        while gap >= 1:
            for x in range(a + gap, a + m):
                ci, cp = flat_ids[x], flat_p[x]
                y = x
                while y - gap >= a and (flat_p[y - gap] < cp or (flat_p[y - gap] == cp and flat_ids[y - gap] > ci)):
                    flat_ids[y] = flat_ids[y - gap]
                    flat_p[y] = flat_p[y - gap]
                    y -= gap
                flat_ids[y] = ci
                flat_p[y] = cp
            gap //= 3
        for q in range(K):
            if q < m:
                out_ids[i, q] = flat_ids[a + q]
                out_p[i, q] = flat_p[a + q]
            else:
                out_ids[i, q] = pad_id
                out_p[i, q] = 0


@njit(cache=True, nogil=True)
def fill_rows(flat_ids, flat_p, offsets, out_ids, out_p):
    """Scatter a flat CSR result into padded [n, K] arrays (already zeroed), order kept."""
    for i in range(offsets.shape[0] - 1):
        a = offsets[i]
        for j in range(offsets[i + 1] - a):
            out_ids[i, j] = flat_ids[a + j]
            out_p[i, j] = flat_p[a + j]
