"""Independent pure-Python references for the aligner (slow, obviously correct; shared by the tests
and the benchmarks).

- `ref_gotoh`: a full 3-matrix affine-gap DP (lists of lists) with the token-boundary tie-break kept as
  (cost, splits, misses) tuples; `brute_force_best` checks it over every matching of tiny inputs.
- `ref_flags`, `token_spans`, `dummy_eligible`: token boundaries and dummy-prefix spaces from token
  bytes alone.
- `ref_chunks`: chunks built another way (union-find over tokens joined by matched bytes; a component
  is a chunk iff it is contiguous, clean and on one diagonal); `ref_identity_chunks` for equal streams.
- `check_contract`: the Alignment contract checked from token bytes alone.
- `ref_trim`: the common prefix/suffix trim back to shared token boundaries.
"""
from __future__ import annotations

import numpy as np

from ..alignment import CUT_BOUND, CUT_END, CUT_SPECIAL, GAP_EXTEND, GAP_OPEN, Alignment
from ..tokens import TokenBytes

def _cut(f, x):
    """(split, miss) of a gap starting at x, or lying at x on the other side: a split when x is not a
    token boundary (the gap cuts a token), a miss when no special token (or stream end) sits at x."""
    return (0 if f[x] & CUT_BOUND else 1, 0 if f[x] & CUT_SPECIAL else 1)


def _end(f, x):
    """(split, miss) of a gap ending at x: a split unless a gap may end there (a token boundary, or
    right after an eligible dummy-prefix space, which the chunker drops), a miss as in _cut."""
    return (0 if f[x] & CUT_END else 1, 0 if f[x] & CUT_SPECIAL else 1)


def _add(*vs):
    return tuple(sum(x) for x in zip(*vs))


ALL_FLAGS = CUT_BOUND | CUT_END | CUT_SPECIAL


def ref_gotoh(a: bytes, b: bytes, go=GAP_OPEN, ge=GAP_EXTEND, fa=None, fb=None):
    """Full affine-gap DP. States: M (a[i-1] matched to b[j-1], equal bytes only), X (a[i-1]
    unmatched), Y (b[j-1] unmatched). A cost is the triple (edit cost, splits, misses), compared
    lexicographically: the tie-break counts the gap edges and gap positions that fall strictly inside
    a token (splits) or away from special tokens (misses); fa/fb are per-position flags (default:
    every position a boundary and a special). A gap of a-bytes a[i0:i1) lying between b[j-1] and b[j]
    adds _cut(fa, i0) + _end(fa, i1) + _cut(fb, j) (likewise for b-gaps). Remaining ties prefer M,
    then X, then Y. Returns (cost, splits, misses, pairs)."""
    n, m = len(a), len(b)
    fa = [ALL_FLAGS] * (n + 1) if fa is None else [int(x) for x in fa]
    fb = [ALL_FLAGS] * (m + 1) if fb is None else [int(x) for x in fb]
    INF = (float("inf"),) * 3
    M = [[INF] * (m + 1) for _ in range(n + 1)]
    X = [[INF] * (m + 1) for _ in range(n + 1)]
    Y = [[INF] * (m + 1) for _ in range(n + 1)]
    P = [[(0, 0, 0)] * (m + 1) for _ in range(n + 1)]  # predecessor state of (M, X, Y)
    M[0][0] = (0, 0, 0)
    OPEN, EXT, FREE = (go + ge, 0, 0), (ge, 0, 0), (0, 0, 0)

    def best(cands):  # first minimum in the order given (M, X, Y)
        k = min(range(3), key=lambda q: (cands[q], q))
        return cands[k], k

    def tb(pair):  # (split, miss) -> a cost triple
        return (0,) + pair

    for i in range(n + 1):
        for j in range(m + 1):
            if i == 0 and j == 0:
                continue
            pm = px = py = 0
            if i and j and a[i - 1] == b[j - 1]:
                # a match closes the gap before it: an a-gap ending at i-1 or a b-gap ending at j-1
                M[i][j], pm = best([M[i - 1][j - 1], _add(X[i - 1][j - 1], tb(_end(fa, i - 1))),
                                    _add(Y[i - 1][j - 1], tb(_end(fb, j - 1)))])
            if i:  # a-gap opening at a-position i-1, lying at b-position j
                op = _add(OPEN, tb(_cut(fa, i - 1)), tb(_cut(fb, j)))
                X[i][j], px = best([_add(M[i - 1][j], op), _add(X[i - 1][j], EXT),
                                    _add(Y[i - 1][j], op, tb(_end(fb, j)))])
            if j:  # b-gap opening at b-position j-1, lying at a-position i
                op = _add(OPEN, tb(_cut(fb, j - 1)), tb(_cut(fa, i)))
                Y[i][j], py = best([_add(M[i][j - 1], op), _add(X[i][j - 1], op, tb(_end(fa, i))),
                                    _add(Y[i][j - 1], EXT)])
            P[i][j] = (pm, px, py)
    (cost, splits, misses), s = best([_add(M[n][m], FREE), _add(X[n][m], tb(_end(fa, n))),
                                      _add(Y[n][m], tb(_end(fb, m)))])
    pairs, i, j = [], n, m
    while i or j:
        if s == 0:
            pairs.append((i - 1, j - 1))
            s, i, j = P[i][j][0], i - 1, j - 1
        elif s == 1:
            s, i = P[i][j][1], i - 1
        else:
            s, j = P[i][j][2], j - 1
    return cost, splits, misses, pairs[::-1]


def matching_cost(n, m, pairs, go=GAP_OPEN, ge=GAP_EXTEND):
    """Affine cost of the cheapest alignment with exactly these matched pairs."""
    cost, pi, pj = 0, -1, -1
    for i, j in list(pairs) + [(n, m)]:
        for gap in (i - pi - 1, j - pj - 1):
            cost += go + ge * gap if gap else 0
        pi, pj = i, j
    return cost


def matching_tiebreak(n, m, pairs, fa, fb):
    """Fewest (splits, misses) of an alignment with exactly these matched pairs, straight from the
    definition (see ref_gotoh): between two matches lie at most an a-gap and a b-gap, in either order."""
    tot, pi, pj = (0, 0), -1, -1
    for i, j in list(pairs) + [(n, m)]:
        a0, a1, b0, b1 = pi + 1, i, pj + 1, j

        def a_gap(at):  # a[a0:a1] unmatched, lying at b-position `at`
            return _add(_cut(fa, a0), _end(fa, a1), _cut(fb, at))

        def b_gap(at):
            return _add(_cut(fb, b0), _end(fb, b1), _cut(fa, at))

        if a1 > a0 and b1 > b0:
            tot = _add(tot, min(_add(a_gap(b0), b_gap(a1)), _add(b_gap(a0), a_gap(b1))))
        elif a1 > a0:
            tot = _add(tot, a_gap(b0))
        elif b1 > b0:
            tot = _add(tot, b_gap(a0))
        pi, pj = i, j
    return tot


def brute_force_best(a: bytes, b: bytes, fa, fb):
    """min (cost, splits, misses) over every monotone matching of equal bytes (tiny inputs only)."""
    n, m = len(a), len(b)
    best = None

    def rec(i0, j0, pairs):
        nonlocal best
        score = (matching_cost(n, m, pairs),) + matching_tiebreak(n, m, pairs, fa, fb)
        best = score if best is None or score < best else best
        for i in range(i0, n):
            for j in range(j0, m):
                if a[i] == b[j]:
                    rec(i + 1, j + 1, pairs + [(i, j)])

    rec(0, 0, [])
    return best


def ref_flags(tb: TokenBytes, ids, prefix_space):
    """Per-position flags from token spans alone: boundaries; 'a gap may end here' also right after
    an eligible dummy-prefix space; 'special' where a special token sits and at both stream ends."""
    spans = token_spans(tb, ids)
    total = spans[-1][1] if spans else 0
    f = [0] * (total + 1)
    f[0] = f[total] = CUT_BOUND | CUT_END | CUT_SPECIAL
    for k, (a, b) in enumerate(spans):
        f[a] |= CUT_BOUND | CUT_END
        f[b] |= CUT_BOUND | CUT_END
        if tb.is_special[ids[k]]:
            f[a] |= CUT_SPECIAL
    for (a, _), e in zip(spans, dummy_eligible(tb, ids, prefix_space)):
        if e:
            f[a + 1] |= CUT_END
    return np.array(f, np.uint8)


def token_spans(tb: TokenBytes, ids):
    lens = [0 if tb.is_special[i] else len(tb.get(int(i))) for i in ids]
    ends = np.cumsum([0] + lens)
    return [(int(ends[k]), int(ends[k + 1])) for k in range(len(ids))]


def dummy_eligible(tb: TokenBytes, ids, prefix_space):
    """Tokens whose first byte may be a SentencePiece dummy-prefix space."""
    out, after = [], True
    for i in ids:
        bts = b"" if tb.is_special[i] else tb.get(int(i))
        if not bts:
            out.append(False)
            after = after or bool(tb.is_special[i])
            continue
        out.append(bool(prefix_space and after and bts[:1] == b" "))
        after = False
    return out


def ref_chunks(tb_t, t_ids, tb_s, s_ids, pairs, t_ps=False, s_ps=False):
    """Chunks/gaps from a byte matching by union-find over tokens (independent of align's pass)."""
    tsp, ssp = token_spans(tb_t, t_ids), token_spans(tb_s, s_ids)
    mt = {i: j for i, j in pairs}
    ms = {j: i for i, j in pairs}
    n, m = len(t_ids), len(s_ids)
    tok_of_t = {x: k for k, (a, b) in enumerate(tsp) for x in range(a, b)}
    tok_of_s = {y: k for k, (a, b) in enumerate(ssp) for y in range(a, b)}

    def eff(spans, k, elig, match):
        a, b = spans[k]
        if elig[k] and a not in match:
            a += 1
        return a, b

    te = dummy_eligible(tb_t, t_ids, t_ps)
    se = dummy_eligible(tb_s, s_ids, s_ps)
    parent = list(range(n + m))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        parent[find(tok_of_t[i])] = find(n + tok_of_s[j])
    comps = {}
    for k in range(n + m):
        comps.setdefault(find(k), []).append(k)
    chunks = []
    for members in comps.values():
        ts = sorted(k for k in members if k < n)
        ss = sorted(k - n for k in members if k >= n)
        if not ts or not ss:
            continue
        if ts != list(range(ts[0], ts[-1] + 1)) or ss != list(range(ss[0], ss[-1] + 1)):
            continue
        diag, ok = None, True
        for k in ts:
            a, b = eff(tsp, k, te, mt)
            if b <= a or (k != ts[0] and a != tsp[k][0]):
                ok = False
            for x in range(a, b):
                if x not in mt or (diag is not None and mt[x] - x != diag):
                    ok = False
                    break
                diag = mt[x] - x
        for k in ss:
            a, b = eff(ssp, k, se, ms)
            if b <= a or (k != ss[0] and a != ssp[k][0]):
                ok = False
            for y in range(a, b):
                if y not in ms or y - ms[y] != diag:
                    ok = False
                    break
        if ok:
            chunks.append((ts[0], ts[-1] + 1, ss[0], ss[-1] + 1))
    chunks.sort()
    return chunks


def check_contract(tb_t, t_ids, tb_s, s_ids, al: Alignment, t_ps=False, s_ps=False):
    """The issue's invariants, from token bytes only."""
    c, tg, sg = al.chunks, al.teacher_gaps, al.student_gaps
    assert c.dtype == np.int32 and tg.dtype == np.int32 and sg.dtype == np.int32
    assert c.ndim == 2 and c.shape[1] == 4 and tg.shape[1] == 2 and sg.shape[1] == 2
    # chunks + gaps partition both sides, chunks in order
    for side, lo, hi, gaps, n in (("t", 0, 1, tg, len(t_ids)), ("s", 2, 3, sg, len(s_ids))):
        spans = sorted([(int(x[lo]), int(x[hi])) for x in c] + [tuple(map(int, g)) for g in gaps])
        pos = 0
        for a, b in spans:
            assert a == pos and b > a, (side, spans)
            pos = b
        assert pos == n
        assert np.all(np.diff(c[:, lo]) > 0) if len(c) else True
    te = dummy_eligible(tb_t, t_ids, t_ps)
    se = dummy_eligible(tb_s, s_ids, s_ps)
    for t0, t1, s0, s1 in c.tolist():
        tbs = [b"" if tb_t.is_special[i] else tb_t.get(int(i)) for i in t_ids[t0:t1]]
        sbs = [b"" if tb_s.is_special[i] else tb_s.get(int(i)) for i in s_ids[s0:s1]]
        assert all(tbs) and all(sbs), "special/empty token inside a chunk"
        tj, sj = b"".join(tbs), b"".join(sbs)
        if tj != sj and te[t0] and tj[1:] == sj:
            tbs[0] = tbs[0][1:]
        elif tj != sj and se[s0] and sj[1:] == tj:
            sbs[0] = sbs[0][1:]
        assert b"".join(tbs) == b"".join(sbs), (t0, t1, s0, s1, tbs, sbs)
        # finest: no shared boundary strictly inside
        tb_ = set(np.cumsum([len(x) for x in tbs])[:-1].tolist())
        sb_ = set(np.cumsum([len(x) for x in sbs])[:-1].tolist())
        assert not (tb_ & sb_), ("chunk not finest", t0, t1, s0, s1)
    assert al.one_to_one.dtype == bool and al.one_to_one.shape == (len(c),)


def ref_identity_chunks(tb_t, t_ids, tb_s, s_ids, t_ps, s_ps):
    """When both streams are equal as they are, or once dummy spaces are dropped: every boundary merge."""
    def stripped(tb, ids, ps):
        el = dummy_eligible(tb, ids, ps)
        return [b"" if tb.is_special[i] else tb.get(int(i))[1 if e else 0:] for i, e in zip(ids, el)]
    tbs, sbs = stripped(tb_t, t_ids, False), stripped(tb_s, s_ids, False)
    if b"".join(tbs) != b"".join(sbs):
        tbs, sbs = stripped(tb_t, t_ids, t_ps), stripped(tb_s, s_ids, s_ps)
    if b"".join(tbs) != b"".join(sbs):
        return None
    pairs = [(x, x) for x in range(len(b"".join(tbs)))]
    fake_t = TokenBytes.from_list([p if p else None for p in tbs])
    fake_s = TokenBytes.from_list([p if p else None for p in sbs])
    empty_t = {k for k, p in enumerate(tbs) if not p}
    return ref_chunks(fake_t, list(range(len(tbs))), fake_s, list(range(len(sbs))), pairs), empty_t


def ref_trim(a: bytes, b: bytes, fa, fb):
    """(p, s): the common prefix of a and b, cut back to the last position that is a token boundary
    on both sides unless it is all of both; then the common suffix of what is left, likewise."""
    def shared(i, j):
        return bool(fa[i] & fb[j] & CUT_BOUND)
    n, m = len(a), len(b)
    p = next((x for x in range(min(n, m)) if a[x] != b[x]), min(n, m))
    if (p, p) != (n, m):
        p = max([x for x in range(p + 1) if shared(x, x)] + [0])
    s = next((x for x in range(min(n, m) - p) if a[n - 1 - x] != b[m - 1 - x]), min(n, m) - p)
    if (s, s) != (n - p, m - p):
        s = max([x for x in range(s + 1) if shared(n - x, m - x)] + [0])
    return p, s
