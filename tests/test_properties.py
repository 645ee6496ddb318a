"""Property-based tests (hypothesis, derandomized: the same examples on every run).

1. `align` on random Unicode text (lone surrogates removed; combining marks, long space runs, special
   token strings, CJK, emoji, CRLF) through real tokenizer pairs: the mistral-common ones always, and
   gpt2 / llama2 / llama3 / qwen3 / gemma3 / mistral / deepseek-v4 / bert from ../shared/assets when
   present. The two sides get the same text, or an edited copy (case, CRLF, a chat-template wrapper, a
   cut). `align` never raises and its output always satisfies the documented contract
   (`xtok.testing.alignment.check_contract`, docs/alignment.md); on the exact path its chunks are the
   union-find reference's on the identity; a small DP case equals the pure-Python reference DP's.
2. A second, independent reference (`xtok.testing.offsets`): for texts that both tokenizer libraries
   reproduce exactly, `align`'s chunks are the ones the libraries' own token offsets give.
3. Damaged files: random byte damage (flips, truncation, appended garbage) to a projection file (W)
   and to a teacher store's shard / manifest never produces a traceback of another type or a silently
   different value: loading and reading either return exactly the original values or raise
   `ProjectionError` / `StoreError` naming the damaged file.
"""
from __future__ import annotations

import functools
import shutil
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from xtok.alignment import align, align_arrays
from xtok.testing.alignment import check_contract, ref_chunks, ref_flags, ref_gotoh, ref_identity_chunks
from xtok.testing.assets import ASSETS, MISTRAL_SPM, TEKKEN
from xtok.testing.offsets import compare_with_offsets, library_encode, offset_alignment
from xtok.tokens import load_tokenizer

SETTINGS = dict(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# ------------------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------------------

_ASSET_TOKENIZERS = ("gpt2", "llama2", "llama3", "qwen3", "gemma3", "mistral", "deepseek-v4", "bert-minilm")
TOKENIZERS = [MISTRAL_SPM, TEKKEN] + [str(ASSETS / "tokenizers" / n) for n in _ASSET_TOKENIZERS
                                      if (ASSETS / "tokenizers" / n).exists()]
# normalising tokenizers (lower-casing, accent stripping): never reproduce arbitrary text
_NORMALISING = ("bert-minilm",)
OFFSET_TOKENIZERS = [t for t in TOKENIZERS if not t.endswith(_NORMALISING)]


@functools.lru_cache(maxsize=None)
def tok(spec):
    return load_tokenizer(spec)


def _name(spec):
    return spec.rsplit("/", 1)[-1].rsplit(":", 1)[-1]


# ------------------------------------------------------------------------------------------------
# texts
# ------------------------------------------------------------------------------------------------

SPECIAL_STRINGS = ["<s>", "</s>", "<unk>", "[INST]", "[/INST]", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
                   "<|begin_of_text|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "[CLS]", "[SEP]",
                   "<pad>", "<think>", "</think>"]
WORDS = ["the", " king", "Hello", " world", "café", "naïve", "日本語", "テキスト", "中文", "한국어", "Ελληνικά",
         "русский", "العربية", "😀", "🧬", "👩‍👩‍👧", "ﬁ", "①", "Ⅻ", "ｶﾀｶﾅ", "e\u0301", "Å", "ß", "İ", "١٢٣",
         "12345", "3.14", "def f(x):", "    return x", "{'a': [1, 2]}", "http://x.y/z?q=1", "\\n", "```"]
SPACES = [" ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2009", "\u200b", "\ufeff"]


def _no_surrogates(s: str) -> str:
    return "".join(c for c in s if not 0xD800 <= ord(c) <= 0xDFFF)


def segments(specials: bool):
    parts = [
        st.text(st.characters(), max_size=10).map(_no_surrogates),                      # any code point
        st.text(st.characters(categories=("Mn", "Mc", "Me")), min_size=1, max_size=4),  # combining marks
        st.builds(lambda c, n: c * n, st.sampled_from(SPACES), st.integers(1, 120)),    # (long) space runs
        st.sampled_from(WORDS),
        st.text(st.sampled_from("abcdefghij ABC.,;:!?'\"-_()"), min_size=1, max_size=20),
    ]
    if specials:
        parts.append(st.sampled_from(SPECIAL_STRINGS))
    return st.one_of(*parts)


def texts(specials: bool, max_parts=14):
    return st.lists(segments(specials), max_size=max_parts).map("".join)


def _edit(text: str, how: str, at: int) -> str:
    if how == "same":
        return text
    if how == "upper":
        return text.upper()
    if how == "crlf":
        return text.replace("\n", "\r\n")
    if how == "template":
        return "<|im_start|>user\n" + text + "<|im_end|>\n<|im_start|>assistant\n"
    if how == "nfkc":
        return unicodedata.normalize("NFKC", text)
    at = at % (len(text) + 1)
    return text[:at] + text[at + 5:]  # "cut"


# ------------------------------------------------------------------------------------------------
# 1. align never crashes; its output satisfies the contract
# ------------------------------------------------------------------------------------------------


@settings(max_examples=300, **SETTINGS)
@given(t=st.sampled_from(TOKENIZERS), s=st.sampled_from(TOKENIZERS), text=texts(specials=True),
       how=st.sampled_from(["same", "same", "upper", "crlf", "template", "nfkc", "cut"]), at=st.integers(0, 400),
       bos_t=st.booleans(), bos_s=st.booleans())
def test_align_contract_on_random_text(t, s, text, how, at, bos_t, bos_s):
    T, S = tok(t), tok(s)
    s_text = _edit(text, how, at)
    t_ids = T.encode(text, add_special_tokens=bos_t)
    s_ids = S.encode(s_text, add_special_tokens=bos_s)
    note(f"{_name(t)} -> {_name(s)}: {text!r} / {s_text!r}")
    al = align(T, S, t_ids, s_ids)
    check_contract(T.token_bytes, t_ids, S.token_bytes, s_ids, al, T.prefix_space, S.prefix_space)
    # the same from the bulk entry point
    tb, sb = T.token_bytes, S.token_bytes
    c, tg, sg, info = align_arrays(tb.data, tb.offsets, tb.is_special, sb.data, sb.offsets, sb.is_special,
                                   t_ids, s_ids, T.prefix_space, S.prefix_space)
    assert np.array_equal(c, al.chunks) and np.array_equal(tg, al.teacher_gaps)
    assert np.array_equal(sg, al.student_gaps) and info[0] == al.stats["path"]
    chunks = [tuple(x) for x in al.chunks.tolist()]
    event(f"path {al.stats['path']}")
    if al.stats["path"] == "exact":
        ident = ref_identity_chunks(tb, t_ids, sb, s_ids, T.prefix_space, S.prefix_space)
        assert ident is not None and chunks == ident[0]
        return
    A, B = tb.concat(t_ids), sb.concat(s_ids)
    if len(A) * len(B) <= 6_000:  # small: align's matching is the pure-Python reference DP's
        event("dp path checked against the reference DP")
        pairs = ref_gotoh(A, B, fa=ref_flags(tb, t_ids, T.prefix_space), fb=ref_flags(sb, s_ids, S.prefix_space))[3]
        assert al.stats["matched_bytes"] == len(pairs)
        assert chunks == ref_chunks(tb, t_ids, sb, s_ids, pairs, T.prefix_space, S.prefix_space)


# ------------------------------------------------------------------------------------------------
# 2. the independent reference: chunks from the libraries' own token offsets
# ------------------------------------------------------------------------------------------------


@settings(max_examples=250, **SETTINGS)
@given(t=st.sampled_from(OFFSET_TOKENIZERS), s=st.sampled_from(OFFSET_TOKENIZERS), text=texts(specials=False))
def test_align_equals_library_offsets(t, s, text):
    """Texts both tokenizers reproduce (NFC first: Qwen's normaliser): `align` on the libraries' ids
    has the chunks that the libraries' token offsets give (`xtok.testing.offsets`)."""
    text = unicodedata.normalize("NFC", text)
    T, S = tok(t), tok(s)
    rt, rs = library_encode(T, text), library_encode(S, text)
    note(f"{_name(t)} -> {_name(s)}: {text!r}")
    assume(rt is not None and rs is not None)
    al = align(T, S, rt[0], rs[0])
    event(f"path {al.stats['path']}")
    ref = offset_alignment(rt[1], rs[1])
    problems = compare_with_offsets(al, ref, rt[1], rs[1])
    assert not problems, (al.stats["path"], problems[:3])


def test_offset_reference_sees_wrong_alignments():
    """The offset comparison is not vacuous: a dropped chunk, two merged chunks, a chunk split at a cut
    the offsets can see and a shifted chunk are all reported."""
    T, S = tok(MISTRAL_SPM), tok(TEKKEN)
    text = "First Citizen:\nBefore we proceed any further, hear me speak. 日本語 😀\n\n  end"
    rt, rs = library_encode(T, text), library_encode(S, text)
    assert rt is not None and rs is not None
    al = align(T, S, rt[0], rs[0])
    ref = offset_alignment(rt[1], rs[1])
    assert compare_with_offsets(al, ref, rt[1], rs[1]) == []
    c = [list(x) for x in al.chunks.tolist()]
    k = next(i for i in range(len(c) - 1) if c[i][1] == c[i + 1][0] and c[i][3] == c[i + 1][2])
    merged = c[:k] + [[c[k][0], c[k + 1][1], c[k][2], c[k + 1][3]]] + c[k + 2:]
    multi = next(i for i, x in enumerate(ref[0]) if x[1] - x[0] >= 2 and x[3] - x[2] == 1)
    x = ref[0][multi]
    j = c.index(list(x))
    split = c[:j] + [[x[0], x[0] + 1, x[2], x[3]], [x[0] + 1, x[1], x[3], x[3]]] + c[j + 1:]
    shifted = [list(r) for r in c]
    shifted[k][1] += 1
    shifted[k + 1][0] += 1
    for bad in (c[:k] + c[k + 1:], merged, split, shifted):
        assert compare_with_offsets(np.array(bad, np.int32).reshape(-1, 4), ref, rt[1], rs[1])


# ------------------------------------------------------------------------------------------------
# 3. damaged files: an error naming the file, or exactly the original values
# ------------------------------------------------------------------------------------------------

_RELIABILITY = "needs the reliability branch (checksums and clear errors for damaged files)"


class _Ref(tuple):
    """A fixture's (path or bytes, reference values), with a short repr for hypothesis' reports."""

    def __repr__(self):
        return f"<{type(self[0]).__name__} + reference values>"


def damages(max_len=64):
    """A list of byte damages: ("flip", position fraction, xor mask), ("truncate", fraction),
    ("append", bytes), ("zero", position fraction, length)."""
    frac = st.floats(0, 1, allow_nan=False, exclude_max=True)
    one = st.one_of(st.tuples(st.just("flip"), frac, st.integers(1, 255)),
                    st.tuples(st.just("truncate"), frac),
                    st.tuples(st.just("append"), st.binary(min_size=1, max_size=max_len)),
                    st.tuples(st.just("zero"), frac, st.integers(1, max_len)))
    return st.lists(one, min_size=1, max_size=3)


def _damage(data: bytes, ds) -> bytes:
    b = bytearray(data)
    for d in ds:
        if not b:
            break
        if d[0] == "flip":
            b[int(d[1] * len(b))] ^= d[2]
        elif d[0] == "truncate":
            del b[int(d[1] * len(b)):]
        elif d[0] == "append":
            b += d[1]
        else:
            p = int(d[1] * len(b))
            b[p:p + d[2]] = bytes(len(b[p:p + d[2]]))
    return bytes(b)


@pytest.fixture(scope="module")
def w_file(tmp_path_factory):
    """A small real projection file (random sparse W with decompositions) and its arrays."""
    from xtok.projection import ProjectionMatrix

    rng = np.random.default_rng(0)
    V_t, V_s = 300, 200
    rows = np.repeat(np.arange(V_t), rng.integers(1, 4, V_t))
    cols = rng.integers(0, V_s, rows.size)
    vals = rng.random(rows.size).astype(np.float32)
    dec_len = rng.integers(0, 4, V_t)
    off = np.concatenate([[0], np.cumsum(dec_len)])
    W = ProjectionMatrix.from_coo(rows, cols, vals, (V_t, V_s), decomp_offsets=off,
                                  decomp_ids=rng.integers(0, V_s, int(off[-1])),
                                  meta={"teacher_name": "t", "student_name": "s", "stats": {"nnz": int(rows.size)}})
    p = W.save(tmp_path_factory.mktemp("w") / "W.safetensors")
    return _Ref((p.read_bytes(), W))


def _same_w(a, b) -> bool:
    return (a.shape == b.shape and all(np.array_equal(x, y) for x, y in zip(a.coo_arrays(), b.coo_arrays()))
            and np.array_equal(a.decomp_offsets, b.decomp_offsets) and np.array_equal(a.decomp_ids, b.decomp_ids)
            and a.meta == b.meta)


def _check_w(tmp_path, w_file, ds, exact_values: bool):
    from xtok.projection import ProjectionError, ProjectionMatrix

    data, W = w_file
    bad = _damage(data, ds)
    p = tmp_path / "damaged-W.safetensors"
    p.write_bytes(bad)
    try:
        got = ProjectionMatrix.load(p)
    except ProjectionError as e:
        assert "damaged-W.safetensors" in str(e), str(e)
        return
    if exact_values:
        assert _same_w(got, W), f"damaged file {ds} loaded with different values and no error"


def test_undamaged_files_read_back_exactly(tmp_path, w_file, store_dir):
    """The reference values the damage tests compare with are what an intact file gives."""
    from xtok.projection import ProjectionMatrix
    from xtok.store import TeacherStore

    (tmp_path / "W.safetensors").write_bytes(w_file[0])
    assert _same_w(ProjectionMatrix.load(tmp_path / "W.safetensors"), w_file[1])
    s = TeacherStore(store_dir[0])
    assert [_example_values(s[i]) for i in range(len(s))] == store_dir[1] and len(s) == 8


@settings(max_examples=120, **SETTINGS)
@given(ds=damages())
def test_damaged_projection_file_never_a_traceback(tmp_path_factory, w_file, ds):
    """Loading a damaged W raises ProjectionError naming the file, or loads (any other exception fails)."""
    _check_w(tmp_path_factory.mktemp("dw"), w_file, ds, exact_values=False)


@settings(max_examples=120, **SETTINGS)
@given(ds=damages())
def test_damaged_projection_file_never_a_silent_wrong_value(tmp_path_factory, w_file, ds):
    """... and what loads without an error has exactly the original values (W, decompositions, meta)."""
    _check_w(tmp_path_factory.mktemp("dw"), w_file, ds, exact_values=True)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A small real teacher store (two shards) and the examples it holds."""
    from xtok.store import StoreWriter, TeacherStore, encode_example, quantize_logprobs

    rng = np.random.default_rng(1)
    V, k, m = 1000, 4, 2
    d = tmp_path_factory.mktemp("store") / "s"
    w = StoreWriter(d, {"model": "m", "tokenizer_hash": "h", "vocab_size": V, "top_k": k, "sample_tail": m,
                        "temperature": 1.0})
    for j in range(2):
        rows = []
        for i in range(4):
            T = int(rng.integers(4, 30))
            ids = rng.integers(0, V, T)
            P = T - 1
            top = np.sort(np.log(rng.dirichlet(np.ones(k), P) * 0.9), axis=1)[:, ::-1].astype(np.float32)
            rows.append(encode_example(f"ex{j}-{i}", f"text {j} {i}", ids, np.arange(P), rng.integers(0, V, (P, k)),
                                       quantize_logprobs(top), np.full(P, 0.1, np.float32),
                                       rng.standard_normal(P).astype(np.float32), rng.random(P).astype(np.float32),
                                       V, tail_ids=rng.integers(-1, V, (P, m))))
        w.write_shard(j, rows)
    w.finish()
    st_ = TeacherStore(d)
    return _Ref((d, [_example_values(e) for e in st_]))


def _example_values(e):
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(e).items()}


def _check_store(tmp_path, store_dir, target, ds, exact_values: bool):
    from xtok.store import StoreError, TeacherStore

    src, ref = store_dir
    d = tmp_path / "s"
    shutil.copytree(src, d)
    files = sorted(p.relative_to(d).as_posix() for p in d.rglob("*.parquet"))
    rel = "manifest.json" if target == "manifest" else files[0]
    (d / rel).write_bytes(_damage((d / rel).read_bytes(), ds))
    name = rel.rsplit("/", 1)[-1]
    try:
        s = TeacherStore(d)
        got = [_example_values(s[i]) for i in range(len(s))]
    except StoreError as e:
        assert name in str(e) or (target == "manifest" and "manifest" in str(e)), str(e)
        return
    if exact_values:
        assert got == ref, f"damaged {rel} ({ds}) read with different values and no error"


@settings(max_examples=120, **SETTINGS)
@given(target=st.sampled_from(["shard", "manifest"]), ds=damages())
def test_damaged_store_never_a_traceback(tmp_path_factory, store_dir, target, ds):
    """Opening and reading every example of a store whose shard or manifest is damaged raises StoreError
    naming the file, or succeeds (any other exception fails)."""
    _check_store(tmp_path_factory.mktemp("ds"), store_dir, target, ds, exact_values=False)


@settings(max_examples=120, **SETTINGS)
@given(target=st.sampled_from(["shard", "manifest"]), ds=damages())
def test_damaged_store_never_a_silent_wrong_value(tmp_path_factory, store_dir, target, ds):
    """... and what reads without an error has exactly the original values."""
    _check_store(tmp_path_factory.mktemp("ds"), store_dir, target, ds, exact_values=True)
