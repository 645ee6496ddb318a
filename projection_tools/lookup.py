"""Exact byte lookups over a vocabulary (Numba): hash every token's bytes (FNV-1a), find the token with
exactly given bytes, groups of ids with the same bytes, and the greedy longest byte match."""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["ByteLookup"]

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


@njit(cache=True, nogil=True)
def _hash_all(data, offsets):
    n = offsets.size - 1
    out = np.empty(n, np.uint64)
    for i in range(n):
        h = np.uint64(0xCBF29CE484222325)
        for p in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(data[p])) * np.uint64(0x100000001B3)
        out[i] = h
    return out


@njit(cache=True, nogil=True)
def _find(h, q_data, qs, qe, sorted_h, sorted_ids, s_data, s_off):
    """Student id whose bytes equal q_data[qs:qe] (hash h), or -1."""
    j = np.searchsorted(sorted_h, h)
    L = qe - qs
    while j < sorted_h.size and sorted_h[j] == h:
        sid = sorted_ids[j]
        a = s_off[sid]
        if s_off[sid + 1] - a == L:
            same = True
            for p in range(L):
                if s_data[a + p] != q_data[qs + p]:
                    same = False
                    break
            if same:
                return sid
        j += 1
    return -1


@njit(cache=True, nogil=True)
def _exact_kernel(t_data, t_off, t_hash, t_ok, sorted_h, sorted_ids, s_data, s_off):
    n = t_off.size - 1
    out = np.full(n, -1, np.int64)
    for i in range(n):
        if t_ok[i]:
            out[i] = _find(t_hash[i], t_data, t_off[i], t_off[i + 1], sorted_h, sorted_ids, s_data, s_off)
    return out


@njit(cache=True, nogil=True)
def _dup_pairs(sorted_h, sorted_ids, s_data, s_off):
    """(a, b) student id pairs with equal bytes (adjacent in hash order, same hash, same bytes)."""
    out_a = []
    out_b = []
    n = sorted_h.size
    i = 0
    while i < n:
        j = i + 1
        while j < n and sorted_h[j] == sorted_h[i]:
            j += 1
        for x in range(i, j):
            for y in range(x + 1, j):
                a, b = sorted_ids[x], sorted_ids[y]
                la = s_off[a + 1] - s_off[a]
                if la == s_off[b + 1] - s_off[b]:
                    same = True
                    for p in range(la):
                        if s_data[s_off[a] + p] != s_data[s_off[b] + p]:
                            same = False
                            break
                    if same:
                        out_a.append(a)
                        out_b.append(b)
        i = j
    return np.array(out_a, np.int64), np.array(out_b, np.int64)


@njit(cache=True, nogil=True)
def _greedy_kernel(q_data, q_off, items, sorted_h, sorted_ids, s_data, s_off, maxlen):
    """Greedy longest-match byte decomposition of token bytes q[items[i]] over the student lookup.
    Returns (counts int64 [n] (-1 = some byte not representable), ids int64 [total])."""
    n = items.size
    total = 0
    for i in range(n):
        total += q_off[items[i] + 1] - q_off[items[i]]
    ids = np.empty(total, np.int64)
    counts = np.zeros(n, np.int64)
    w = 0
    for i in range(n):
        s, e = q_off[items[i]], q_off[items[i] + 1]
        pos = s
        start_w = w
        while pos < e:
            best = -1
            bestlen = 0
            h = np.uint64(0xCBF29CE484222325)
            lim = min(maxlen, e - pos)
            for L in range(1, lim + 1):
                h = (h ^ np.uint64(q_data[pos + L - 1])) * np.uint64(0x100000001B3)
                sid = _find(h, q_data, pos, pos + L, sorted_h, sorted_ids, s_data, s_off)
                if sid >= 0:
                    best = sid
                    bestlen = L
            if best < 0:
                break
            ids[w] = best
            w += 1
            pos += bestlen
        if pos < e or e == s:
            w = start_w
            counts[i] = -1
        else:
            counts[i] = w - start_w
    return counts, ids[:w]


class ByteLookup:
    """Student bytes -> id (canonical ids only: non-special, non-empty, duplicates resolved)."""

    def __init__(self, student_tb, mask: np.ndarray | None = None):
        self.tb = student_tb
        lens = student_tb.lengths
        ok = (~student_tb.is_special) & (lens > 0)
        if mask is not None:
            ok &= mask
        h = _hash_all(student_tb.data, student_tb.offsets)
        ids = np.nonzero(ok)[0].astype(np.int64)
        order = np.argsort(h[ids], kind="stable")
        self.sorted_ids = ids[order]
        self.sorted_h = h[self.sorted_ids]
        self.maxlen = int(lens[ok].max()) if ok.any() else 0

    def lookup(self, query_tb, query_ok: np.ndarray | None = None) -> np.ndarray:
        """int64 [V_q]: the student id with exactly each query token's bytes, or -1."""
        qh = _hash_all(query_tb.data, query_tb.offsets)
        ok = (~query_tb.is_special) & (query_tb.lengths > 0)
        if query_ok is not None:
            ok &= query_ok
        return _exact_kernel(query_tb.data, query_tb.offsets, qh, ok, self.sorted_h, self.sorted_ids,
                             self.tb.data, self.tb.offsets)

    def duplicate_groups(self) -> list[list[int]]:
        """Groups (>= 2 ids) of student tokens with identical bytes."""
        a, b = _dup_pairs(self.sorted_h, self.sorted_ids, self.tb.data, self.tb.offsets)
        parent: dict[int, int] = {}

        def root(x):
            while parent.get(x, x) != x:
                x = parent[x]
            return x

        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = root(x), root(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
        groups: dict[int, list[int]] = {}
        for x in set(a.tolist()) | set(b.tolist()):
            groups.setdefault(root(x), []).append(x)
        return [sorted(g) for g in groups.values()]

    def greedy(self, query_tb, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Greedy longest-match decomposition of query tokens `items`: (counts [-1 = fails], flat ids)."""
        items = np.ascontiguousarray(items, dtype=np.int64)
        return _greedy_kernel(query_tb.data, query_tb.offsets, items, self.sorted_h, self.sorted_ids,
                              self.tb.data, self.tb.offsets, max(self.maxlen, 1))
