"""The aligner against independent pure-Python references.

- `ref_gotoh`: an obviously-correct full 3-matrix affine-gap DP (lists of lists) with the token-boundary
  tie-break kept as (cost, splits, misses) tuples, itself checked against a brute force over every
  matching of tiny inputs; the Numba DP must return the same matching and costs, and the
  anchored/banded pipeline must reach the same optimum.
- `ref_chunks`: chunks built a different way (union-find over tokens joined by matched bytes; a
  component is a chunk iff it is contiguous, clean and on one diagonal); `align` must equal it.
- `check_contract`: the issue's JSON invariants checked from token bytes alone.
- `chat_oracle_chunks`: the ground-truth matching of one conversation under two chat templates;
  `align` must chunk every content byte it chunks.
"""
from __future__ import annotations

import inspect
import json
import re
import textwrap
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ASSETS, MISTRAL_SPM, TEKKEN
from xtok.alignment import (CUT_BOUND, CUT_END, CUT_SPECIAL, FULL_DP_CELLS, Alignment, align, align_arrays,
                            byte_match, dp_match)
from xtok.testing.alignment import (ALL_FLAGS, brute_force_best, check_contract, dummy_eligible, matching_cost,
                                    matching_tiebreak, ref_chunks, ref_flags, ref_gotoh, ref_identity_chunks,
                                    ref_trim, token_spans)
from xtok.tokens import TokenBytes, load_tokenizer

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
    (b" Tell me", b" User: Tell me"), (b"  x", b" x"),
]


def _rand_flags(rng, n, density):
    """Random per-position flags; with density > 0 that share of positions is a plain boundary and
    both ends are boundaries and specials (as in a real stream); density 0: every position random."""
    f = rng.integers(0, 8, n + 1).astype(np.uint8)
    if density:
        f = np.where(rng.random(n + 1) < density, CUT_BOUND | CUT_END, f).astype(np.uint8)
        f[0] = f[n] = ALL_FLAGS
    return f


def _dp_vs_ref(a: bytes, b: bytes, fa=None, fb=None):
    cost, splits, misses, pairs = ref_gotoh(a, b, fa=fa, fb=fb)
    mt, ms, c2, s2, m2 = dp_match(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8), a_flags=fa, b_flags=fb)
    assert (c2, s2, m2) == (cost, splits, misses)
    assert [(i, int(mt[i])) for i in range(len(a)) if mt[i] >= 0] == pairs
    assert [(int(ms[j]), j) for j in range(len(b)) if ms[j] >= 0] == pairs
    assert matching_cost(len(a), len(b), pairs) == cost
    if fa is not None:
        assert matching_tiebreak(len(a), len(b), pairs, fa, fb) == (splits, misses)
    return cost, splits, misses, pairs


@pytest.mark.parametrize("a,b", DP_CASES)
def test_numba_dp_equals_reference(a, b):
    _dp_vs_ref(a, b)
    rng = np.random.default_rng(len(a) * 1000 + len(b))
    for density in (0.0, 0.5):
        _dp_vs_ref(a, b, _rand_flags(rng, len(a), density), _rand_flags(rng, len(b), density))


def test_reference_dp_equals_brute_force():
    """ref_gotoh's (cost, splits, misses) is the minimum over every monotone matching of equal bytes,
    scored by matching_cost/matching_tiebreak straight from the definition; its own pairs score that."""
    rng = np.random.default_rng(7)
    for _ in range(120):
        n, m = (int(x) for x in rng.integers(0, 7, 2))
        a = bytes(rng.integers(97, 100, n).astype(np.uint8))
        b = bytes(rng.integers(97, 100, m).astype(np.uint8))
        fa, fb = _rand_flags(rng, n, 0.0), _rand_flags(rng, m, 0.0)
        cost, splits, misses, pairs = ref_gotoh(a, b, fa=fa, fb=fb)
        assert (cost, splits, misses) == brute_force_best(a, b, fa, fb), (a, b, fa, fb)
        assert (matching_cost(n, m, pairs),) + matching_tiebreak(n, m, pairs, fa, fb) == (cost, splits, misses)


def _span_flags(pieces):
    """Flags of a stream cut into `pieces` (no specials): boundaries; specials at both ends."""
    f = np.zeros(sum(map(len, pieces)) + 1, np.uint8)
    f[np.cumsum([0] + [len(p) for p in pieces])] = CUT_BOUND | CUT_END
    f[0] |= CUT_SPECIAL
    f[-1] |= CUT_SPECIAL
    return f


def test_tie_break_prefers_token_boundaries():
    """Equal edit cost, different splits. 'me'+' me' vs 'me': the boundary-blind DP (gaps as early
    as possible) pairs 'me' with the end of ' me', splitting it and pairing nothing; with token
    boundaries 'me' pairs with 'me'. ' Tell'+' me' vs ' User'+':'+' Tell'+' me' (issue 2's repro):
    the first space goes with ' Tell', not ' User'."""
    for ta, tb, expect in (([b"me", b" me"], [b"me"], [(0, 0), (1, 1)]),
                           ([b" Tell", b" me"], [b" User", b":", b" Tell", b" me"], [(i, i + 6) for i in range(8)])):
        a, b = b"".join(ta), b"".join(tb)
        fa, fb = _span_flags(ta), _span_flags(tb)
        cost0, _, _, pairs0 = ref_gotoh(a, b)
        cost, splits, _, pairs = _dp_vs_ref(a, b, fa, fb)
        assert cost == cost0 and splits == 0 and pairs == expect
        if ta[0] == b"me":
            assert matching_tiebreak(len(a), len(b), pairs0, fa, fb)[0] > 0 and pairs0 != expect
        mt, _ = byte_match(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8), a_flags=fa, b_flags=fb)
        assert [(i, int(mt[i])) for i in range(len(a)) if mt[i] >= 0] == expect


def test_tie_break_prefers_gaps_at_special_tokens():
    """Equal cost and no split either way: content 'US:' then '</s>' + ' \nUser:' + ' Your' (a
    'plain' template) vs 'US:' + '</s>[INST]' + ' Your' ('inst'). The content ':' may pair with
    either ':'; the template text is the gap that sits at the special tokens, so the content ':'s pair."""
    tp = [b"US", b":", None, b" ", b"\n", b"User", b":", b" Your"]
    sp = [b"US", b":", None, None, b" Your"]
    tb, sb = TokenBytes.from_list(tp), TokenBytes.from_list(sp)
    t_ids, s_ids = np.arange(len(tp)), np.arange(len(sp))
    a, b = tb.concat(t_ids), sb.concat(s_ids)
    fa, fb = ref_flags(tb, t_ids, False), ref_flags(sb, s_ids, False)
    blind = ref_gotoh(a, b, fa=fa | CUT_SPECIAL, fb=fb | CUT_SPECIAL)  # no special level
    cost, splits, misses, pairs = _dp_vs_ref(a, b, fa, fb)
    assert blind[0] == cost and blind[1] == splits == 0 and (2, 2) in pairs and (9, 2) in blind[3]
    al = align(tb, sb, t_ids, s_ids)
    check_contract(tb, t_ids, sb, s_ids, al)
    assert [tuple(r) for r in al.chunks.tolist()] == [(0, 1, 0, 1), (1, 2, 1, 2), (7, 8, 4, 5)]


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
    fa, fb = _rand_flags(rng, len(a), 0.3), _rand_flags(rng, len(b), 0.3)
    for flags in ((None, None), (fa, fb)):
        pairs = _dp_vs_ref(a, b, *flags)[3]
        # byte_match on a small input is the same exact DP (no trimming, no anchors)
        mt2, _ = byte_match(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8), a_flags=flags[0], b_flags=flags[1])
        assert [(i, int(mt2[i])) for i in range(len(a)) if mt2[i] >= 0] == pairs


@pytest.mark.parametrize("seed", range(4))
def test_anchored_banded_pipeline_is_optimal_on_real_edits(seed):
    rng = np.random.default_rng(100 + seed)
    src = TEXTS["shakespeare"] if seed % 2 == 0 else TEXTS["stdlib"]
    start = int(rng.integers(0, len(src) - 500))
    s1 = src[start:start + 300]
    s2 = _perturb(rng, s1)
    a, b = s1.encode(), s2.encode()
    cost = ref_gotoh(a, b)[0]
    A, B = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    # force the large-input machinery: anchors + banded regions on a small problem; with word-like
    # token boundaries too (the trims then stop at shared boundaries): the tie-break never costs
    # edit cost, which is independent of the flags
    words = re.compile(rb" ?\w+| ?[^\w\s]+|\s+")
    for fa, fb in ((None, None), (_span_flags(words.findall(a)), _span_flags(words.findall(b)))):
        mt, ms = byte_match(A, B, k=8, full_cells=2_000, half=24, last_full_cells=0, a_flags=fa, b_flags=fb)
        pairs = [(i, int(mt[i])) for i in range(len(a)) if mt[i] >= 0]
        assert all(a[i] == b[j] for i, j in pairs) and all(np.diff([p[1] for p in pairs]) > 0)
        assert all(ms[j] == i for i, j in pairs) and int((ms >= 0).sum()) == len(pairs)
        assert matching_cost(len(a), len(b), pairs) == cost


def test_trim_common_equals_reference():
    """The prefix/suffix trim (`trim_common`: byte_match on whole streams, align_region on a
    region after widening) is ref_trim, on random regions of random streams with random flags,
    and marks exactly those bytes matched on their diagonals."""
    from xtok.alignment.dp import Streams, trim_common as _trim_common

    rng = np.random.default_rng(7)
    for it in range(10_000):
        alph = int(rng.integers(1, 4))
        a = rng.integers(0, alph, int(rng.integers(0, 24))).astype(np.uint8)
        kind = it % 4
        if kind == 0:
            b = a.copy()
        elif kind == 1:
            b = a[:int(rng.integers(0, a.size + 1))] if rng.random() < 0.5 else a[int(rng.integers(0, a.size + 1)):]
        elif kind == 2:
            b = np.insert(a, int(rng.integers(0, a.size + 1)), rng.integers(0, alph, int(rng.integers(0, 4))))
        else:
            b = rng.integers(0, alph, int(rng.integers(0, 24))).astype(np.uint8)
        b = b.astype(np.uint8)
        pa, qa, pb, qb = (int(x) for x in rng.integers(0, 4, 4))  # context outside the region
        A = np.concatenate([rng.integers(0, alph, pa), a, rng.integers(0, alph, qa)]).astype(np.uint8)
        B = np.concatenate([rng.integers(0, alph, pb), b, rng.integers(0, alph, qb)]).astype(np.uint8)
        density = float(rng.random())
        FA, FB = _rand_flags(rng, A.size, density), _rand_flags(rng, B.size, density)
        a0, a1, b0, b1 = pa, pa + a.size, pb, pb + b.size
        want = ref_trim(a.tobytes(), b.tobytes(), FA[a0:a1 + 1], FB[b0:b1 + 1])
        mt, ms = np.full(A.size, -1, np.int64), np.full(B.size, -1, np.int64)
        got = _trim_common(Streams(A, B, FA, FB, mt, ms), a0, a1, b0, b1)
        assert tuple(int(x) for x in got) == want, (a.tolist(), b.tolist(), FA[a0:a1 + 1].tolist(), FB[b0:b1 + 1].tolist())
        p, s = want
        pairs = [(a0 + x, b0 + x) for x in range(p)] + [(a1 - x, b1 - x) for x in range(s, 0, -1)]
        assert [(i, int(mt[i])) for i in range(A.size) if mt[i] >= 0] == pairs
        assert [(int(ms[j]), j) for j in range(B.size) if ms[j] >= 0] == pairs


# --------------------------------------------------------------------------------------------
# tests: chunks vs reference, exact path, real tokenizer pairs
# --------------------------------------------------------------------------------------------


def test_small_real_dp_alignments_equal_reference(all_toks):
    """End to end on short texts that differ between the sides: align's byte matching is the
    reference DP's (token boundaries from ref_flags) and its chunks are ref_chunks of that."""
    spm, tek = all_toks["mistral-spm"], all_toks["tekken"]
    cases = [
        (spm, tek, "Hello world, 12345!", "hello  world 12345!"),
        (tek, spm, "[INST] What is 2+2? [/INST] It is 4.</s>", "<s>User: What is 2+2?\nAssistant: It is 4."),
        (spm, all_toks["trained-wordpiece"], "The king is here, my lord!\r\nDone.", "The king is here, my lord!\r\nDone."),
        (all_toks["trained-unigram"], tek, "the ﬁne king ① e\u0301 x", "the ﬁne king ① e\u0301 x"),
        (tek, spm, "[INST] Tell me", "User: Tell me"),  # issue 2's repro, both ways
        (spm, tek, "User: Tell me", "[INST] Tell me"),
        (spm, tek, "Assistant: Tell me more\nUser: Tell me", "[INST] Tell me more [/INST] Tell me"),
    ]
    for tt, st_, t_text, s_text in cases:
        t_ids, s_ids = tt.encode(t_text), st_.encode(s_text)
        al = _run(tt, st_, t_ids, s_ids)
        a = tt.token_bytes.concat(t_ids)
        b = st_.token_bytes.concat(s_ids)
        if a != b:
            fa = ref_flags(tt.token_bytes, t_ids, tt.prefix_space)
            fb = ref_flags(st_.token_bytes, s_ids, st_.prefix_space)
            pairs = ref_gotoh(a, b, fa=fa, fb=fb)[3]
            mt, _ = byte_match(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8), a_flags=fa, b_flags=fb)
            assert [(i, int(mt[i])) for i in range(len(a)) if mt[i] >= 0] == pairs
            assert al.stats["matched_bytes"] == len(pairs)
        else:
            pairs = [(i, i) for i in range(len(a))]
        expect = ref_chunks(tt.token_bytes, t_ids, st_.token_bytes, s_ids, pairs, tt.prefix_space, st_.prefix_space)
        if al.stats["path"] == "dp":
            assert [tuple(x) for x in al.chunks.tolist()] == expect
        assert len(al.chunks) >= 2


def test_identical_first_word_after_template_is_aligned(all_toks):
    """Issue 2's repro: Tekken '[INST] Tell me' vs SentencePiece 'User: Tell me' (dummy-prefix
    space on ' User'). The identical ' Tell' and ' me' tokens must each be a 1:1 chunk; only the
    template tokens are gaps."""
    tek, spm = all_toks["tekken"], all_toks["mistral-spm"]
    for tt, st_, t_text, s_text in ((tek, spm, "[INST] Tell me", "User: Tell me"),
                                    (spm, tek, "User: Tell me", "[INST] Tell me")):
        t_ids, s_ids = tt.encode(t_text), st_.encode(s_text)
        al = _run(tt, st_, t_ids, s_ids)
        tp = [tt.token_bytes.get(int(i)) if not tt.token_bytes.is_special[i] else None for i in t_ids]
        sp = [st_.token_bytes.get(int(i)) if not st_.token_bytes.is_special[i] else None for i in s_ids]
        for word in (b" Tell", b" me"):
            assert (tp.index(word), tp.index(word) + 1, sp.index(word), sp.index(word) + 1) in \
                [tuple(r) for r in al.chunks.tolist()], (t_text, word, al.chunks.tolist())
        content = {tp.index(b" Tell"), tp.index(b" me")}
        assert {k for g in al.teacher_gaps.tolist() for k in range(*g)} == set(range(len(tp))) - content


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
            fa = ref_flags(tt.token_bytes, t_ids, tt.prefix_space)
            fb = ref_flags(st_.token_bytes, s_ids, st_.prefix_space)
            mt, _ = byte_match(A, B, a_flags=fa, b_flags=fb)
            assert al.stats["matched_bytes"] == int((mt >= 0).sum())
            if len(A) * len(B) <= 9_000_000:
                # the anchored pipeline is as good as the full DP (itself checked against ref_gotoh):
                # the same edit cost and, on these texts, the same tie-break (splits, misses)
                pairs_ = np.flatnonzero(mt >= 0)
                pairs_ = list(zip(pairs_.tolist(), mt[pairs_].tolist()))
                _, _, cost, splits, misses = dp_match(A, B, a_flags=fa, b_flags=fb)
                assert matching_cost(len(A), len(B), pairs_) == cost, name
                assert matching_tiebreak(len(A), len(B), pairs_, fa, fb) == (splits, misses), name


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


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Sum 1234 and 8766, then say café ☕."},
    {"role": "assistant", "content": "10000. Café ☕!"},
    {"role": "user", "content": "Tabs\tand  spaces?"},
    {"role": "assistant", "content": "Kept:\tand  spaces."},
]
CHAT_TELL = [
    {"role": "user", "content": "Tell me a joke about 42 cats."},
    {"role": "assistant", "content": "Cats ignore jokes, 42 times over."},
    {"role": "user", "content": "Tell me why."},
]

def _long_chat():
    """~2.5 kB of real dialogue lines as alternating turns: long enough (> 2^17 DP cells) for the
    anchored path, as in the collator's multi-turn rows."""
    lines = [ln.strip() for ln in TEXTS["shakespeare"].split("\n") if ln.strip()]
    return [{"role": ("user", "assistant")[k % 2], "content": " ".join(lines[2 * k:2 * k + 2])}
            for k in range(len(lines) // 2)]


CHAT_SETS = {"sys": CHAT, "nosys": CHAT[1:], "tell": CHAT_TELL, "long": _long_chat()}


def _content_spans(text: bytes, msgs):
    out, pos = [], 0
    for m in msgs:
        c = m["content"].encode()
        s = text.find(c, pos)
        assert s >= 0, m
        out.append((s, s + len(c)))
        pos = s + len(c)
    return out


def _text_to_stream(tok, r):
    """text byte -> stream byte, for tokens whose bytes are exactly their text span (after dropping
    an eligible dummy-prefix space); normalised tokens map nothing."""
    tb, text, mp = tok.token_bytes, r.text.encode(), {}
    spans, el = token_spans(tb, r.ids), dummy_eligible(tb, r.ids, tok.prefix_space)
    for k, ((c0, _), (o0, o1)) in enumerate(zip(spans, r.offsets.tolist())):
        bts = b"" if tb.is_special[r.ids[k]] else tb.get(int(r.ids[k]))
        if el[k] and bts[1:] == text[o0:o1]:
            bts, c0 = bts[1:], c0 + 1
        if bts == text[o0:o1]:
            mp.update({o0 + d: c0 + d for d in range(o1 - o0)})
    return mp


def chat_oracle_chunks(tt, rt, st_, rs, msgs):
    """Chunks of the ground-truth matching of two renderings of one conversation, built without the
    aligner: message q's content bytes on one side are message q's content bytes on the other,
    extended outward over equal bytes (in the byte streams, so across special tokens) up to the
    neighbouring messages; everything else (template text) unmatched. ref_chunks of that says
    which tokens can be chunked at all: a token merging content with template bytes that differ
    on the other side (e.g. Tekken '.\n\n', SentencePiece ' Sum' after a template's '\n') cannot."""
    A, B = tt.token_bytes.concat(rt.ids), st_.token_bytes.concat(rs.ids)
    ct, cs = _content_spans(rt.text.encode(), msgs), _content_spans(rs.text.encode(), msgs)
    mt_, ms_ = _text_to_stream(tt, rt), _text_to_stream(st_, rs)
    core = [c for c in ([(mt_[t0 + d], ms_[s0 + d]) for d in range(t1 - t0) if t0 + d in mt_ and s0 + d in ms_]
                        for (t0, t1), (s0, _) in zip(ct, cs)) if c]
    # left extensions first (template text right before a message more often matches), each bounded by
    # the previous message's content; then right extensions, bounded by the next message's left one
    left = []
    for q, cur in enumerate(core):
        (x, y), lx, ly, ext = cur[0], *(core[q - 1][-1] if q else (-1, -1)), []
        while x - 1 > lx and y - 1 > ly and A[x - 1] == B[y - 1]:
            x, y = x - 1, y - 1
            ext.append((x, y))
        left.append(ext[::-1])
    pairs = []
    for q, cur in enumerate(core):
        nx, ny = (left[q + 1] or core[q + 1])[0] if q + 1 < len(core) else (len(A), len(B))
        (x, y), ext = cur[-1], []
        while x + 1 < nx and y + 1 < ny and A[x + 1] == B[y + 1]:
            x, y = x + 1, y + 1
            ext.append((x, y))
        pairs += left[q] + cur + ext
    return ref_chunks(tt.token_bytes, rt.ids, st_.token_bytes, rs.ids, pairs, tt.prefix_space, st_.prefix_space)


def _content_in_chunks(r, chunks, lo, hi, spans):
    """bool per rendered-text byte: content bytes held by a chunked token; and the content mask."""
    n = len(r.text.encode())
    cov, content = np.zeros(n, bool), np.zeros(n, bool)
    for row in chunks:
        for k in range(row[lo], row[hi]):
            cov[r.offsets[k, 0]:r.offsets[k, 1]] = True
    for a, b in spans:
        content[a:b] = True
    return cov & content, content


# (teacher, template, student, template, strict): template None = the tokenizer's own (real) one,
# 'chatml-file' = ChatML from a .jinja file. strict: every content byte of every message in a chunk
# (for the conversations without a system message: 'inst' puts it right after BOS and Tekken merges
# its final '.' with the template's '\n\n'); otherwise exactly what the ground truth allows.
CHAT_COMBOS = [
    ("mistral-spm", "plain", "tekken", "inst", True),
    ("tekken", "inst", "mistral-spm", "plain", True),
    ("tekken", "chatml-file", "mistral-spm", "inst", False),
    ("mistral-spm", "chatml-file", "tekken", "inst", False),
    ("mistral-spm", "inst", "tekken", "chatml", False),
    ("tekken", "plain", "trained-bytelevel", "chatml", False),
    ("llama2", None, "tekken", "inst", True),
    ("mistral-spm", "plain", "llama2", None, True),
    ("qwen3", None, "llama3", "chatml-file", False),
    ("qwen3", None, "llama3", "plain", False),
    ("qwen3", None, "llama2", None, False),
    ("qwen3", None, "mistral-spm", "inst", False),
]


@pytest.mark.parametrize("combo", CHAT_COMBOS, ids=["{}-{}~{}-{}".format(*c[:4]) for c in CHAT_COMBOS])
def test_chat_templates_align_all_content(all_toks, combo, tmp_path):
    """The same conversation rendered with two templates: every content byte the ground truth can
    chunk is chunked by align (and, for the strict pairs, that is every content byte)."""
    from xtok.chat import DEFAULT_TEMPLATES, render_chat

    tn, ttpl, sn, stpl, strict = combo
    for n in (tn, sn):
        if n not in all_toks:
            pytest.skip(f"{n} not present")
    tt, st_ = all_toks[tn], all_toks[sn]
    (tmp_path / "chatml.jinja").write_text(DEFAULT_TEMPLATES["chatml"], encoding="utf-8")

    def tpl(t, tok):
        if t is None:
            if not tok.chat_template:
                pytest.skip(f"{tok.name} ships no chat template")
            return None
        return str(tmp_path / "chatml.jinja") if t == "chatml-file" else DEFAULT_TEMPLATES[t]

    for set_name, msgs in CHAT_SETS.items():
        rt, rs = render_chat(tt, msgs, template=tpl(ttpl, tt)), render_chat(st_, msgs, template=tpl(stpl, st_))
        al = _run(tt, st_, rt.ids, rs.ids)
        if set_name == "long":
            assert (len(tt.token_bytes.concat(rt.ids)) + 1) * (len(st_.token_bytes.concat(rs.ids)) + 1) > FULL_DP_CELLS
        oracle = chat_oracle_chunks(tt, rt, st_, rs, msgs)
        ct, cs = _content_spans(rt.text.encode(), msgs), _content_spans(rs.text.encode(), msgs)
        for side, r, lo, hi, spans in (("teacher", rt, 0, 1, ct), ("student", rs, 2, 3, cs)):
            got, content = _content_in_chunks(r, al.chunks, lo, hi, spans)
            can, _ = _content_in_chunks(r, oracle, lo, hi, spans)
            lost = np.flatnonzero(can & ~got)
            assert lost.size == 0, (set_name, side, r.text.encode()[lost[0]:lost[-1] + 1])
            assert can.sum() >= 0.65 * content.sum(), (set_name, side, int(can.sum()), int(content.sum()))
            if strict and set_name != "sys":
                missing = np.flatnonzero(content & ~got)
                assert missing.size == 0, (set_name, side, r.text.encode()[missing[0]:missing[-1] + 1])


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
            # small: align's matching is the reference DP's, tie-break included
            pairs = ref_gotoh(A, B, fa=ref_flags(tt.token_bytes, t_ids, tt.prefix_space),
                                    fb=ref_flags(st_.token_bytes, s_ids, st_.prefix_space))[3]
            assert al.stats["matched_bytes"] == len(pairs)
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
    fa, fb = ref_flags(tb, t_ids, ps_t), ref_flags(sb, s_ids, False)
    pairs = ref_gotoh(A, B, fa=fa, fb=fb)[3]
    assert info[1] == len(pairs)
    assert [tuple(r) for r in c.tolist()] == ref_chunks(tb, t_ids, sb, s_ids, pairs, ps_t, False)
    # forced through the large-input machinery (widened trims, anchors, band): optimal edit cost
    mt, ms = byte_match(np.frombuffer(A, np.uint8), np.frombuffer(B, np.uint8), k=4, full_cells=60, half=3,
                        last_full_cells=0, a_flags=fa, b_flags=fb)
    got = [(i, int(mt[i])) for i in range(len(A)) if mt[i] >= 0]
    assert all(A[i] == B[j] for i, j in got) and all(ms[j] == i for i, j in got) and int((ms >= 0).sum()) == len(got)
    assert all(np.diff([j for _, j in got]) > 0)


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
    with pytest.raises(ValueError, match=r"byte_match\(\): b_flags: expected shape \(4,\)"):
        byte_match(np.zeros(2, np.uint8), np.zeros(3, np.uint8), b_flags=np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match=r"too long for one alignment"):
        dp_match(np.zeros(1, np.uint8), np.zeros(1, np.uint8), go=1 << 58)


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
