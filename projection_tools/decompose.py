"""Student decompositions of teacher tokens: how the student tokenizer spells a teacher token's bytes
*mid-text* (the tiers of `decompose`, each verified byte-exactly), the exact byte map teacher id ->
student id (`exact_map`), and which student ids are canonical among same-bytes twins
(`canonical_student_mask`). Encoding goes through `Tokenizer.encode_batch` (each library's batch API)."""
from __future__ import annotations

import itertools
import os

import numpy as np
from numba import njit

from .lookup import ByteLookup

__all__ = ["TIERS", "TIER_INDEX", "batch_encode_plain", "decompose", "encode_midtext", "canonical_student_mask",
           "exact_map"]

TIERS = ("exact", "prefix_newline", "prefix_a", "plain", "bytes_greedy", "unverified", "unk", "special",
         "identity", "unmapped")
TIER_INDEX = {n: i for i, n in enumerate(TIERS)}


# --------------------------------------------------------------------------------------------
# batch encoding
# --------------------------------------------------------------------------------------------

def batch_encode_plain(tok, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
    """Encode many texts as plain text (no special tokens added, special-token strings are text) through
    the tokenizer's batch encoder (`Tokenizer.encode_batch`: the backend library's batch API)."""
    if not texts:
        return []
    nt = num_threads or max(1, min(os.cpu_count() or 1, 8))
    return [ids.tolist() for ids in tok.encode_batch(texts, parse_special=False, num_threads=nt)]


@njit(cache=True, nogil=True)
def _verify(enc_ids, enc_off, q_data, q_off, items, prefix_len, s_data, s_off, s_special):
    """Index (into enc_ids) where item i's own tokens start, or -1 when the prefix does not end on a
    token boundary or the remaining tokens' bytes differ from the item's bytes."""
    n = items.size
    out = np.full(n, -1, np.int64)
    V = s_off.size - 1
    for i in range(n):
        a, b = enc_off[i], enc_off[i + 1]
        cum = 0
        j = a
        bad = False
        while j < b and cum < prefix_len:
            sid = enc_ids[j]
            if sid < 0 or sid >= V:
                bad = True
                break
            cum += s_off[sid + 1] - s_off[sid]
            j += 1
        if bad or cum != prefix_len or j >= b:
            continue
        qs, qe = q_off[items[i]], q_off[items[i] + 1]
        p = qs
        ok = True
        for t in range(j, b):
            sid = enc_ids[t]
            if sid < 0 or sid >= V or s_special[sid]:
                ok = False
                break
            for x in range(s_off[sid], s_off[sid + 1]):
                if p >= qe or s_data[x] != q_data[p]:
                    ok = False
                    break
                p += 1
            if not ok:
                break
        if ok and p == qe:
            out[i] = j
    return out


def _flatten(encs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter(map(len, encs), np.int64, len(encs))
    off = np.zeros(len(encs) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    flat = np.fromiter(itertools.chain.from_iterable(encs), np.int64, int(off[-1]))
    return flat, off


def _segments(flat: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenation of flat[starts[i]:ends[i]] and the lengths."""
    lens = (ends - starts).astype(np.int64)
    base = np.repeat(starts - (np.cumsum(lens) - lens), lens)
    return flat[base + np.arange(int(lens.sum()))], lens


def decompose(student, query_tb, items: np.ndarray, lookup: ByteLookup | None = None, *, batch_size: int = 16384,
              progress=None, verified_only: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mid-text student decomposition of the query tokens `items` (ids into `query_tb`).

    Returns (counts int64 [n], flat student ids int64 [sum counts], tier int8 [n]); items in order.
    Count 0 with tier 'unmapped' when nothing works (no greedy lookup, no unk). `verified_only` stops
    after the byte-verified tiers (1-4; tier 4 only with a `lookup`)."""
    items = np.asarray(items, np.int64)
    n = items.size
    s_tb = student.token_bytes
    tier = np.full(n, TIER_INDEX["unmapped"], np.int8)
    seg_item, seg_ids, seg_len = [], [], []
    texts: list[str | None] = []
    for i in items.tolist():
        try:
            texts.append(query_tb.get(i).decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(None)
    pending = np.array([k for k, t in enumerate(texts) if t is not None], np.int64)
    ps = int(bool(student.prefix_space))
    for name, prefix in (("prefix_newline", "\n"), ("prefix_a", "a"), ("plain", "")):
        if pending.size == 0:
            break
        plen = len(prefix.encode()) + ps
        ok_all = []
        for c in range(0, pending.size, batch_size):
            chunk = pending[c:c + batch_size]
            encs = batch_encode_plain(student, [prefix + texts[k] for k in chunk.tolist()])
            flat, off = _flatten(encs)
            start = _verify(flat, off, query_tb.data, query_tb.offsets, items[chunk], plen, s_tb.data, s_tb.offsets,
                            s_tb.is_special)
            good = start >= 0
            ids, lens = _segments(flat, start[good], off[1:][good])
            seg_item.append(chunk[good])
            seg_ids.append(ids)
            seg_len.append(lens)
            tier[chunk[good]] = TIER_INDEX[name]
            ok_all.append(good)
            if progress is not None:
                progress.update(int(good.sum()))
        pending = pending[~np.concatenate(ok_all)] if ok_all else pending
    rest = np.nonzero(tier == TIER_INDEX["unmapped"])[0]
    if rest.size and lookup is not None:
        counts, ids = lookup.greedy(query_tb, items[rest])
        good = counts >= 0
        seg_item.append(rest[good])
        seg_ids.append(ids)
        seg_len.append(counts[good])
        tier[rest[good]] = TIER_INDEX["bytes_greedy"]
        if progress is not None:
            progress.update(int(good.sum()))
        rest = rest[~good]
    if rest.size and not verified_only:  # normalising students: take the student's encoding as it is
        txt = [k for k in rest.tolist() if texts[k] is not None]
        encs = batch_encode_plain(student, [texts[k] for k in txt])
        got_i, got_ids, got_len = [], [], []
        for k, e in zip(txt, encs):
            e = [x for x in e if 0 <= x < s_tb.vocab_size and s_tb.offsets[x + 1] > s_tb.offsets[x]]
            if ps and len(e) > 1 and s_tb.get(e[0]) == b" ":
                e = e[1:]
            if e:
                got_i.append(k)
                got_ids.extend(e)
                got_len.append(len(e))
        if got_i:
            gi = np.array(got_i, np.int64)
            seg_item.append(gi)
            seg_ids.append(np.array(got_ids, np.int64))
            seg_len.append(np.array(got_len, np.int64))
            tier[gi] = TIER_INDEX["unverified"]
        rest = np.nonzero(tier == TIER_INDEX["unmapped"])[0]
        if rest.size and student.unk_id is not None:
            seg_item.append(rest)
            seg_ids.append(np.full(rest.size, student.unk_id, np.int64))
            seg_len.append(np.ones(rest.size, np.int64))
            tier[rest] = TIER_INDEX["unk"]
        if progress is not None:
            progress.update(int(rest.size))
    counts = np.zeros(n, np.int64)
    if not seg_item:
        return counts, np.zeros(0, np.int64), tier
    it = np.concatenate(seg_item)
    ln = np.concatenate(seg_len)
    ids = np.concatenate(seg_ids)
    counts[it] = ln
    # reorder segments into item order
    seg_start = np.cumsum(ln) - ln
    order = np.argsort(it, kind="stable")
    ids, _ = _segments(ids, seg_start[order], seg_start[order] + ln[order])
    return counts, ids, tier


def encode_midtext(student, byte_strings: list[bytes]) -> list[np.ndarray | None]:
    """Mid-text student decomposition of raw byte strings (tiers 1-3 only; None when none verifies)."""
    from xtok.tokens import TokenBytes

    tb = TokenBytes.from_list([b if b else b"?" for b in byte_strings])
    counts, ids, tier = decompose(student, tb, np.arange(len(byte_strings)), None, verified_only=True)
    out, pos = [], 0
    for c, t in zip(counts.tolist(), tier.tolist()):
        out.append(ids[pos:pos + c] if t != TIER_INDEX["unmapped"] else None)
        pos += c
    return out


def canonical_student_mask(student) -> np.ndarray:
    """bool [V_s]: False for student ids shadowed by a same-bytes twin the student tokenizer prefers."""
    tb = student.token_bytes
    mask = np.ones(tb.vocab_size, bool)
    groups = ByteLookup(tb).duplicate_groups()
    if not groups:
        return mask
    texts = [tb.get(g[0]) for g in groups]
    decs = encode_midtext(student, texts)
    for g, dec in zip(groups, decs):
        keep = dec[0] if (dec is not None and len(dec) == 1 and dec[0] in g) else min(g)
        for x in g:
            if x != keep:
                mask[x] = False
    return mask


def exact_map(teacher, student, student_mask: np.ndarray | None = None) -> np.ndarray:
    """int64 [V_t]: the student id with exactly each teacher token's bytes, or -1 (special / none).
    `teacher`, `student`: Tokenizer objects (the student's tokenizer resolves duplicate bytes)."""
    if student_mask is None:
        student_mask = canonical_student_mask(student)
    return ByteLookup(student.token_bytes, student_mask).lookup(teacher.token_bytes)
