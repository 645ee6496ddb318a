"""The byte DP of the aligner (Numba kernels): an affine-gap edit distance (Gotoh; match 0, no
substitutions) whose ties are broken towards keeping tokens whole, plus the pieces `byte_match` builds
on: trimming common prefixes/suffixes back to shared token boundaries, widening regions, banding,
k-gram hashes and the longest increasing subsequence for anchors. docs/alignment.md has the maths.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

__all__ = ["GAP_OPEN", "GAP_EXTEND", "ANCHOR_K", "FULL_DP_CELLS", "LAST_FULL_DP_CELLS", "BAND_HALF", "WIDEN_BOUNDS",
           "WIDEN_MAX", "INF", "CUT_BOUND", "CUT_END", "CUT_SPECIAL", "CUT_ALL", "Streams", "DPParams", "gotoh",
           "tie_penalties", "band_rows", "widen", "trim_common", "align_region", "kgram_hash", "lis",
           "segments_and_regions"]

# Affine gap costs of the byte DP: a gap of length L costs GAP_OPEN + L * GAP_EXTEND; matches cost
# 0; unequal bytes never pair. With these, an isolated run of < 4 equal bytes inside unmatched
# text is not worth splitting two gaps for, so template noise does not produce spurious matches.
GAP_OPEN = 3
GAP_EXTEND = 1
ANCHOR_K = 12            # k-gram length for anchors
FULL_DP_CELLS = 1 << 17  # regions up to this many cells get the exact full DP (larger: anchors first)
LAST_FULL_DP_CELLS = 1 << 24  # an anchor-free region up to this size still gets the full DP
BAND_HALF = 512          # half-width of the band for larger anchor-free regions
WIDEN_BOUNDS = 1         # a DP region widens into the matched runs beside it over this many shared
WIDEN_MAX = 64           # token boundaries, by at most this many bytes
INF = 1 << 60
# position flags for the DP's tie-break (see `cut_flags`, `gotoh`)
CUT_BOUND = 1            # a token boundary
CUT_END = 2              # a gap on this side may end here without splitting a token
CUT_SPECIAL = 4          # a special token (no bytes) or the stream start/end sits here
CUT_ALL = CUT_BOUND | CUT_END | CUT_SPECIAL

# The kernels' argument structs (namedtuples: Numba passes them as typed tuples, no copies).
Streams = namedtuple("Streams", "a b fa fb mt ms")
Streams.__doc__ = """The two byte streams being matched and the matching being written. a, b: uint8 [n], [m];
fa, fb: uint8 [n + 1], [m + 1] position flags (CUT_*, see `gotoh`); mt: int64 [n], mt[i] = the b-index
a[i] is matched to or -1; ms: int64 [m], the inverse. Kernels address regions of the streams by
absolute positions [a0, a1) x [b0, b1) and write matches into mt/ms at absolute positions."""
DPParams = namedtuple("DPParams", "go ge full_cells half defer")
DPParams.__doc__ = """The DP's settings: go, ge: gap open / extend cost (a gap of length L costs go + L * ge);
full_cells: a region of at most this many DP cells gets the exact full DP; half: half-width of the
band for larger regions; defer: True = return larger regions (for finer anchoring) instead of banding."""


@njit(cache=True, nogil=True)
def tie_penalties(f, n1, three, K):
    """The `gotoh` tie-break penalties at positions 0..n1-1 of one side, from its flags f: p[i] for a
    gap starting at i or lying at i on the other side (K unless a token boundary), e[i] for a gap
    ending at i (K unless CUT_END); each + 1 (a miss) unless CUT_SPECIAL (or not three)."""
    p = np.empty(n1, np.int64)
    e = np.empty(n1, np.int64)
    for i in range(n1):
        q = 0 if (not three or f[i] & CUT_SPECIAL) else 1
        p[i] = (0 if f[i] & CUT_BOUND else K) + q
        e[i] = (0 if f[i] & CUT_END else K) + q
    return p, e


@njit(cache=True, nogil=True)
def gotoh(ab, a0, a1, b0, b1, lo, hi, go, ge):
    """Affine-gap alignment of a = ab.a[a0:a1] vs b = ab.b[b0:b1] (`Streams` ab; match 0, gaps
    go + L*ge, unequal bytes never pair) with row i restricted to columns lo[i]..hi[i] (inclusive).
    Writes the matches into ab.mt/ab.ms (absolute positions). Returns (cost, splits, misses).

    Tie-break (lexicographic, never changes the optimal cost): among alignments of equal cost the
    one with the fewest token *splits* wins, then the one with the fewest special *misses*.
    fa = ab.fa[a0:a1 + 1] and fb = ab.fb[b0:b1 + 1] flag each position between bytes: CUT_BOUND = a
    token boundary, CUT_END = a gap on that side may end here without splitting a token, CUT_SPECIAL =
    a special token (or the stream end) sits here. A gap of a-bytes [i0, i1) placed between b[j-1]
    and b[j] costs one split for each of i0 not CUT_BOUND, i1 not CUT_END, j not CUT_BOUND, and one
    miss for each of i0, i1, j not CUT_SPECIAL (likewise for gaps of b-bytes). With N = n + m and
    K = 3N + 1 (> any total of misses), costs are kept as cost * K^2 + splits * K + misses, so
    integer comparison is the lexicographic one. A region too long for that in int64 (N beyond ~3e5
    bytes: only ever the banded worst case) drops the misses: cost * (3N + 1) + splits. Remaining
    ties: M < X (a-byte unmatched) < Y (b-byte unmatched); the traceback from the end therefore
    places matches as late and gaps as early as allowed."""
    a = ab.a[a0:a1]
    b = ab.b[b0:b1]
    fa = ab.fa[a0:a1 + 1]
    fb = ab.fb[b0:b1 + 1]
    mt = ab.mt
    ms = ab.ms
    a_off = a0
    b_off = b0
    n = a.shape[0]
    m = b.shape[0]
    W = 1
    for i in range(n + 1):
        if hi[i] - lo[i] + 1 > W:
            W = hi[i] - lo[i] + 1
    N = n + m
    K = 3 * N + 1
    three = float(go + ge + 1) * float(N + 1) * float(K) * float(K) < 1e18
    if three:
        S = K * K
    else:
        K = 1
        S = 3 * N + 1
    G = (go + ge) * S  # opening (first byte of) a gap
    E = ge * S         # extending a gap
    # tie-break penalty per position: pX for a gap starting there or lying there on the other side
    # (not a token boundary; not at a special), eX for a gap ending there (may not end; not at a special)
    pa, ea = tie_penalties(fa, n + 1, three, K)
    pb, eb = tie_penalties(fb, m + 1, three, K)
    ptr = np.zeros((n + 1, W), np.uint8)
    pM = np.full(m + 1, INF, np.int64)
    pX = np.full(m + 1, INF, np.int64)
    pY = np.full(m + 1, INF, np.int64)
    cM = np.full(m + 1, INF, np.int64)
    cX = np.full(m + 1, INF, np.int64)
    cY = np.full(m + 1, INF, np.int64)
    # row 0
    for j in range(lo[0], hi[0] + 1):
        if j == 0:
            pM[0] = 0
        else:
            o = pM[j - 1] + G + pb[j - 1] + pa[0]
            e = pY[j - 1] + E
            if o <= e:
                pY[j] = o
                ptr[0, j - lo[0]] = 0 << 4
            else:
                pY[j] = e
                ptr[0, j - lo[0]] = 2 << 4
    for i in range(1, n + 1):
        l0 = lo[i]
        h0 = hi[i]
        lp = lo[i - 1]
        hp = hi[i - 1]
        if l0 > 0:
            cM[l0 - 1] = INF
            cX[l0 - 1] = INF
            cY[l0 - 1] = INF
        ai = a[i - 1]
        pa1 = pa[i - 1]  # an a-gap starting at i-1
        ea1 = ea[i - 1]  # an a-gap ending at i-1
        pa0 = pa[i]      # a b-gap placed at a-position i
        ea0 = ea[i]      # an a-gap ending at i
        for j in range(l0, h0 + 1):
            p = 0
            # M: a[i-1] ~ b[j-1]; closes a gap ending at (i-1, j-1)
            vM = INF
            if j >= 1 and ai == b[j - 1] and lp <= j - 1 <= hp:
                vM = pM[j - 1]
                s = 0
                t = pX[j - 1] + ea1
                if t < vM:
                    vM = t
                    s = 1
                t = pY[j - 1] + eb[j - 1]
                if t < vM:
                    vM = t
                    s = 2
                p |= s
            # X: a[i-1] unmatched, from row i-1 same column; the gap sits at b-position j
            vX = INF
            if lp <= j <= hp:
                o = G + pa1 + pb[j]
                vX = pM[j] + o
                s = 0
                t = pX[j] + E
                if t < vX:
                    vX = t
                    s = 1
                t = pY[j] + o + eb[j]
                if t < vX:
                    vX = t
                    s = 2
                p |= s << 2
            # Y: b[j-1] unmatched, from same row j-1; the gap sits at a-position i
            vY = INF
            if j >= 1 and j - 1 >= l0:
                o = G + pb[j - 1] + pa0
                vY = cM[j - 1] + o
                s = 0
                t = cX[j - 1] + o + ea0
                if t < vY:
                    vY = t
                    s = 1
                t = cY[j - 1] + E
                if t < vY:
                    vY = t
                    s = 2
                p |= s << 4
            cM[j] = vM if vM < INF else INF
            cX[j] = vX if vX < INF else INF
            cY[j] = vY if vY < INF else INF
            ptr[i, j - l0] = p
        # swap rows; invalidate previous row's band in the new "current"
        for j in range(lp, hp + 1):
            pM[j] = INF
            pX[j] = INF
            pY[j] = INF
        pM, cM = cM, pM
        pX, cX = cX, pX
        pY, cY = cY, pY
    # final state (a gap still open ends at (n, m))
    best = pM[m]
    st = 0
    t = pX[m] + ea[n]
    if t < best:
        best = t
        st = 1
    t = pY[m] + eb[m]
    if t < best:
        best = t
        st = 2
    i = n
    j = m
    while i > 0 or j > 0:
        p = ptr[i, j - lo[i]]
        if st == 0:
            mt[a_off + i - 1] = b_off + j - 1
            ms[b_off + j - 1] = a_off + i - 1
            st = p & 3
            i -= 1
            j -= 1
        elif st == 1:
            st = (p >> 2) & 3
            i -= 1
        else:
            st = (p >> 4) & 3
            j -= 1
    return best // S, (best % S) // K, (best % S) % K if three else 0


@njit(cache=True, nogil=True)
def band_rows(n, m, half):
    """Column range per row around the line (0,0)-(n,m), wide enough to stay connected."""
    lo = np.empty(n + 1, np.int64)
    hi = np.empty(n + 1, np.int64)
    slope_w = (m + n - 1) // max(n, 1) + 1
    h = max(half, slope_w)
    for i in range(n + 1):
        c = (i * m) // max(n, 1)
        lo[i] = max(0, c - h)
        hi[i] = min(m, c + h)
    lo[0] = 0
    hi[n] = m
    return lo, hi


@njit(cache=True, nogil=True)
def widen(ab, a0, a1, b0, b1):
    """Widen the region a[a0:a1] x b[b0:b1] (whose neighbours are matched bytes or the stream
    ends) outward along the matched diagonal run on each side, over WIDEN_BOUNDS positions that are
    token boundaries on both sides (at most WIDEN_MAX bytes), and unmatch those bytes: the DP, not
    the anchor or trim that fixed them, then decides where the gaps next to them go. A side stops at
    the last such position reached whose neighbour beyond is still a matched byte (or the stream
    end), so the region keeps that property."""
    fa = ab.fa
    fb = ab.fb
    mt = ab.mt
    ms = ab.ms
    n = mt.shape[0]
    m = ms.shape[0]
    x = a0
    y = b0
    w = 0
    nb = 0
    bx = a0
    by = b0
    while w < WIDEN_MAX and nb < WIDEN_BOUNDS and x > 0 and y > 0 and mt[x - 1] == y - 1:
        x -= 1
        y -= 1
        w += 1
        if fa[x] & fb[y] & CUT_BOUND:
            nb += 1
            if (x == 0 and y == 0) or (x > 0 and y > 0 and mt[x - 1] == y - 1):
                bx = x
                by = y
    for q in range(bx, a0):
        ms[mt[q]] = -1
        mt[q] = -1
    x = a1
    y = b1
    w = 0
    nb = 0
    ex = a1
    ey = b1
    while w < WIDEN_MAX and nb < WIDEN_BOUNDS and x < n and y < m and mt[x] == y:
        x += 1
        y += 1
        w += 1
        if fa[x] & fb[y] & CUT_BOUND:
            nb += 1
            if (x == n and y == m) or (x < n and y < m and mt[x] == y):
                ex = x
                ey = y
    for q in range(a1, ex):
        ms[mt[q]] = -1
        mt[q] = -1
    return bx, by, ex, ey


@njit(cache=True, nogil=True)
def trim_common(ab, a0, a1, b0, b1):
    """Match the common prefix and suffix of a[a0:a1] and b[b0:b1] directly (into mt/ms), each cut
    back to the last position that is a token boundary on both sides unless it is all of both
    (so the DP still places the gaps next to it). Returns their lengths (p, s)."""
    a = ab.a
    b = ab.b
    fa = ab.fa
    fb = ab.fb
    mt = ab.mt
    ms = ab.ms
    n = a1 - a0
    m = b1 - b0
    p = 0
    while p < n and p < m and a[a0 + p] == b[b0 + p]:
        p += 1
    if p < n or p < m:
        while p > 0 and not (fa[a0 + p] & fb[b0 + p] & CUT_BOUND):
            p -= 1
    s = 0
    while s < n - p and s < m - p and a[a1 - 1 - s] == b[b1 - 1 - s]:
        s += 1
    if s < n - p or s < m - p:
        while s > 0 and not (fa[a1 - s] & fb[b1 - s] & CUT_BOUND):
            s -= 1
    for x in range(p):
        mt[a0 + x] = b0 + x
        ms[b0 + x] = a0 + x
    for x in range(1, s + 1):
        mt[a1 - x] = b1 - x
        ms[b1 - x] = a1 - x
    return p, s


@njit(cache=True, nogil=True)
def align_region(ab, a0, a1, b0, b1, prm, out, no):
    """Align a[a0:a1] with b[b0:b1] (`Streams` ab, `DPParams` prm). A region of <= prm.full_cells
    cells gets the full DP as it is (exact, tie-break included). A larger one first has its common
    prefix/suffix matched directly, each cut back to the last position that is a token boundary on
    both sides (so the DP still places the gaps next to it); what is left gets the full DP when
    small, else it is deferred (prm.defer: appended to out[no], returns no + 1) or gets the banded
    DP."""
    if a1 - a0 == 0 and b1 - b0 == 0:
        return no
    full_cells = prm.full_cells
    a0, b0, a1, b1 = widen(ab, a0, a1, b0, b1)
    n = a1 - a0
    m = b1 - b0
    if n == 0 or m == 0:
        return no
    if (n + 1) * (m + 1) <= full_cells:
        lo = np.zeros(n + 1, np.int64)
        hi = np.full(n + 1, m, np.int64)
        gotoh(ab, a0, a1, b0, b1, lo, hi, prm.go, prm.ge)
        return no
    p, s = trim_common(ab, a0, a1, b0, b1)
    a0 += p
    b0 += p
    a1 -= s
    b1 -= s
    n = a1 - a0
    m = b1 - b0
    if n == 0 or m == 0:
        return no
    if (n + 1) * (m + 1) <= full_cells:
        lo = np.zeros(n + 1, np.int64)
        hi = np.full(n + 1, m, np.int64)
    elif prm.defer:
        out[no, 0] = a0
        out[no, 1] = a1
        out[no, 2] = b0
        out[no, 3] = b1
        return no + 1
    else:
        lo, hi = band_rows(n, m, prm.half)
    gotoh(ab, a0, a1, b0, b1, lo, hi, prm.go, prm.ge)
    return no


@njit(cache=True, nogil=True)
def kgram_hash(a, k):
    n = a.shape[0] - k + 1
    if n <= 0:
        return np.empty(0, np.int64)
    out = np.empty(n, np.int64)
    B = np.uint64(1099511628211)
    for i in range(n):
        h = np.uint64(14695981039346656037)
        for x in range(k):
            h = (h ^ np.uint64(a[i + x])) * B
        out[i] = np.int64(h >> np.uint64(1))
    return out


@njit(cache=True, nogil=True)
def lis(v):
    """Indices of one longest strictly increasing subsequence of v (patience sorting)."""
    n = v.shape[0]
    tails = np.empty(n, np.int64)   # index into v of the smallest tail of each length
    prev = np.full(n, -1, np.int64)
    L = 0
    for i in range(n):
        x = v[i]
        lo_ = 0
        hi_ = L
        while lo_ < hi_:
            mid = (lo_ + hi_) // 2
            if v[tails[mid]] < x:
                lo_ = mid + 1
            else:
                hi_ = mid
        if lo_ > 0:
            prev[i] = tails[lo_ - 1]
        tails[lo_] = i
        if lo_ == L:
            L += 1
    out = np.empty(L, np.int64)
    if L == 0:
        return out
    k = tails[L - 1]
    for q in range(L - 1, -1, -1):
        out[q] = k
        k = prev[k]
    return out


@njit(cache=True, nogil=True)
def segments_and_regions(ab, pi, pj, k, a0, a1, b0, b1, prm):
    """Anchors (pi[q], pj[q]) of k equal bytes, monotone, in the region [a0, a1) x [b0, b1) of the
    `Streams` ab. Mark anchor bytes matched (dropping ones that overlap the previous segment off its
    diagonal), then align the regions between (`align_region`, `DPParams` prm). Returns the large
    regions left for finer anchoring (int64 [r, 4]; empty unless prm.defer)."""
    a = ab.a
    b = ab.b
    mt = ab.mt
    ms = ab.ms
    out = np.empty((pi.shape[0] + 1, 4), np.int64)
    no = 0
    ea = a0  # end of the last segment
    eb = b0
    for q in range(pi.shape[0]):
        i = pi[q]
        j = pj[q]
        if i < ea or j < eb:
            # overlaps the previous segment: keep only if on its diagonal (extends it)
            if i - j == (ea - eb) and i + k > ea:
                for x in range(ea, i + k):
                    if a[x] != b[x - i + j]:
                        break
                    mt[x] = x - i + j
                    ms[x - i + j] = x
                    ea = x + 1
                    eb = x - i + j + 1
            continue
        same = True
        for x in range(k):
            if a[i + x] != b[j + x]:
                same = False
                break
        if not same:
            continue  # hash collision
        for x in range(k):  # mark the anchor first: the region before it may widen into it
            mt[i + x] = j + x
            ms[j + x] = i + x
        no = align_region(ab, ea, i, eb, j, prm, out, no)
        ea = i + k
        eb = j + k
    no = align_region(ab, ea, a1, eb, b1, prm, out, no)
    return out[:no].copy()
