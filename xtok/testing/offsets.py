"""A second, independent aligner: chunks from the tokenizer libraries' own token offsets.

`xtok.align` never looks at the text: it matches the two tokenizations' byte streams. When both
tokenizers reproduce a text exactly (no normalisation), there is another way to get the same answer
that shares nothing with it: ask each tokenizer *library* where every token lies in the text
(Hugging Face `tokenizers` `Encoding.offsets`, SentencePiece's `begin`/`end`, tiktoken's token
bytes), and group the tokens at every position where both sides can be cut. Nothing here uses xtok's
`TokenBytes`, its streams, its DP or its chunk pass; only the ids go to `xtok.align` (slow, pure
Python: for tests and benchmarks).

- `library_encode(tok, text)`: ids and byte spans `[start, end)` in `text.encode()` from the
  library (special-token strings encoded as text, no BOS/EOS), or None when the library does not
  reproduce the text (normalisation, dropped characters).
- `offset_alignment(t_spans, s_spans)`: chunks and gaps from two span lists.
- `compare_with_offsets(al, ref, t_spans, s_spans)`: the problems (empty when none) between an
  `Alignment` and the offset reference, allowing for what offsets cannot see (cuts inside a UTF-8
  character, where some libraries report one span for all the pieces of a character).

Library quirks, handled here and nowhere else:
- SentencePiece reports byte-fallback pieces of one character as zero-width, all but the last, which
  gets the character: the run gets the character's span (the pieces overlap: no cut inside it).
- Hugging Face `Prepend("▁")` / `Metaspace` tokenizers report the prepended dummy `▁` as covering the
  text's first character when it is a token of its own; it covers nothing (zero width).
- SentencePiece-style decoders drop one leading space (they cannot tell it from the dummy prefix), so
  a text that starts with a space also counts as reproduced when the decode lacks that one space.
"""
from __future__ import annotations

import bisect
import json

import numpy as np

__all__ = ["library_encode", "offset_alignment", "compare_with_offsets", "char_starts"]


def char_starts(text: str) -> list[int]:
    """Byte offset of every character of text, plus the byte length at the end (pure Python)."""
    out, pos = [], 0
    for ch in text:
        out.append(pos)
        pos += len(ch.encode("utf-8"))
    out.append(pos)
    return out


# -- the libraries' offsets ---------------------------------------------------------------------

_HF_LITERAL: dict[int, tuple] = {}


def _hf_literal(hf):
    """(a copy of the HF tokenizer that encodes special-token strings as text, prepends_dummy)."""
    got = _HF_LITERAL.get(id(hf))
    if got is None or got[0] is not hf:
        from tokenizers import Tokenizer as HFTok

        src = hf.to_str()
        lit = HFTok.from_str(src)
        lit.encode_special_tokens = True
        got = (hf, lit, _prepends_dummy(json.loads(src)))
        _HF_LITERAL[id(hf)] = got
    return got[1], got[2]


def _prepends_dummy(cfg) -> bool:
    """Does this tokenizer.json prepend a `▁` (Prepend normalizer, Metaspace pre-tokenizer)?"""
    def walk(x):
        if isinstance(x, dict):
            if x.get("type") == "Prepend" and x.get("prepend") == "\u2581":
                return True
            if x.get("type") == "Metaspace" and (x.get("prepend_scheme") in ("first", "always")
                                                 or x.get("add_prefix_space") is True):
                return True
            return any(walk(v) for v in x.values())
        if isinstance(x, list):
            return any(walk(v) for v in x)
        return False
    return walk(cfg.get("normalizer")) or walk(cfg.get("pre_tokenizer"))


def _hf_encode(hf, text):
    lit, dummy = _hf_literal(hf)
    enc = lit.encode(text, add_special_tokens=False)
    ids = [int(i) for i in enc.ids]
    cb = char_starts(text)
    spans = [[cb[s], cb[e]] for s, e in enc.offsets]
    if dummy and len(ids) > 1 and lit.id_to_token(ids[0]) == "\u2581" and spans[0][0] == spans[1][0] == 0:
        spans[0] = [0, 0]
    return ids, spans, hf.decode(ids, skip_special_tokens=False)


def _spm_encode(sp, text):
    try:
        proto = sp.encode(text, out_type="immutable_proto")
    except (ValueError, TypeError):  # newer sentencepiece
        proto = sp.encode(text, return_type="proto")
    ids = [int(p.id) for p in proto.pieces]
    spans = [[int(p.begin), int(p.end)] for p in proto.pieces]
    # byte-fallback pieces of one character: zero-width except the last, which has the character
    k = 0
    while k < len(ids):
        if sp.IsByte(ids[k]) and spans[k][0] == spans[k][1]:
            q = k
            while q < len(ids) and sp.IsByte(ids[q]) and spans[q][0] == spans[q][1] == spans[k][0]:
                q += 1
            if q < len(ids) and sp.IsByte(ids[q]) and spans[q][0] == spans[k][0]:
                for x in range(k, q):
                    spans[x] = list(spans[q])
            k = q + 1
        else:
            k += 1
    return ids, spans, sp.decode(ids)


def _tiktoken_encode(enc, n_special, text):
    ranks = enc.encode_ordinary(text)
    spans, pos, parts = [], 0, []
    for r in ranks:
        b = enc.decode_single_token_bytes(r)
        spans.append([pos, pos + len(b)])
        parts.append(b)
        pos += len(b)
    return [int(r) + n_special for r in ranks], spans, b"".join(parts).decode("utf-8", errors="replace")


def library_encode(tok, text: str):
    """(ids int64 [n], spans int64 [n, 2]) of `text` straight from `tok`'s library (Hugging Face
    `tokenizers`, `sentencepiece` or tiktoken), special-token strings encoded as text, no BOS/EOS;
    spans are byte offsets into `text.encode('utf-8')`. None when the library does not reproduce the
    text: its decode differs from it, or the spans leave a byte of it uncovered."""
    from ..tokens.backends import HFBackend, SentencePieceBackend, TekkenBackend

    be = tok.backend
    if isinstance(be, HFBackend):
        ids, spans, dec = _hf_encode(be.tok, text)
    elif isinstance(be, SentencePieceBackend):
        ids, spans, dec = _spm_encode(be.sp, text)
    elif isinstance(be, TekkenBackend):
        ids, spans, dec = _tiktoken_encode(be.enc, be.n_special, text)
    else:
        raise TypeError(f"library_encode: no library offsets for {type(be).__name__}")
    if dec != text and not (text.startswith(" ") and dec == text[1:]):
        return None
    nb = len(text.encode("utf-8"))
    covered = [False] * nb
    for s, e in spans:
        if not 0 <= s <= e <= nb:
            return None
        for x in range(s, e):
            covered[x] = True
    if not all(covered):
        return None
    return np.asarray(ids, np.int64), np.asarray(spans, np.int64).reshape(-1, 2)


# -- the aligner ---------------------------------------------------------------------------------

def _cuts(spans):
    """Positions where a side can be cut: every token with a span lies wholly before or wholly after
    (the start of the first, the end of the last, and between tokens that touch without overlap)."""
    wide = [(int(s), int(e)) for s, e in spans if e > s]
    if not wide:
        return set()
    cuts = {wide[0][0], wide[-1][1]}
    reach = wide[0][1]
    for s, e in wide[1:]:
        if reach <= s:  # no overlap with anything before (a hole leaves both of its ends)
            cuts.add(reach)
            cuts.add(s)
        reach = max(reach, e)
    return cuts


def _gaps(n, used):
    out, k = [], 0
    while k < n:
        if used[k]:
            k += 1
            continue
        q = k
        while q < n and not used[q]:
            q += 1
        out.append((k, q))
        k = q
    return out


def _groups(spans, shared):
    """{i: token indices (with a span) lying wholly inside [shared[i], shared[i + 1])}."""
    out: dict[int, list] = {}
    for k, (s, e) in enumerate(spans):
        if e <= s:
            continue
        i = bisect.bisect_right(shared, s) - 1
        if 0 <= i < len(shared) - 1 and e <= shared[i + 1]:
            out.setdefault(i, []).append(k)
    return out


def _tiles(spans, ks, x, y) -> bool:
    """Are the tokens ks consecutive, and do their spans cover [x, y) without a hole?"""
    if not ks or ks[-1] - ks[0] != len(ks) - 1:
        return False
    reach = x
    for k in ks:
        s, e = int(spans[k][0]), int(spans[k][1])
        if s > reach:
            return False
        reach = max(reach, e)
    return reach == y and int(spans[ks[0]][0]) == x


def offset_alignment(t_spans, s_spans):
    """(chunks [(t0, t1, s0, s1)], teacher_gaps [(a, b)], student_gaps [(a, b)]) from each side's token
    byte spans in the same text: between two consecutive positions where both sides can be cut, the
    tokens of each side that lie there form a chunk when both sides have some, they are consecutive
    and they cover those bytes; every other token (zero-width ones included) is in a gap."""
    t_spans = np.asarray(t_spans).reshape(-1, 2).tolist()
    s_spans = np.asarray(s_spans).reshape(-1, 2).tolist()
    shared = sorted(_cuts(t_spans) & _cuts(s_spans))
    gt, gs = _groups(t_spans, shared), _groups(s_spans, shared)
    chunks = []
    used_t, used_s = [False] * len(t_spans), [False] * len(s_spans)
    for i in sorted(gt.keys() & gs.keys()):
        ts, ss, x, y = gt[i], gs[i], shared[i], shared[i + 1]
        if _tiles(t_spans, ts, x, y) and _tiles(s_spans, ss, x, y):
            chunks.append((ts[0], ts[-1] + 1, ss[0], ss[-1] + 1))
            for k in ts:
                used_t[k] = True
            for k in ss:
                used_s[k] = True
    return chunks, _gaps(len(t_spans), used_t), _gaps(len(s_spans), used_s)


def compare_with_offsets(al, ref, t_spans, s_spans) -> list[str]:
    """Problems between `al` (an `Alignment`, or its chunks [n, 4]) and `ref` (`offset_alignment`'s
    result) on the same ids; [] when they agree. They agree when every reference chunk is exactly the
    union of consecutive chunks of `al`, every chunk of `al` lies inside one reference chunk, and
    each extra cut of `al` inside a reference chunk is one the offsets cannot show: the tokens on
    either side of it overlap (share a character) on at least one side. Chunks of `al` made only of
    zero-width tokens (the dummy-prefix spaces that two SentencePiece sides both add, which match each
    other but are not in the text) are ignored."""
    chunks = np.asarray(getattr(al, "chunks", al)).reshape(-1, 4).tolist()
    zt = [e <= s for s, e in np.asarray(t_spans).reshape(-1, 2).tolist()]
    zs = [e <= s for s, e in np.asarray(s_spans).reshape(-1, 2).tolist()]
    chunks = [c for c in chunks if not (all(zt[c[0]:c[1]]) and all(zs[c[2]:c[3]]))]
    ref_chunks = ref[0]
    problems = []
    rt = {k: r for r, c in enumerate(ref_chunks) for k in range(c[0], c[1])}
    rs = {k: r for r, c in enumerate(ref_chunks) for k in range(c[2], c[3])}
    members: dict[int, list] = {}
    for c in chunks:
        owners = {rt.get(k) for k in range(c[0], c[1])} | {rs.get(k) for k in range(c[2], c[3])}
        if len(owners) != 1 or None in owners:
            problems.append(f"xtok chunk {c} is not inside one offset chunk (offset chunks {sorted(owners, key=str)})")
            continue
        members.setdefault(owners.pop(), []).append(c)
    for r, rc in enumerate(ref_chunks):
        got = sorted(members.get(r, []))
        if not got or (got[0][0], got[-1][1], got[0][2], got[-1][3]) != tuple(rc) or any(
                a[1] != b[0] or a[3] != b[2] for a, b in zip(got, got[1:])):
            problems.append(f"offset chunk {tuple(rc)} is not a union of consecutive xtok chunks ({got})")
            continue
        for a, b in zip(got, got[1:]):  # an extra cut: invisible to the offsets on at least one side?
            t_overlap = t_spans[a[1] - 1][1] > t_spans[b[0]][0]
            s_overlap = s_spans[a[3] - 1][1] > s_spans[b[2]][0]
            if not (t_overlap or s_overlap):
                problems.append(f"xtok cuts offset chunk {tuple(rc)} between {a} and {b}, where the offsets can cut "
                                f"on both sides but do not")
    return problems
