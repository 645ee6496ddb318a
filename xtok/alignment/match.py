"""Monotone byte matching of two streams: `byte_match` (trim, anchor on unique k-grams, DP per region,
band as a last resort) and the plain full DP `dp_match`, with the position flags (`cut_flags`) that
tell the DP's tie-break where the tokens are."""
from __future__ import annotations

import numpy as np

from .dp import (ANCHOR_K, BAND_HALF, CUT_ALL, CUT_BOUND, CUT_END, CUT_SPECIAL, FULL_DP_CELLS, GAP_EXTEND, GAP_OPEN,
                 INF, LAST_FULL_DP_CELLS, DPParams, Streams, gotoh, kgram_hash, lis, segments_and_regions,
                 trim_common)

__all__ = ["byte_match", "dp_match", "cut_flags", "anchors"]


def cut_flags(cum: np.ndarray, elig: np.ndarray | None = None, special: np.ndarray | None = None) -> np.ndarray:
    """Per-position flags (uint8 [cum[-1] + 1]) of a byte stream with token offsets `cum`:
    CUT_BOUND | CUT_END at token boundaries, CUT_END alone right after an eligible dummy-prefix
    space (a gap that ends there leaves the rest of the token whole: the chunker drops the space),
    CUT_SPECIAL where a special token (`special`: bool per token) sits and at both stream ends."""
    cum = np.asarray(cum, dtype=np.int64)
    f = np.zeros(int(cum[-1]) + 1, np.uint8)
    f[cum] = CUT_BOUND | CUT_END
    if elig is not None and elig.any():
        f[cum[:-1][elig] + 1] |= CUT_END
    if special is not None and special.any():
        f[cum[:-1][special]] |= CUT_SPECIAL
    f[0] |= CUT_SPECIAL
    f[-1] |= CUT_SPECIAL
    return f


def _check_flags(f, n, what):
    if f is None:
        return np.full(n + 1, CUT_ALL, np.uint8)
    f = np.ascontiguousarray(f, dtype=np.uint8)
    if f.shape != (n + 1,):
        raise ValueError(f"{what}: expected shape ({n + 1},) (one flag per position between bytes), got {f.shape}.")
    return f


def _check_size(n, m, go, ge):
    N = n + m
    if (go + ge + 3) * (N + 1) * (3 * N + 1) >= INF:
        raise ValueError(f"byte_match(): {n} + {m} bytes is too long for one alignment (the DP's int64 "
                         f"costs would overflow); align the text in pieces.")


def byte_match(a: np.ndarray, b: np.ndarray, *, k: int = ANCHOR_K, full_cells: int = FULL_DP_CELLS,
               half: int = BAND_HALF, last_full_cells: int = LAST_FULL_DP_CELLS, go: int = GAP_OPEN,
               ge: int = GAP_EXTEND, a_flags: np.ndarray | None = None,
               b_flags: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Monotone matching of two byte streams (uint8). Returns (mt, ms): mt[i] = index in b that
    a[i] is matched to, or -1; ms the inverse. a_flags/b_flags (`cut_flags`; default: every
    position a boundary and a special) say where the tokens are, for the DP's tie-break. Exact
    optimal DP, tie-break included, for small inputs (<= full_cells); larger ones are trimmed,
    anchored on unique k-grams, then unique k/2-grams inside the large regions left, then each
    remaining region gets the full DP up to last_full_cells and a band of half-width `half` around
    its diagonal beyond that (every DP region widened to shared token boundaries first)."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    b = np.ascontiguousarray(b, dtype=np.uint8)
    n, m = a.shape[0], b.shape[0]
    fa, fb = _check_flags(a_flags, n, "byte_match(): a_flags"), _check_flags(b_flags, m, "byte_match(): b_flags")
    _check_size(n, m, go, ge)
    mt = np.full(n, -1, np.int64)
    ms = np.full(m, -1, np.int64)
    if n == 0 or m == 0:
        return mt, ms
    ab = Streams(a, b, fa, fb, mt, ms)
    # common prefix / suffix, each cut back to the last position that is a token boundary on both
    # sides (unless it consumes everything), so the DP still places the gaps next to it
    p = s = 0
    if (n + 1) * (m + 1) > full_cells:  # small: the exact DP does it all
        p, s = trim_common(ab, 0, n, 0, m)
    # anchored refinement: unique k-grams at decreasing k; large regions left between anchors
    # are re-anchored (unique within the region) with a smaller k, then banded as a last resort
    regions = np.array([[p, n - s, p, m - s]], dtype=np.int64)
    ks = [k, max(4, k // 2), None]
    for level, kk in enumerate(ks):
        todo = []
        for a0, a1, b0, b1 in regions.tolist():  # loop over (few) large regions, not tokens
            if a1 == a0 or b1 == b0:
                continue
            if kk is None or (a1 - a0 + 1) * (b1 - b0 + 1) <= full_cells:
                pi = pj = np.empty(0, np.int64)
                kq = 1
            else:
                pi, pj = anchors(a[a0:a1], b[b0:b1], kk)
                pi, pj, kq = pi + a0, pj + b0, kk
            fc = full_cells if kk is not None else max(full_cells, last_full_cells)
            prm = DPParams(int(go), int(ge), int(fc), int(half), kk is not None)
            todo.append(segments_and_regions(ab, pi, pj, kq, a0, a1, b0, b1, prm))
        regions = np.concatenate(todo) if todo else np.empty((0, 4), np.int64)
        if regions.shape[0] == 0:
            break
    return mt, ms


def dp_match(a: np.ndarray, b: np.ndarray, go: int = GAP_OPEN, ge: int = GAP_EXTEND,
             a_flags: np.ndarray | None = None, b_flags: np.ndarray | None = None):
    """The plain full affine-gap DP (no trimming, anchors or band): (mt, ms, cost, splits, misses),
    where splits and misses are the tie-break counts (see `gotoh`). For tests and benchmarks; `byte_match` is what
    the aligner uses."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    b = np.ascontiguousarray(b, dtype=np.uint8)
    fa = _check_flags(a_flags, a.shape[0], "dp_match(): a_flags")
    fb = _check_flags(b_flags, b.shape[0], "dp_match(): b_flags")
    _check_size(a.shape[0], b.shape[0], go, ge)
    mt = np.full(a.shape[0], -1, np.int64)
    ms = np.full(b.shape[0], -1, np.int64)
    lo = np.zeros(a.shape[0] + 1, np.int64)
    hi = np.full(a.shape[0] + 1, b.shape[0], np.int64)
    ab = Streams(a, b, fa, fb, mt, ms)
    cost, splits, misses = gotoh(ab, 0, a.shape[0], 0, b.shape[0], lo, hi, int(go), int(ge))
    return mt, ms, int(cost), int(splits), int(misses)


def anchors(a: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Start positions of k-grams occurring exactly once in each stream, longest monotone subset."""
    ha, hb = kgram_hash(a, k), kgram_hash(b, k)
    if ha.size == 0 or hb.size == 0:
        e = np.empty(0, np.int64)
        return e, e
    ua, ia, ca = np.unique(ha, return_index=True, return_counts=True)
    ub, ib, cb = np.unique(hb, return_index=True, return_counts=True)
    ua, ia = ua[ca == 1], ia[ca == 1]
    ub, ib = ub[cb == 1], ib[cb == 1]
    _, xa, xb = np.intersect1d(ua, ub, assume_unique=True, return_indices=True)
    pi, pj = ia[xa].astype(np.int64), ib[xb].astype(np.int64)
    order = np.argsort(pi, kind="stable")
    pi, pj = pi[order], pj[order]
    keep = lis(pj)
    return pi[keep], pj[keep]
