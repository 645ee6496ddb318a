"""Token sequences as byte streams, and the chunk pass over a byte matching (Numba kernels).

* `token_offsets`: cumulative byte offsets of a token sequence (special tokens have no bytes) and which
  tokens start with a SentencePiece dummy-prefix space (a `prefix_space` tokenizer; the first token
  with bytes at the stream start or right after a special token, starting with b' '); with strip,
  those spaces are left out. This is the one definition of token byte offsets in xtok.
* `gather_stream`: the byte stream itself; `streams_equal`, `common_prefix`: compare streams.
* `chunk_pass`: the finest chunks of tokens whose bytes are all matched, on one diagonal, over a
  monotone byte matching; `gap_runs`: runs of tokens in no chunk.
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["token_offsets", "gather_stream", "gather", "streams_equal", "chunk_pass", "gap_runs", "common_prefix"]


@njit(cache=True, nogil=True)
def token_offsets(data, offsets, is_special, ids, prefix_space, strip):
    """(cum int64 [n+1], elig bool [n]): byte offsets of the token sequence `ids` over a TokenBytes
    table (data, offsets, is_special), and per token whether its first byte is a dummy-prefix space
    (module doc). With strip, eligible tokens count one byte less (their space is dropped)."""
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
    return cum, elig


@njit(cache=True, nogil=True)
def gather_stream(data, offsets, ids, cum, elig, strip):
    """The byte stream (uint8 [cum[-1]]) of `ids` with the offsets `token_offsets` gave (same strip)."""
    n = ids.shape[0]
    out = np.empty(cum[n], np.uint8)
    for k in range(n):
        a = cum[k]
        b = cum[k + 1]
        s = offsets[ids[k]]
        if strip and elig[k]:
            s += 1
        for x in range(b - a):
            out[a + x] = data[s + x]
    return out


@njit(cache=True, nogil=True)
def gather(data, offsets, is_special, ids, prefix_space, strip):
    """(stream, cum, elig): `token_offsets` + `gather_stream` in one call."""
    cum, elig = token_offsets(data, offsets, is_special, ids, prefix_space, strip)
    return gather_stream(data, offsets, ids, cum, elig, strip), cum, elig


@njit(cache=True, nogil=True)
def streams_equal(a, b):
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
def chunk_pass(tcum, tskip, scum, sskip, mt, ms, identity):
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
def gap_runs(flags):
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
def common_prefix(t_data, t_off, t_ids, t_cum, t_skip, s_data, s_off, s_ids, s_cum, s_skip):
    """Length of the common leading part of two token byte streams (token k's bytes: data[off[id] +
    skip[k] : ...] with cum[k+1] - cum[k] bytes; special tokens have none), compared without
    materialising the streams."""
    n = t_ids.shape[0]
    m = s_ids.shape[0]
    i = 0
    j = 0
    a = 0  # bytes of token i / j already compared
    b = 0
    L = 0
    while True:
        while i < n and a >= t_cum[i + 1] - t_cum[i]:
            i += 1
            a = 0
        while j < m and b >= s_cum[j + 1] - s_cum[j]:
            j += 1
            b = 0
        if i >= n or j >= m:
            return L
        c = min(t_cum[i + 1] - t_cum[i] - a, s_cum[j + 1] - s_cum[j] - b)
        pt = t_off[t_ids[i]] + t_skip[i] + a
        ps = s_off[s_ids[j]] + s_skip[j] + b
        for x in range(c):
            if t_data[pt + x] != s_data[ps + x]:
                return L + x
        a += c
        b += c
        L += c
