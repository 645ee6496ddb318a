"""Token alignment between two tokenizations of (nearly) the same text.

`align(teacher, student, teacher_ids, student_ids) -> Alignment` maps teacher tokens to student
tokens through their raw bytes (`xtok.tokens.TokenBytes`):

1. Each side becomes a byte stream (special tokens contribute no bytes) with cumulative token
   offsets.
2. A monotone byte matching between the two streams:
   - exact path: the streams are equal, every byte matches itself;
   - DP path: an affine-gap edit distance (Gotoh, match 0, no substitutions) in Numba whose ties
     are broken towards keeping tokens whole (fewest gap edges strictly inside a token, then
     fewest away from special tokens; see `_gotoh`). Small inputs get the full DP; large ones
     trim the common prefix/suffix (back to a shared token boundary), anchor on k-grams unique in
     both streams (longest increasing subsequence keeps a monotone set) and run the DP between
     anchors, each region widened to shared token boundaries first; large anchor-free regions are
     banded.
3. Chunks: one linear pass groups tokens whose bytes are all matched, on one diagonal, into the
   finest groups whose byte spans start and end together on both sides. Every other token
   (special tokens, tokens with any unmatched byte, or tied into a group with one) is a gap.

The bulk entry point `align_arrays` takes only numpy arrays, so DataLoader workers can align
without Python objects; all hot loops are `numba.njit(cache=True, nogil=True)`.
See docs/alignment.md for the algorithm and its guarantees.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
from numba import njit

from .tokens import TokenBytes, Tokenizer

__all__ = ["Alignment", "align", "align_arrays", "byte_match", "chunks_from_match", "dp_match", "cut_flags",
           "GAP_OPEN", "GAP_EXTEND", "CUT_BOUND", "CUT_END", "CUT_SPECIAL"]

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
_INF = 1 << 60
# position flags for the DP's tie-break (see `cut_flags`, `_gotoh`)
CUT_BOUND = 1            # a token boundary
CUT_END = 2              # a gap on this side may end here without splitting a token
CUT_SPECIAL = 4          # a special token (no bytes) or the stream start/end sits here
CUT_ALL = CUT_BOUND | CUT_END | CUT_SPECIAL

TokLike = Union[Tokenizer, TokenBytes]


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _gather(data, offsets, is_special, ids, prefix_space, strip):
    """Byte stream and cumulative byte offsets (int64 [n+1]) of a token sequence, and per token
    whether its first byte may be a SentencePiece dummy-prefix space: a prefix_space tokenizer,
    the first token with bytes at the stream start or right after a special token, starting with
    b' '. With strip, those spaces are left out of the stream."""
    n = ids.shape[0]
    cum = np.empty(n + 1, np.int64)
    elig = np.zeros(n, np.bool_)
    cum[0] = 0
    after_special = True
    for k in range(n):
        t = ids[k]
        ln = offsets[t + 1] - offsets[t]
        if is_special[t]:
            ln = 0
        if ln == 0:
            after_special = after_special or is_special[t]
        else:
            if prefix_space and after_special and data[offsets[t]] == 32:
                elig[k] = True
                if strip:
                    ln -= 1
            after_special = False
        cum[k + 1] = cum[k] + ln
    out = np.empty(cum[n], np.uint8)
    for k in range(n):
        a = cum[k]
        b = cum[k + 1]
        s = offsets[ids[k]]
        if strip and elig[k]:
            s += 1
        for x in range(b - a):
            out[a + x] = data[s + x]
    return out, cum, elig


@njit(cache=True, nogil=True)
def _streams_equal(a, b):
    if a.shape[0] != b.shape[0]:
        return False
    for i in range(a.shape[0]):
        if a[i] != b[i]:
            return False
    return True


@njit(cache=True, nogil=True)
def _token_ok(cum, skip, match, identity):
    """Per token: non-empty and every byte (after a skipped dummy space) matched, on one diagonal."""
    n = cum.shape[0] - 1
    ok = np.empty(n, np.bool_)
    for k in range(n):
        a = cum[k] + skip[k]
        b = cum[k + 1]
        if b == a:
            ok[k] = False
        elif identity:
            ok[k] = True
        else:
            m0 = match[a]
            good = m0 >= 0
            if good:
                for x in range(a + 1, b):
                    if match[x] != m0 + (x - a):
                        good = False
                        break
            ok[k] = good
    return ok


@njit(cache=True, nogil=True)
def _chunk_pass(tcum, tskip, scum, sskip, mt, ms, identity):
    """Finest chunks over a monotone byte matching (mt: teacher byte -> student byte or -1).
    Token k's bytes are [cum[k] + skip[k], cum[k+1]) (skip: an unmatched dummy-prefix space)."""
    n = tcum.shape[0] - 1
    m = scum.shape[0] - 1
    ok_t = _token_ok(tcum, tskip, mt, identity)
    ok_s = _token_ok(scum, sskip, ms, identity)
    chunks = np.empty((min(n, m) + 1, 4), np.int32)
    t_in = np.zeros(n, np.bool_)
    s_in = np.zeros(m, np.bool_)
    nc = 0
    i = 0
    j = 0
    while i < n:
        if not ok_t[i]:
            i += 1
            continue
        tb = tcum[i] + tskip[i]
        y = tb if identity else mt[tb]
        while j < m and (scum[j] + sskip[j] < y or scum[j + 1] == scum[j] + sskip[j]):
            j += 1
        if j >= m:
            break
        if scum[j] + sskip[j] != y or not ok_s[j]:
            i += 1  # its first byte lands inside a student token, or that token is not clean
            continue
        sb = scum[j] + sskip[j]
        te = tcum[i + 1]
        se = scum[j + 1]
        ni = i + 1
        nj = j + 1
        good = True
        while te - tb != se - sb:
            if te - tb < se - sb:
                if ni >= n or not ok_t[ni] or tskip[ni] != 0:
                    good = False
                    break
                if (not identity) and mt[tcum[ni]] != sb + (tcum[ni] - tb):
                    good = False
                    break
                te = tcum[ni + 1]
                ni += 1
            else:
                if nj >= m or not ok_s[nj] or sskip[nj] != 0:
                    good = False
                    break
                if (not identity) and ms[scum[nj]] != tb + (scum[nj] - sb):
                    good = False
                    break
                se = scum[nj + 1]
                nj += 1
        if good:
            chunks[nc, 0] = i
            chunks[nc, 1] = ni
            chunks[nc, 2] = j
            chunks[nc, 3] = nj
            nc += 1
            for x in range(i, ni):
                t_in[x] = True
            for x in range(j, nj):
                s_in[x] = True
        # on failure every token of the attempted group is a gap: any chunk holding one of
        # them would have to hold the offending (empty/unmatched/off-diagonal) token too
        i = ni
        j = nj
    return chunks[:nc].copy(), t_in, s_in


@njit(cache=True, nogil=True)
def _runs(flags):
    """[start, end) runs of False in flags, int32 [g, 2]."""
    n = flags.shape[0]
    out = np.empty((n // 2 + 1, 2), np.int32)
    g = 0
    k = 0
    while k < n:
        if flags[k]:
            k += 1
            continue
        s = k
        while k < n and not flags[k]:
            k += 1
        out[g, 0] = s
        out[g, 1] = k
        g += 1
    return out[:g].copy()


@njit(cache=True, nogil=True)
def _tie_penalties(f, n1, three, K):
    """The `_gotoh` tie-break penalties at positions 0..n1-1 of one side, from its flags f: p[i] for a
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
def _gotoh(a, b, fa, fb, lo, hi, go, ge, mt, ms, a_off, b_off):
    """Affine-gap alignment of a vs b (match 0, gaps go + L*ge, unequal bytes never pair) with row
    i restricted to columns lo[i]..hi[i] (inclusive). Writes matches into mt/ms (offset by
    a_off/b_off). Returns (cost, splits, misses).

    Tie-break (lexicographic, never changes the optimal cost): among alignments of equal cost the
    one with the fewest token *splits* wins, then the one with the fewest special *misses*. fa/fb
    (uint8 [n+1]/[m+1]) flag each position between bytes: CUT_BOUND = a token boundary, CUT_END = a
    gap on that side may end here without splitting a token, CUT_SPECIAL = a special token (or the
    stream end) sits here. A gap of a-bytes [i0, i1) placed between b[j-1] and b[j] costs one split
    for each of i0 not CUT_BOUND, i1 not CUT_END, j not CUT_BOUND, and one miss for each of i0, i1, j
    not CUT_SPECIAL (likewise for gaps of b-bytes). With N = n + m and K = 3N + 1 (> any total of
    misses), costs are kept as cost * K^2 + splits * K + misses, so integer comparison is the
    lexicographic one. A region too long for that in int64 (N beyond ~3e5 bytes: only ever the
    banded worst case) drops the misses: cost * (3N + 1) + splits. Remaining ties: M < X (a-byte
    unmatched) < Y (b-byte unmatched); the traceback from the end therefore places matches as late
    and gaps as early as allowed."""
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
    pa, ea = _tie_penalties(fa, n + 1, three, K)
    pb, eb = _tie_penalties(fb, m + 1, three, K)
    ptr = np.zeros((n + 1, W), np.uint8)
    INF = _INF
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
def _band_rows(n, m, half):
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
def _widen(fa, fb, mt, ms, a0, a1, b0, b1):
    """Widen the region a[a0:a1] x b[b0:b1] (whose neighbours are matched bytes or the stream
    ends) outward along the matched diagonal run on each side, over WIDEN_BOUNDS positions that are
    token boundaries on both sides (at most WIDEN_MAX bytes), and unmatch those bytes: the DP, not
    the anchor or trim that fixed them, then decides where the gaps next to them go. A side stops at
    the last such position reached whose neighbour beyond is still a matched byte (or the stream
    end), so the region keeps that property."""
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
def _trim_common(a, b, fa, fb, a0, a1, b0, b1, mt, ms):
    """Match the common prefix and suffix of a[a0:a1] and b[b0:b1] directly (into mt/ms), each cut
    back to the last position that is a token boundary on both sides unless it is all of both
    (so the DP still places the gaps next to it). Returns their lengths (p, s)."""
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
def _align_region(a, b, fa, fb, a0, a1, b0, b1, mt, ms, go, ge, full_cells, half, defer, out, no):
    """Align a[a0:a1] with b[b0:b1]. A region of <= full_cells cells gets the full DP as it is
    (exact, tie-break included). A larger one first has its common prefix/suffix matched directly,
    each cut back to the last position that is a token boundary on both sides (so the DP still
    places the gaps next to it); what is left gets the full DP when small, else it is deferred
    (appended to out[no], returns no + 1) or gets the banded DP."""
    if a1 - a0 == 0 and b1 - b0 == 0:
        return no
    a0, b0, a1, b1 = _widen(fa, fb, mt, ms, a0, a1, b0, b1)
    n = a1 - a0
    m = b1 - b0
    if n == 0 or m == 0:
        return no
    if (n + 1) * (m + 1) <= full_cells:
        lo = np.zeros(n + 1, np.int64)
        hi = np.full(n + 1, m, np.int64)
        _gotoh(a[a0:a1], b[b0:b1], fa[a0:a1 + 1], fb[b0:b1 + 1], lo, hi, go, ge, mt, ms, a0, b0)
        return no
    p, s = _trim_common(a, b, fa, fb, a0, a1, b0, b1, mt, ms)
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
    elif defer:
        out[no, 0] = a0
        out[no, 1] = a1
        out[no, 2] = b0
        out[no, 3] = b1
        return no + 1
    else:
        lo, hi = _band_rows(n, m, half)
    _gotoh(a[a0:a1], b[b0:b1], fa[a0:a1 + 1], fb[b0:b1 + 1], lo, hi, go, ge, mt, ms, a0, b0)
    return no


@njit(cache=True, nogil=True)
def _kgram_hash(a, k):
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
def _lis(v):
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
def _segments_and_regions(a, b, fa, fb, pi, pj, k, a0, a1, b0, b1, mt, ms, go, ge, full_cells, half,
                          defer):
    """Anchors (pi[q], pj[q]) of k equal bytes, monotone. Mark anchor bytes matched (dropping
    ones that overlap the previous segment off its diagonal), then align the regions between.
    Returns the large regions left for finer anchoring (int64 [r, 4]; empty unless defer)."""
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
        no = _align_region(a, b, fa, fb, ea, i, eb, j, mt, ms, go, ge, full_cells, half, defer, out, no)
        ea = i + k
        eb = j + k
    no = _align_region(a, b, fa, fb, ea, a1, eb, b1, mt, ms, go, ge, full_cells, half, defer, out, no)
    return out[:no].copy()


# --------------------------------------------------------------------------------------------
# Python drivers (vectorised; no loop over tokens)
# --------------------------------------------------------------------------------------------


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
    if (go + ge + 3) * (N + 1) * (3 * N + 1) >= _INF:
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
    # common prefix / suffix, each cut back to the last position that is a token boundary on both
    # sides (unless it consumes everything), so the DP still places the gaps next to it
    p = s = 0
    if (n + 1) * (m + 1) > full_cells:  # small: the exact DP does it all
        p, s = _trim_common(a, b, fa, fb, 0, n, 0, m, mt, ms)
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
                pi, pj = _anchors(a[a0:a1], b[b0:b1], kk)
                pi, pj, kq = pi + a0, pj + b0, kk
            fc = full_cells if kk is not None else max(full_cells, last_full_cells)
            todo.append(_segments_and_regions(a, b, fa, fb, pi, pj, kq, a0, a1, b0, b1, mt, ms, go, ge, fc,
                                              half, kk is not None))
        regions = np.concatenate(todo) if todo else np.empty((0, 4), np.int64)
        if regions.shape[0] == 0:
            break
    return mt, ms


def dp_match(a: np.ndarray, b: np.ndarray, go: int = GAP_OPEN, ge: int = GAP_EXTEND,
             a_flags: np.ndarray | None = None, b_flags: np.ndarray | None = None):
    """The plain full affine-gap DP (no trimming, anchors or band): (mt, ms, cost, splits, misses),
    where splits and misses are the tie-break counts (see `_gotoh`). For tests and benchmarks; `byte_match` is what
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
    cost, splits, misses = _gotoh(a, b, fa, fb, lo, hi, go, ge, mt, ms, 0, 0)
    return mt, ms, int(cost), int(splits), int(misses)


def _anchors(a: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Start positions of k-grams occurring exactly once in each stream, longest monotone subset."""
    ha, hb = _kgram_hash(a, k), _kgram_hash(b, k)
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
    keep = _lis(pj)
    return pi[keep], pj[keep]


def chunks_from_match(tcum, scum, mt=None, ms=None, tskip=None, sskip=None):
    """Chunks + per-token in-chunk flags from cumulative byte offsets and a byte matching
    (None = identity: the streams are equal)."""
    identity = mt is None
    if identity:
        mt = ms = np.empty(0, np.int64)
    tskip = np.zeros(len(tcum) - 1, np.int64) if tskip is None else tskip
    sskip = np.zeros(len(scum) - 1, np.int64) if sskip is None else sskip
    return _chunk_pass(tcum, tskip, scum, sskip, mt, ms, identity)


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
    ta, tcum, telig = _gather(t_data, t_offsets, t_special, tids, bool(t_prefix_space), False)
    sa, scum, selig = _gather(s_data, s_offsets, s_special, sids, bool(s_prefix_space), False)
    z0, z1 = np.zeros(tids.shape[0], np.int64), np.zeros(sids.shape[0], np.int64)
    e = np.empty(0, np.int64)
    if _streams_equal(ta, sa):
        chunks, t_in, s_in = _chunk_pass(tcum, z0, scum, z1, e, e, True)
        return chunks, _runs(t_in), _runs(s_in), ("exact", int(ta.shape[0]), int(ta.shape[0]), int(sa.shape[0]))
    if telig.any() or selig.any():  # equal once dummy-prefix spaces are dropped?
        ta2, tcum2, _ = _gather(t_data, t_offsets, t_special, tids, bool(t_prefix_space), True)
        sa2, scum2, _ = _gather(s_data, s_offsets, s_special, sids, bool(s_prefix_space), True)
        if _streams_equal(ta2, sa2):
            chunks, t_in, s_in = _chunk_pass(tcum2, z0, scum2, z1, e, e, True)
            return chunks, _runs(t_in), _runs(s_in), ("exact", int(ta2.shape[0]), int(ta.shape[0]), int(sa.shape[0]))
    mt, ms = byte_match(ta, sa, a_flags=cut_flags(tcum, telig, t_special[tids]),
                        b_flags=cut_flags(scum, selig, s_special[sids]))
    tskip, sskip = _skips(tcum, telig, mt), _skips(scum, selig, ms)
    chunks, t_in, s_in = _chunk_pass(tcum, tskip, scum, sskip, mt, ms, False)
    return chunks, _runs(t_in), _runs(s_in), ("dp", int((mt >= 0).sum()), int(ta.shape[0]), int(sa.shape[0]))


def token_bytes_and_prefix(x) -> tuple[TokenBytes, bool]:
    if isinstance(x, Tokenizer):
        return x.token_bytes, bool(x.prefix_space)
    if isinstance(x, TokenBytes):
        return x, False
    raise TypeError(f"expected a xtok Tokenizer or TokenBytes, got {type(x).__name__}.")


def _token_bytes(x: TokLike, what: str) -> tuple[TokenBytes, bool]:
    if isinstance(x, (Tokenizer, TokenBytes)):
        return token_bytes_and_prefix(x)
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
    tt, tps = _token_bytes(teacher, "teacher")
    st, sps = _token_bytes(student, "student")
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
