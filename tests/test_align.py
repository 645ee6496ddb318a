"""The aligner against independent pure-Python references.

- `ref_gotoh`: an obviously-correct full 3-matrix affine-gap DP (lists of lists); the Numba DP must
  return the same matching and cost, and the anchored/banded pipeline must reach the same optimal cost.
- `ref_chunks`: chunks built a different way (union-find over tokens joined by matched bytes; a
  component is a chunk iff it is contiguous, clean and on one diagonal); `align` must equal it.
- `check_contract`: the issue's JSON invariants checked from token bytes alone.
"""
from __future__ import annotations

import inspect
import json
import textwrap
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ASSETS, MISTRAL_SPM, TEKKEN
from xtok.align import GAP_EXTEND, GAP_OPEN, Alignment, align, align_arrays, byte_match, dp_match
from xtok.tokens import TokenBytes, load_tokenizer

# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------


def ref_gotoh(a: bytes, b: bytes, go=GAP_OPEN, ge=GAP_EXTEND):
    """Full affine-gap DP. States: M (a[i-1] matched to b[j-1], equal bytes only), X (a[i-1]
    unmatched), Y (b[j-1] unmatched). Ties prefer M, then X, then Y. Returns (cost, pairs)."""
    INF = float("inf")
    n, m = len(a), len(b)
    M = [[INF] * (m + 1) for _ in range(n + 1)]
    X = [[INF] * (m + 1) for _ in range(n + 1)]
    Y = [[INF] * (m + 1) for _ in range(n + 1)]
    P = [[(0, 0, 0)] * (m + 1) for _ in range(n + 1)]  # predecessor state of (M, X, Y)
    M[0][0] = 0

    def best(cands):  # first minimum in the order given (M, X, Y)
        k = min(range(3), key=lambda q: (cands[q], q))
        return cands[k], k

    for i in range(n + 1):
        for j in range(m + 1):
            if i == 0 and j == 0:
                continue
            pm = px = py = 0
            if i and j and a[i - 1] == b[j - 1]:
                M[i][j], pm = best([M[i - 1][j - 1], X[i - 1][j - 1], Y[i - 1][j - 1]])
            if i:
                X[i][j], px = best([M[i - 1][j] + go + ge, X[i - 1][j] + ge, Y[i - 1][j] + go + ge])
            if j:
                Y[i][j], py = best([M[i][j - 1] + go + ge, X[i][j - 1] + go + ge, Y[i][j - 1] + ge])
            P[i][j] = (pm, px, py)
    cost, s = best([M[n][m], X[n][m], Y[n][m]])
    pairs, i, j = [], n, m
    while i or j:
        if s == 0:
            pairs.append((i - 1, j - 1))
            s, i, j = P[i][j][0], i - 1, j - 1
        elif s == 1:
            s, i = P[i][j][1], i - 1
        else:
            s, j = P[i][j][2], j - 1
    return cost, pairs[::-1]


def matching_cost(n, m, pairs, go=GAP_OPEN, ge=GAP_EXTEND):
    """Affine cost of the cheapest alignment with exactly these matched pairs."""
    cost, pi, pj = 0, -1, -1
    for i, j in list(pairs) + [(n, m)]:
        for gap in (i - pi - 1, j - pj - 1):
            cost += go + ge * gap if gap else 0
        pi, pj = i, j
    return cost


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


# --------------------------------------------------------------------------------------------
# tokenizers and texts
# --------------------------------------------------------------------------------------------

ASSET_TOKS = ["gpt2", "llama2", "llama3", "qwen3", "bert-minilm", "deepseek-v4", "gemma3"]


def _train_corpus() -> str:
    p = ASSETS / "corpora" / "tinyshakespeare.txt"
    if p.exists():
        return p.read_text(encoding="utf-8")[:120_000]
    return inspect.getsource(json.decoder) + inspect.getsource(textwrap) + inspect.getsource(inspect)[:60_000]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Byte-level BPE (GPT-2 map), WordPiece and Unigram trained on the corpus at test time."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    text = _train_corpus()
    it = [text[i:i + 1000] for i in range(0, len(text), 1000)]
    d = tmp_path_factory.mktemp("trained")
    bl = HF(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    bl.train_from_iterator(it, trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>"],
                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                   show_progress=False))
    wp = HF(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(it, trainers.WordPieceTrainer(vocab_size=800, special_tokens=["[UNK]", "[CLS]", "[SEP]"],
                                                         show_progress=False))
    ug = HF(models.Unigram())
    ug.normalizer = normalizers.NFKC()
    ug.pre_tokenizer = pre_tokenizers.Metaspace()
    ug.decoder = decoders.Metaspace()
    ug.train_from_iterator(it[:25], trainers.UnigramTrainer(vocab_size=400, special_tokens=["<unk>"], unk_token="<unk>",
                                                            show_progress=False))
    out = {}
    for name, t in (("trained-bytelevel", bl), ("trained-wordpiece", wp), ("trained-unigram", ug)):
        t.save(str(d / f"{name}.json"))
        out[name] = load_tokenizer(d / f"{name}.json")
    return out


@lru_cache(maxsize=None)
def _asset_tok(name):
    p = ASSETS / "tokenizers" / name
    return load_tokenizer(p) if p.exists() else None


@pytest.fixture(scope="session")
def all_toks(trained):
    toks = {"mistral-spm": load_tokenizer(MISTRAL_SPM), "tekken": load_tokenizer(TEKKEN), **trained}
    for n in ASSET_TOKS:
        t = _asset_tok(n)
        if t is not None:
            toks[n] = t
    return toks


EDGE = (
    "Tabs\tand   runs of spaces   \n\n\n  indented\r\nCRLF line\r\n"
    "digits 3141592653589793238462643383279 and 1,000,000.50 and 2024-11-24\n"
    "CJK 日本語のテキスト、中文文本，한국어 텍스트. Emoji 👍🏽 👨‍👩‍👧 🇫🇷 ✨\n"
    "combining: e\u0301 a\u0308 n\u0303 (NFD) vs é ä ñ (NFC); ligature ﬁ, fullwidth ＡＢＣ１２３, ① ™ ½\n"
    "Khmer ព្រះរាជាណាចក្រ, Cyrillic Привет мир, Greek Ωμέγα, Arabic مرحبا\n"
    "code: def f(x):\n\treturn x**2  # comment\n    if a != b: print(f'{a!r}')\n"
)


def _multilingual() -> str:
    parts = []
    for f in ("ja_wagahaiwa_nekodearu.txt", "de_stanford_wikipedia.txt", "cjk_euc_kr-utf8.txt", "cjk_gb18030-utf8.txt"):
        p = ASSETS / "corpora" / "multilingual" / f
        if p.exists():
            parts.append(p.read_text(encoding="utf-8", errors="replace")[:600])
    return "\n".join(parts) + "\n" + EDGE


def _texts():
    shakes = ASSETS / "corpora" / "tinyshakespeare.txt"
    sh = shakes.read_text(encoding="utf-8")[50_000:52_500] if shakes.exists() else inspect.getsource(json.encoder)[:2500]
    py = inspect.getsource(textwrap)[:2500]
    return {"shakespeare": sh, "stdlib": py, "multilingual": _multilingual()}


TEXTS = _texts()
TOK_NAMES = ["mistral-spm", "tekken", "trained-bytelevel", "trained-wordpiece", "trained-unigram"] + ASSET_TOKS
PAIRS = [(a, b) for i, a in enumerate(TOK_NAMES) for b in TOK_NAMES[i + 1:]]


def _run(tt, st_, t_ids, s_ids):
    al = align(tt, st_, t_ids, s_ids)
    check_contract(tt.token_bytes, t_ids, st_.token_bytes, s_ids, al, tt.prefix_space, st_.prefix_space)
    return al


# --------------------------------------------------------------------------------------------
# tests: DP core vs reference
# --------------------------------------------------------------------------------------------

DP_CASES = [
    (b"", b""), (b"abc", b""), (b"", b"xyz"), (b"abc", b"abc"), (b" Hello", b"Hello"),
    (b"aaaa", b"aa"), (b"a  b", b"a b"), (b"kitten", b"sitting"), (b"<s>[INST] Hi", b"<|im_start|>user\nHi"),
    (b"12345678", b"1234 5678"), (b"The cat sat.", b"the cat  sat ."), (b"xAyBzC", b"AABBCC"),
]


@pytest.mark.parametrize("a,b", DP_CASES)
def test_numba_dp_equals_reference(a, b):
    cost, pairs = ref_gotoh(a, b)
    mt, ms, c2 = dp_match(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))
    assert c2 == cost
    assert [(i, int(mt[i])) for i in range(len(a)) if mt[i] >= 0] == pairs
    assert [(int(ms[j]), j) for j in range(len(b)) if ms[j] >= 0] == pairs
    assert matching_cost(len(a), len(b), pairs) == cost


def _perturb(rng, s: str) -> str:
    words = s.split(" ")
    out = []
    for w in words:
        r = rng.random()
        if r < 0.06:
            continue
        if r < 0.12:
            out.append(w.upper())
        elif r < 0.18:
            out.append("<|x|>" + w)
        else:
            out.append(w)
    return " ".join(out).replace("\n", "\r\n", 3)


@pytest.mark.parametrize("seed", range(6))
def test_random_dp_equals_reference(seed):
    rng = np.random.default_rng(seed)
    a = bytes(rng.integers(97, 101, int(rng.integers(1, 60))).astype(np.uint8))
    b = bytes(rng.integers(97, 101, int(rng.integers(1, 60))).astype(np.uint8))
    cost, pairs = ref_gotoh(a, b)
    mt, _, c2 = dp_match(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))
    assert c2 == cost and [(i, int(mt[i])) for i in range(len(a)) if mt[i] >= 0] == pairs
    # the trimmed/anchored pipeline reaches the optimal cost too
    mt2, _ = byte_match(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))
    assert matching_cost(len(a), len(b), [(i, int(mt2[i])) for i in range(len(a)) if mt2[i] >= 0]) == cost


@pytest.mark.parametrize("seed", range(4))
def test_anchored_banded_pipeline_is_optimal_on_real_edits(seed):
    rng = np.random.default_rng(100 + seed)
    src = TEXTS["shakespeare"] if seed % 2 == 0 else TEXTS["stdlib"]
    start = int(rng.integers(0, len(src) - 500))
    s1 = src[start:start + 300]
    s2 = _perturb(rng, s1)
    a, b = s1.encode(), s2.encode()
    cost, _ = ref_gotoh(a, b)
    A, B = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    # force the large-input machinery: anchors + banded regions on a small problem
    mt, ms = byte_match(A, B, k=8, full_cells=2_000, half=24, last_full_cells=0)
    pairs = [(i, int(mt[i])) for i in range(len(a)) if mt[i] >= 0]
    assert all(a[i] == b[j] for i, j in pairs) and all(np.diff([p[1] for p in pairs]) > 0)
    assert all(ms[j] == i for i, j in pairs) and int((ms >= 0).sum()) == len(pairs)
    assert matching_cost(len(a), len(b), pairs) == cost


# --------------------------------------------------------------------------------------------
# tests: chunks vs reference, exact path, real tokenizer pairs
# --------------------------------------------------------------------------------------------


def test_small_real_dp_alignments_equal_reference(all_toks):
    """End to end on short texts that differ between the sides: align == ref_chunks(ref matching)."""
    spm, tek = all_toks["mistral-spm"], all_toks["tekken"]
    cases = [
        (spm, tek, "Hello world, 12345!", "hello  world 12345!"),
        (tek, spm, "[INST] What is 2+2? [/INST] It is 4.</s>", "<s>User: What is 2+2?\nAssistant: It is 4."),
        (spm, all_toks["trained-wordpiece"], "The king is here, my lord!\r\nDone.", "The king is here, my lord!\r\nDone."),
        (all_toks["trained-unigram"], tek, "the ﬁne king ① e\u0301 x", "the ﬁne king ① e\u0301 x"),
    ]
    for tt, st_, t_text, s_text in cases:
        t_ids, s_ids = tt.encode(t_text), st_.encode(s_text)
        al = _run(tt, st_, t_ids, s_ids)
        a = tt.token_bytes.concat(t_ids)
        b = st_.token_bytes.concat(s_ids)
        mt, _ = byte_match(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))
        if a != b:
            cost, _ = ref_gotoh(a, b)
            pairs = [(i, int(mt[i])) for i in range(len(a)) if mt[i] >= 0]
            assert matching_cost(len(a), len(b), pairs) == cost
        else:
            pairs = [(i, i) for i in range(len(a))]
        expect = ref_chunks(tt.token_bytes, t_ids, st_.token_bytes, s_ids, pairs, tt.prefix_space, st_.prefix_space)
        if al.stats["path"] == "dp":
            assert [tuple(x) for x in al.chunks.tolist()] == expect
        assert len(al.chunks) >= 3


@pytest.mark.parametrize("pair", PAIRS, ids=[f"{a}~{b}" for a, b in PAIRS])
def test_real_pairs(all_toks, pair):
    a, b = pair
    if a not in all_toks or b not in all_toks:
        pytest.skip(f"{a if a not in all_toks else b} not present")
    tt, st_ = all_toks[a], all_toks[b]
    for name, text in TEXTS.items():
        t_ids, s_ids = _enc(tt, text), _enc(st_, text)
        al = _run(tt, st_, t_ids, s_ids)
        rev = _run(st_, tt, s_ids, t_ids)
        if al.stats["path"] == "exact":  # swapping roles swaps the columns (the DP's tie-breaks are not symmetric)
            assert np.array_equal(rev.chunks, al.chunks[:, [2, 3, 0, 1]]), name
            assert np.array_equal(rev.teacher_gaps, al.student_gaps) and np.array_equal(rev.student_gaps, al.teacher_gaps)
        expect = ref_identity_chunks(tt.token_bytes, t_ids, st_.token_bytes, s_ids, tt.prefix_space, st_.prefix_space)
        if expect is not None:  # equal streams: exact path, every token with bytes chunked
            expect, empty_t = expect
            assert al.stats["path"] == "exact"
            assert [tuple(r) for r in al.chunks.tolist()] == expect, name
            assert {k for g in al.teacher_gaps.tolist() for k in range(*g)} == empty_t
        else:
            assert al.stats["path"] == "dp"
            A = np.frombuffer(tt.token_bytes.concat(t_ids), np.uint8)
            B = np.frombuffer(st_.token_bytes.concat(s_ids), np.uint8)
            mt, _ = byte_match(A, B)
            assert al.stats["matched_bytes"] == int((mt >= 0).sum())
            if len(A) * len(B) <= 9_000_000:
                # the anchored pipeline is as good as the full DP (itself checked against ref_gotoh)
                pairs_ = np.flatnonzero(mt >= 0)
                assert matching_cost(len(A), len(B), zip(pairs_.tolist(), mt[pairs_].tolist())) == \
                    dp_match(A, B)[2], name


_ENC: dict = {}


def _enc(tok, text):
    key = (id(tok), text)
    if key not in _ENC:
        _ENC[key] = tok.encode(text)
    return _ENC[key]


def test_byte_exact_tokenizers_lose_nothing(all_toks):
    """Tokenizers that do not normalise reproduce the text: every text token lands in a chunk."""
    exact = [n for n in ("mistral-spm", "tekken", "trained-bytelevel", "gpt2", "llama3", "deepseek-v4") if n in all_toks]
    for text in TEXTS.values():
        for i, a in enumerate(exact):
            for b in exact[i + 1:]:
                tt, st_ = all_toks[a], all_toks[b]
                t_ids, s_ids = _enc(tt, text), _enc(st_, text)
                al = _run(tt, st_, t_ids, s_ids)
                assert al.stats["path"] == "exact", (a, b)
                # only a token that is nothing but a dummy-prefix space may be left over
                for tok, ids, gaps in ((tt, t_ids, al.teacher_gaps), (st_, s_ids, al.student_gaps)):
                    el = dummy_eligible(tok.token_bytes, ids, tok.prefix_space)
                    for k in (k for g in gaps.tolist() for k in range(*g)):
                        assert el[k] and tok.token_bytes.get(int(ids[k])) == b" ", (a, b, k)


def test_prefix_space_bos_eos_one_side(all_toks):
    spm, tek = all_toks["mistral-spm"], all_toks["tekken"]
    text = "Hello world 1234567 digits"
    t_ids = np.concatenate([[spm.bos_id], spm.encode(text), [spm.eos_id]])
    s_ids = tek.encode(text)
    al = _run(spm, tek, t_ids, s_ids)
    assert al.teacher_gaps.tolist() == [[0, 1], [len(t_ids) - 1, len(t_ids)]]
    assert al.student_gaps.tolist() == []
    assert al.chunks[0].tolist()[:3] == [1, 2, 0]  # " Hello" (dummy space) <-> "Hello"


def test_digits_split_differently_are_not_lost(all_toks):
    """One-per-digit on one side (SentencePiece) vs grouped (Tekken): no digit token dropped."""
    spm = all_toks["mistral-spm"]
    text = "x 98765432109876543210 y 0000111122223333"
    for name in ("tekken", "llama3", "deepseek-v4", "gpt2"):
        if name not in all_toks:
            continue
        tok = all_toks[name]
        s_ids = tok.encode(text)
        al = _run(spm, tok, spm.encode(text), s_ids)
        assert al.stats["teacher_gap_tokens"] == 0 and al.stats["student_gap_tokens"] == 0
        multi_digit = [k for k, i in enumerate(s_ids) if len(tok.token_bytes.get(int(i)).strip()) > 1
                       and tok.token_bytes.get(int(i)).strip().isdigit()]
        many = {r[2] for r in al.chunks.tolist() if r[1] - r[0] > 1}
        assert set(multi_digit) <= many, name  # each grouped-digit token is a many:1 chunk


def test_chat_templates_align_all_content(all_toks):
    from xtok.chat import DEFAULT_TEMPLATES, render_chat

    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Sum 1234 and 8766, then say café ☕."},
        {"role": "assistant", "content": "10000. Café ☕!"},
        {"role": "user", "content": "Tabs\tand  spaces?"},
        {"role": "assistant", "content": "Kept:\tand  spaces."},
    ]
    combos = [(all_toks["mistral-spm"], DEFAULT_TEMPLATES["inst"], all_toks["tekken"], DEFAULT_TEMPLATES["chatml"]),
              (all_toks["tekken"], DEFAULT_TEMPLATES["plain"], all_toks["trained-bytelevel"], DEFAULT_TEMPLATES["chatml"])]
    if "qwen3" in all_toks:
        combos.append((all_toks["qwen3"], None, all_toks["mistral-spm"], DEFAULT_TEMPLATES["inst"]))
    for tt, ttpl, st_, stpl in combos:
        rt, rs = render_chat(tt, msgs, template=ttpl), render_chat(st_, msgs, template=stpl)
        al = _run(tt, st_, rt.ids, rs.ids)
        for r, tok, lo, hi in ((rt, tt, 0, 1), (rs, st_, 2, 3)):
            in_chunk = np.zeros(len(r.ids), bool)
            for row in al.chunks:
                in_chunk[row[lo]:row[hi]] = True
            tb = r.text.encode()
            pos = 0
            for m in msgs:
                c = m["content"].encode()
                s = tb.find(c, pos)
                assert s >= 0
                pos = s + len(c)
                inside = np.flatnonzero((r.offsets[:, 0] >= s) & (r.offsets[:, 1] <= s + len(c)))
                # all content is chunked except where the first/last word merges with template text
                # (a token holding template bytes drags the tokens it overlaps on the other side)
                words = c.split()
                edge = len(words[0]) + len(words[-1]) + 2
                covered = sum(int(r.offsets[k, 1] - r.offsets[k, 0]) for k in inside if in_chunk[k])
                assert covered >= len(c) - edge, (tok.name, m["content"])
                mid = inside[(r.offsets[inside, 0] >= s + len(words[0]) + 1) &
                             (r.offsets[inside, 1] <= s + len(c) - len(words[-1]) - 1)]
                assert in_chunk[mid].all(), (tok.name, m["content"])


# --------------------------------------------------------------------------------------------
# fuzzing
# --------------------------------------------------------------------------------------------

_ALPHABET = st.characters(blacklist_categories=("Cs",), max_codepoint=0x1FAFF)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=_ALPHABET, max_size=60), text2=st.text(alphabet=_ALPHABET, max_size=20),
       cut=st.integers(0, 60))
def test_fuzz_unicode(all_toks, text, text2, cut):
    spm, tek, wp = all_toks["mistral-spm"], all_toks["tekken"], all_toks["trained-wordpiece"]
    edited = text[:cut] + text2 + text[cut + 3:]
    for tt, st_, a, b in ((spm, tek, text, text), (tek, spm, text, edited), (wp, tek, text, edited)):
        t_ids, s_ids = tt.encode(a), st_.encode(b)
        al = _run(tt, st_, t_ids, s_ids)
        A, B = tt.token_bytes.concat(t_ids), st_.token_bytes.concat(s_ids)
        if al.stats["path"] == "dp" and len(A) * len(B) < 20_000:
            mt, _ = byte_match(np.frombuffer(A, np.uint8), np.frombuffer(B, np.uint8))
            pairs = [(i, int(mt[i])) for i in range(len(A)) if mt[i] >= 0]
            assert matching_cost(len(A), len(B), pairs) == ref_gotoh(A, B)[0]
            assert [tuple(x) for x in al.chunks.tolist()] == ref_chunks(
                tt.token_bytes, t_ids, st_.token_bytes, s_ids, pairs, tt.prefix_space, st_.prefix_space)


def _segment(data: bytes, cuts, specials_at, prefix):
    """A random tokenisation of `data`: pieces between cuts, special (None) tokens inserted."""
    bounds = sorted({0, len(data), *[c for c in cuts if 0 < c < len(data)]})
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    for k in sorted(specials_at, reverse=True):
        pieces.insert(min(k, len(pieces)), None)
    if prefix and pieces and pieces[0]:
        pieces[0] = b" " + pieces[0]
    return pieces


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=40), edit=st.binary(max_size=6), at=st.integers(0, 40),
       cut_t=st.lists(st.integers(0, 40), max_size=20), cut_s=st.lists(st.integers(0, 40), max_size=20),
       sp_t=st.lists(st.integers(0, 20), max_size=3), sp_s=st.lists(st.integers(0, 20), max_size=3),
       ps_t=st.booleans(), do_edit=st.booleans())
def test_fuzz_segmentations(data, edit, at, cut_t, cut_s, sp_t, sp_s, ps_t, do_edit):
    """Random segmentations (with specials, a dummy prefix, an edit) of random bytes: align equals
    the union-find reference on the DP matching, or on the identity when the streams are equal."""
    other = data[:at] + edit + data[at + 2:] if do_edit else data
    tp, sp_ = _segment(data, cut_t, sp_t, ps_t), _segment(other, cut_s, sp_s, False)
    tb, sb = TokenBytes.from_list(tp), TokenBytes.from_list(sp_)
    t_ids, s_ids = np.arange(len(tp)), np.arange(len(sp_))
    c, tg, sg, info = align_arrays(tb.data, tb.offsets, tb.is_special, sb.data, sb.offsets, sb.is_special,
                                   t_ids, s_ids, ps_t, False)
    al = Alignment(c, tg, sg)
    check_contract(tb, t_ids, sb, s_ids, al, ps_t, False)
    ident = ref_identity_chunks(tb, t_ids, sb, s_ids, ps_t, False)
    if ident is not None:
        assert info[0] == "exact" and [tuple(r) for r in c.tolist()] == ident[0]
        return
    A, B = tb.concat(t_ids), sb.concat(s_ids)
    mt, _ = byte_match(np.frombuffer(A, np.uint8), np.frombuffer(B, np.uint8))
    pairs = [(i, int(mt[i])) for i in range(len(A)) if mt[i] >= 0]
    assert matching_cost(len(A), len(B), pairs) == ref_gotoh(A, B)[0]
    assert [tuple(r) for r in c.tolist()] == ref_chunks(tb, t_ids, sb, s_ids, pairs, ps_t, False)


# --------------------------------------------------------------------------------------------
# API details, errors, CLI
# --------------------------------------------------------------------------------------------


def test_bulk_arrays_and_token_bytes_inputs(all_toks):
    spm, tek = all_toks["mistral-spm"], all_toks["tekken"]
    text = TEXTS["shakespeare"][:800]
    t_ids, s_ids = spm.encode(text), tek.encode(text)
    al = align(spm, tek, t_ids, s_ids)
    tb, sb = spm.token_bytes, tek.token_bytes
    c, tg, sg, info = align_arrays(tb.data, tb.offsets, tb.is_special, sb.data, sb.offsets, sb.is_special,
                                   t_ids, s_ids, True, False)
    assert np.array_equal(c, al.chunks) and np.array_equal(tg, al.teacher_gaps) and info[0] == "exact"
    # TokenBytes carry no prefix_space: the dummy space is then plain unmatched text -> DP path
    al2 = align(tb, sb, list(map(int, t_ids)), s_ids)
    check_contract(tb, t_ids, sb, s_ids, al2)
    assert al2.stats["path"] == "dp" and al2.teacher_gaps.tolist() == [[0, 1]]


def test_empty_and_all_special():
    tb = TokenBytes.from_list([None, b"a", b"b", b"ab"])
    al = align(tb, tb, [], [])
    assert al.chunks.shape == (0, 4) and al.teacher_gaps.shape == (0, 2)
    al = align(tb, tb, [0, 0], [3])
    assert al.teacher_gaps.tolist() == [[0, 2]] and al.student_gaps.tolist() == [[0, 1]]
    al = align(tb, tb, [1, 0, 2], [3])  # a special inside what would be a chunk: never paired
    check_contract(tb, [1, 0, 2], tb, [3], al)
    assert al.chunks.shape[0] == 0


def test_bad_input_errors(all_toks):
    spm = all_toks["mistral-spm"]
    with pytest.raises(ValueError, match="teacher_ids contains id -100"):
        align(spm, spm, [1, -100], [1])
    with pytest.raises(ValueError, match="student_ids contains id 99999999"):
        align(spm, spm, [1], [99999999])
    with pytest.raises(ValueError, match="1-D"):
        align(spm, spm, [[1]], [1])
    tb = spm.token_bytes
    with pytest.raises(ValueError, match="student_ids has ids outside"):
        align_arrays(tb.data, tb.offsets, tb.is_special, tb.data, tb.offsets, tb.is_special, [1], [5, -100])
    with pytest.raises(TypeError, match="teacher must be"):
        align("gpt2", spm, [1], [1])


def test_cli_json_and_view(tmp_path):
    from click.testing import CliRunner

    from xtok.cli import main

    f = tmp_path / "t.txt"
    f.write_text("Hello  world!\n\tCafé 1234567 日本語 👍🏽\n", encoding="utf-8")
    r = CliRunner().invoke(main, ["align", "--teacher", MISTRAL_SPM, "--student", TEKKEN, str(f), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert list(d) == ["teacher_ids", "student_ids", "chunks", "teacher_gaps", "student_gaps"]
    spm, tek = load_tokenizer(MISTRAL_SPM), load_tokenizer(TEKKEN)
    assert d["teacher_ids"] == spm.encode(f.read_text(encoding="utf-8")).tolist()
    al = Alignment(np.array(d["chunks"], np.int32).reshape(-1, 4), np.array(d["teacher_gaps"], np.int32).reshape(-1, 2),
                   np.array(d["student_gaps"], np.int32).reshape(-1, 2))
    check_contract(spm.token_bytes, d["teacher_ids"], tek.token_bytes, d["student_ids"], al, True, False)
    r = CliRunner().invoke(main, ["align", "-t", MISTRAL_SPM, "-s", TEKKEN, str(f)])
    assert r.exit_code == 0 and "1:1" in r.output and "tokens/s" in r.output and "chunks:" in r.output


def test_cli_chat_and_errors(tmp_path):
    from click.testing import CliRunner

    from xtok.cli import main

    msgs = [{"role": "user", "content": "Hi there, 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    f = tmp_path / "c.json"
    f.write_text(json.dumps(msgs), encoding="utf-8")
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}", encoding="utf-8")
    r = CliRunner().invoke(main, ["align", "-t", MISTRAL_SPM, "-s", TEKKEN, str(f), "--chat", "--json",
                                  "--student-template", str(tpl)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    tek = load_tokenizer(TEKKEN)
    assert tek.token_bytes.concat(d["student_ids"]).decode() == "<<user>> Hi there, 2+2?\n<<assistant>> It is 4.\n"
    runner = CliRunner()
    cases = [
        (["-t", "/nonexistent/tok", "-s", TEKKEN, str(f)], "/nonexistent/tok"),
        (["-t", MISTRAL_SPM, "-s", TEKKEN, str(tmp_path / "missing.txt")], "missing.txt"),
        (["-t", MISTRAL_SPM, "-s", TEKKEN, str(tpl), "--chat"], "JSON list of messages"),
        (["-t", MISTRAL_SPM, "-s", TEKKEN, str(f), "--student-template", str(tpl)], "need --chat"),
    ]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "user"}]', encoding="utf-8")
    cases.append((["-t", MISTRAL_SPM, "-s", TEKKEN, str(bad), "--chat"], "content"))
    for args, needle in cases:
        r = runner.invoke(main, ["align", *args])
        assert r.exit_code != 0 and needle in r.output, (args, r.output)
        assert "Traceback" not in r.output and not isinstance(r.exception, (TypeError, KeyError, AttributeError))
