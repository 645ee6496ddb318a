"""Projection matrix W: builder (projection_tools) and runtime (xtok.projection).

Every check compares against an independent slow reference written here in plain Python (dicts,
per-token encode calls), on full vocabularies where it is cheap and on seeded slices where not."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import MISTRAL_SPM, MISTRAL_SPM_V3, TEKKEN, asset
from projection_tools.build import build_projection
from projection_tools.cut import cut, cut_arrays
from projection_tools.exact import apply_exact
from xtok.projection import ProjectionError, ProjectionMatrix
from xtok.tokens import bytes_to_unicode, load_tokenizer


# --------------------------------------------------------------------------------------------
# slow references
# --------------------------------------------------------------------------------------------

def ref_bytes_to_ids(tok) -> dict[bytes, set[int]]:
    tb = tok.token_bytes
    d: dict[bytes, set[int]] = {}
    for i in range(tok.vocab_size):
        if not tb.is_special[i]:
            b = tb.get(i)
            if b:
                d.setdefault(b, set()).add(i)
    return d


def ref_decompose(student, b: bytes, s_dict: dict[bytes, set[int]], maxlen: int):
    """Per-token mid-text decomposition, written independently: ("text", ids) or ("greedy", [bytes pieces])."""
    tb = student.token_bytes
    try:
        text = b.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        for prefix in ("\n", "a", ""):
            ids = [int(i) for i in student.encode(prefix + text, parse_special=False)]
            pre = (b" " if student.prefix_space else b"") + prefix.encode()
            acc, j = b"", 0
            while j < len(ids) and len(acc) < len(pre):
                acc += tb.get(ids[j])
                j += 1
            rest = ids[j:]
            if (len(acc) == len(pre) and rest and not any(tb.is_special[i] for i in rest)
                    and b"".join(tb.get(i) for i in rest) == b):
                return "text", rest
    pieces, pos = [], 0
    while pos < len(b):
        for L in range(min(maxlen, len(b) - pos), 0, -1):
            if b[pos:pos + L] in s_dict:
                pieces.append(b[pos:pos + L])
                pos += L
                break
        else:
            return None, None
    return "greedy", pieces


def ref_project(W: ProjectionMatrix, ids, probs):
    """Dict accumulation per position, from the COO triplets."""
    rows: dict[int, list] = {}
    r, c, v = W.coo_arrays()
    for a, b, x in zip(r.tolist(), c.tolist(), v.tolist()):
        rows.setdefault(a, []).append((b, x))
    out = []
    for pid, pp in zip(ids.tolist(), probs.tolist()):
        acc: dict[int, float] = {}
        for t, p in zip(pid, pp):
            if t < 0:
                continue
            for s, w in rows.get(t, []):
                acc[s] = acc.get(s, 0.0) + w * p
        out.append(acc)
    return out


def check_project(W, ids, probs, out_ids, out_probs, atol=1e-6):
    ref = ref_project(W, ids, probs)
    for pos, acc in enumerate(ref):
        got = {int(i): float(p) for i, p in zip(out_ids[pos], out_probs[pos]) if i != -1}
        assert set(got) == set(acc), pos
        for s in acc:
            assert abs(got[s] - acc[s]) < atol
        pads = out_ids[pos] == -1
        assert np.all(out_probs[pos][pads] == 0)
        assert np.all(np.diff(out_probs[pos][~pads]) <= 1e-7)  # sorted descending


# --------------------------------------------------------------------------------------------
# tiny hand-made tokenizers with known answers
# --------------------------------------------------------------------------------------------

def _write_bpe(dirpath, merges, specials, eos):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    vocab = {b2u[i]: i for i in range(256)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    dirpath.mkdir()
    tok.save(str(dirpath / "tokenizer.json"))
    (dirpath / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return load_tokenizer(dirpath, cache=False)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    teacher = _write_bpe(d / "teacher", [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("i", "n"), ("in", "g")],
                         ["<|endoftext|>", "<|im_end|>", "<|weird|>"], "<|endoftext|>")
    student = _write_bpe(d / "student", [("Ġ", "t"), ("h", "e"), ("i", "n")], ["</s>", "<s>"], "</s>")
    return teacher, student


def test_tiny_known_answers(tiny_pair):
    T, S = tiny_pair
    W = build_projection(T, S, progress=False)
    tid = {T.token_str(i): i for i in range(T.vocab_size)}
    sid = {S.token_str(i): i for i in range(S.vocab_size)}
    # exact matches
    assert W.decomposition(tid[" t"]).tolist() == [sid[" t"]]
    assert W.decomposition(tid["in"]).tolist() == [sid["in"]]
    assert W.decomposition(tid["a"]).tolist() == [sid["a"]]
    # multi-token, hand-derived from the student's merges
    assert W.decomposition(tid[" the"]).tolist() == [sid[" t"], sid["he"]]
    assert W.decomposition(tid[" th"]).tolist() == [sid[" t"], sid["h"]]
    assert W.decomposition(tid["ing"]).tolist() == [sid["in"], sid["g"]]
    assert W.row(tid[" the"])[0].tolist() == [sid[" t"]]
    assert W.row(tid["ing"])[0].tolist() == [sid["in"]]
    # specials by role: eos -> eos; end-of-turn -> student's eos (no end-of-turn token); unknown -> unmapped
    assert W.row(tid["<|endoftext|>"])[0].tolist() == [sid["</s>"]]
    assert W.row(tid["<|im_end|>"])[0].tolist() == [sid["</s>"]]
    assert W.row(tid["<|weird|>"])[0].size == 0
    assert W.stats["special_unmapped_names"] == ["<|weird|>"]
    assert W.stats["exact"] == 256 + 2 and W.stats["multi_token"] == 3


def test_tiny_special_overrides_json_yaml(tiny_pair, tmp_path):
    T, S = tiny_pair
    tid, sid = T.special_tokens, S.special_tokens
    (tmp_path / "m.json").write_text(json.dumps({"<|weird|>": "<s>", "<|im_end|>": None}))
    (tmp_path / "m.yaml").write_text("specials:\n  '<|weird|>': '<s>'\n  '<|im_end|>': null\n")
    for f in ("m.json", "m.yaml"):
        W = build_projection(T, S, special_map=tmp_path / f, progress=False)
        assert W.row(tid["<|weird|>"])[0].tolist() == [sid["<s>"]]
        assert W.row(tid["<|im_end|>"])[0].size == 0
        assert W.stats["special_unmapped_names"] == ["<|im_end|>"]
    (tmp_path / "bad.json").write_text(json.dumps({"<|weird|>": "<nope-not-a-token>"}))
    with pytest.raises(ValueError, match="nope-not-a-token"):
        build_projection(T, S, special_map=tmp_path / "bad.json", progress=False)


# --------------------------------------------------------------------------------------------
# real pairs
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spm():
    return load_tokenizer(MISTRAL_SPM)


@pytest.fixture(scope="module")
def tekken():
    return load_tokenizer(TEKKEN)


@pytest.fixture(scope="module")
def W_tek_spm(tekken, spm):
    return build_projection(tekken, spm, progress=False)


@pytest.fixture(scope="module")
def W_spm_tek(tekken, spm):
    return build_projection(spm, tekken, progress=False)


_TOKS: dict = {}


def real_tok(name):
    """A real tokenizer by short name (shared assets or mistral-common), loaded once per module."""
    if name not in _TOKS:
        spec = {"tekken": TEKKEN, "spm": MISTRAL_SPM, "spm_v3": MISTRAL_SPM_V3}.get(name)
        _TOKS[name] = load_tokenizer(spec if spec else asset(f"tokenizers/{name}"))
    return _TOKS[name]


@pytest.fixture(scope="module")
def W_qwen_llama():
    T, S = real_tok("qwen3"), real_tok("llama3")
    return T, S, build_projection(T, S, progress=False)


def check_real_pair(T, S, W, n_sample=None, seed=0):
    """Full reference check of a built W; `n_sample` None = every non-exact row (full vocabulary)."""
    tbT = T.token_bytes
    s_dict = ref_bytes_to_ids(S)
    maxlen = max(len(b) for b in s_dict)
    rows, cols, vals = W.coo_arrays()
    assert W.shape == (T.vocab_size, S.vocab_size)
    # every exact match found, every found match exact (full vocab)
    exact_rows = []
    for t in range(T.vocab_size):
        if tbT.is_special[t]:
            continue
        b = tbT.get(t)
        r_ids, r_w = W.row(t)
        if b in s_dict:
            exact_rows.append(t)
            assert r_ids.size == 1 and int(r_ids[0]) in s_dict[b] and r_w[0] == 1.0, t
            assert W.decomposition(t).tolist() == r_ids.tolist()
    assert len(exact_rows) == W.stats["exact"]
    # rows sum to 1; empty rows only for listed unmapped specials
    sums = np.bincount(rows, weights=vals, minlength=W.shape[0])
    nonempty = np.diff(W.indptr) > 0
    np.testing.assert_allclose(sums[nonempty], 1.0, atol=1e-6)
    empty = np.nonzero(~nonempty)[0]
    assert all(tbT.is_special[e] for e in empty)
    assert len(empty) == W.stats["special_unmapped"]
    # every decomposition spells the teacher token's bytes, except the counted unverified/unk rows
    sb = S.token_bytes
    off, seq = W.decomposition_csr()
    bad = sum(1 for t in range(T.vocab_size) if not tbT.is_special[t]
              and b"".join(sb.get(i) for i in seq[off[t]:off[t + 1]].tolist()) != tbT.get(t))
    assert bad == W.stats["tiers"].get("unverified", 0) + W.stats["tiers"].get("unk", 0)
    # first token (and whole decomposition) of every non-exact row (or a seeded sample of them) = what the
    # student tokenizer itself produces, one encode call per token
    exact_set = set(exact_rows)
    cand = [t for t in range(T.vocab_size) if not tbT.is_special[t] and t not in exact_set and tbT.get(t)]
    sample = cand if n_sample is None else random.Random(seed).sample(cand, min(n_sample, len(cand)))
    n_greedy = n_none = 0
    n_unverified = W.stats["tiers"].get("unverified", 0) + W.stats["tiers"].get("unk", 0)
    for t in sample:
        how, dec = ref_decompose(S, tbT.get(t), s_dict, maxlen)
        got = W.decomposition(t).tolist()
        if how == "text":
            assert got == dec, (t, tbT.get(t))
        elif how == "greedy":
            n_greedy += 1
            assert [S.token_bytes.get(i) for i in got] == dec, (t, tbT.get(t))
        else:  # unrepresentable bytes: unverified encoding or unk
            n_none += 1
            assert n_unverified > 0
            continue
        assert W.row(t)[0].tolist() == [got[0]]
    if n_sample is None:  # every row the reference cannot spell is one of the counted unverified/unk rows
        assert n_none == n_unverified
    return n_greedy


def test_real_tekken_to_spm(tekken, spm, W_tek_spm):
    check_real_pair(tekken, spm, W_tek_spm)
    assert W_tek_spm.stats["multi_token"] > 50_000


def test_real_spm_to_tekken(tekken, spm, W_spm_tek):
    check_real_pair(spm, tekken, W_spm_tek)
    # SentencePiece's <0x20> byte piece and "▁" are both b" ": the tokenizer's own choice wins
    assert W_spm_tek.stats["exact"] > 25_000


def test_identity_when_same_tokenizer(spm):
    W = build_projection(spm, spm, progress=False)
    assert W.nnz == spm.vocab_size
    r, c, v = W.coo_arrays()
    assert np.array_equal(r, c) and np.all(v == 1) and np.array_equal(r, np.arange(spm.vocab_size))
    assert W.decomposition(100).tolist() == [100]


def test_duplicate_student_bytes_use_tokenizer_choice(spm, tekken, W_tek_spm):
    # SentencePiece holds some bytes twice (e.g. b" " as <0x20> and as "▁"): W must use the id the
    # student tokenizer itself produces mid-text
    s_dict = ref_bytes_to_ids(spm)
    dups = {b: ids for b, ids in s_dict.items() if len(ids) > 1}
    assert dups
    maxlen = max(len(b) for b in s_dict)
    tb = tekken.token_bytes
    checked = 0
    for t in range(tekken.vocab_size):
        b = None if tb.is_special[t] else tb.get(t)
        if b in dups:
            how, dec = ref_decompose(spm, b, {}, maxlen)
            if how == "text" and len(dec) == 1 and dec[0] in dups[b]:
                assert W_tek_spm.row(t)[0].tolist() == dec
                checked += 1
    assert checked >= 1


@pytest.mark.parametrize("pair", [("gpt2", "llama2"), ("gpt2", "bert-minilm")])
def test_shared_pairs(pair):
    T = load_tokenizer(asset(f"tokenizers/{pair[0]}"))
    S = load_tokenizer(asset(f"tokenizers/{pair[1]}"))
    W = build_projection(T, S, progress=False)
    check_real_pair(T, S, W, n_sample=600)


def test_real_qwen3_to_llama3_full_vocab(W_qwen_llama):
    """151k x 128k, both Hugging Face byte-level BPE: every row checked against per-token encode calls."""
    T, S, W = W_qwen_llama
    check_real_pair(T, S, W)
    assert W.stats["exact"] > 100_000


# --------------------------------------------------------------------------------------------
# special tokens by chat role, across real families
# --------------------------------------------------------------------------------------------

# Hand-written from each family's chat format: teacher special -> the student special of the same role
# (turn start, end of turn, end of document/eos, bos, pad); every other teacher special must stay unmapped
# unless the student has the very same special text (SAME_TEXT pairs).
ROLE_CASES = {
    ("qwen3", "llama3"): {"<|im_start|>": "<|start_header_id|>", "<|im_end|>": "<|eot_id|>",
                          "<|endoftext|>": "<|end_of_text|>"},
    ("llama3", "qwen3"): {"<|start_header_id|>": "<|im_start|>", "<|eot_id|>": "<|im_end|>",
                          "<|end_of_text|>": "<|endoftext|>", "<|finetune_right_pad_id|>": "<|endoftext|>"},
    ("llama3", "bert-minilm"): {"<|begin_of_text|>": "[CLS]", "<|end_of_text|>": "[SEP]", "<|eot_id|>": "[SEP]",
                                "<|finetune_right_pad_id|>": "[PAD]"},
    ("tekken", "llama3"): {"<s>": "<|begin_of_text|>", "</s>": "<|end_of_text|>",
                           "<pad>": "<|finetune_right_pad_id|>"},
    ("qwen3", "spm_v3"): {"<|im_end|>": "</s>", "<|endoftext|>": "</s>"},  # no end-of-turn token: eos
    # v3 SentencePiece declares [INST], [/INST], [TOOL_CALLS], ... as control tokens: same text, same token
    ("tekken", "spm_v3"): {"<s>": "<s>", "</s>": "</s>", "<unk>": "<unk>", "[INST]": "[INST]", "[/INST]": "[/INST]"},
}
SAME_TEXT = {("tekken", "spm_v3")}


def _special_id(tok, text):
    """The id of a special token by its text (declared specials, and the bos/eos/pad/unk ids)."""
    if text in tok.special_tokens:
        return tok.special_tokens[text]
    for i in (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id):
        if i is not None and tok.token_str(i) == text:
            return i
    return None


def ref_role_map(T, S, pair):
    """Expected {teacher special id: student id or None} for every teacher special."""
    exp = {}
    for t in np.nonzero(T.token_bytes.is_special)[0].tolist():
        name = T.token_str(t)
        want = ROLE_CASES[pair].get(name)
        if want is None and pair in SAME_TEXT and _special_id(S, name) is not None:
            want = name
        if want is not None:
            sid = _special_id(S, want)
            assert sid is not None and S.token_bytes.is_special[sid], (pair, want)
            exp[t] = sid
        else:
            exp[t] = None
    return exp


@pytest.mark.parametrize("pair", list(ROLE_CASES), ids=lambda p: f"{p[0]}->{p[1]}")
def test_specials_map_by_chat_role(pair):
    from projection_tools.build import map_specials

    T, S = real_tok(pair[0]), real_tok(pair[1])
    exp = ref_role_map(T, S, pair)
    got, unmapped = map_specials(T, S)
    assert {t: got.get(t) for t in exp} == exp
    assert unmapped == [T.token_str(t) for t, s in exp.items() if s is None]


def test_specials_in_built_matrix_and_stats(W_qwen_llama):
    T, S, W = W_qwen_llama
    exp = ref_role_map(T, S, ("qwen3", "llama3"))
    for t, s in exp.items():
        assert W.row(t)[0].tolist() == ([] if s is None else [s]), T.token_str(t)
        assert W.decomposition(t).tolist() == ([] if s is None else [s])
    names = [T.token_str(t) for t, s in exp.items() if s is None]
    assert len(names) == 11  # <|object_ref_start|> ... <|video_pad|>: no counterpart in Llama-3
    assert W.stats["special_unmapped"] == len(names) and W.stats["special_unmapped_names"] == names
    assert W.stats["special_mapped"] == 3
    empty = np.nonzero(np.diff(W.indptr) == 0)[0].tolist()
    assert empty == [t for t, s in exp.items() if s is None]


def test_special_override_file_changes_roles(tmp_path, W_qwen_llama):
    """JSON and YAML override files remap / unmap specials, and the stats follow (the CLI's --special-map:
    test_cli_build_and_tools)."""
    T, S, W0 = W_qwen_llama
    tid, sid = T.special_tokens, S.special_tokens
    over = {"<|im_start|>": "<|begin_of_text|>", "<|im_end|>": None, "<|vision_start|>": "<|image|>",
            str(tid["<|vision_end|>"]): sid["<|image|>"]}  # keys/values as texts or ids
    (tmp_path / "m.json").write_text(json.dumps(over))
    (tmp_path / "m.yaml").write_text("specials:\n" + "".join(
        f"  '{k}': {'null' if v is None else repr(v) if isinstance(v, str) else v}\n" for k, v in over.items()))
    want = {tid["<|im_start|>"]: [sid["<|begin_of_text|>"]], tid["<|im_end|>"]: [],
            tid["<|vision_start|>"]: [sid["<|image|>"]], tid["<|vision_end|>"]: [sid["<|image|>"]],
            tid["<|endoftext|>"]: [sid["<|end_of_text|>"]]}  # not overridden: role mapping as before
    before = set(W0.stats["special_unmapped_names"])
    for f in ("m.json", "m.yaml"):
        W = build_projection(T, S, special_map=tmp_path / f, progress=False)
        for t, row in want.items():
            assert W.row(t)[0].tolist() == row, T.token_str(t)
        names = set(W.stats["special_unmapped_names"])
        assert names == (before - {"<|vision_start|>", "<|vision_end|>"}) | {"<|im_end|>"}
        assert W.stats["special_unmapped"] == len(names) == int((np.diff(W.indptr) == 0).sum())
        assert W.meta["options"]["special_map"] == json.loads(json.dumps(over))
    # an override naming a token the student does not have: a clear error
    (tmp_path / "bad.yaml").write_text("'<|im_start|>': '<|no_such_special|>'\n")
    with pytest.raises(ValueError, match=r"<\|no_such_special\|>"):
        build_projection(T, S, special_map=tmp_path / "bad.yaml", progress=False)


def test_special_override_on_control_tokens_and_identity(tmp_path):
    """qwen3 -> v3 SentencePiece: <|im_start|> has no role counterpart; an override maps it to the v3
    [INST] control token. On an identity W a null override empties the row."""
    from projection_tools.build import map_specials

    T, S = real_tok("qwen3"), real_tok("spm_v3")
    im_start = T.special_tokens["<|im_start|>"]
    assert im_start not in map_specials(T, S)[0]
    got, unmapped = map_specials(T, S, {"<|im_start|>": "[INST]"})
    assert got[im_start] == S.special_tokens["[INST]"] and S.token_bytes.is_special[got[im_start]]
    assert "<|im_start|>" not in unmapped
    V = real_tok("spm_v3")
    W = build_projection(V, V, special_map={"[INST]": None, "</s>": "[/INST]"}, progress=False)
    inst, eos = V.special_tokens["[INST]"], V.eos_id
    assert W.row(inst)[0].size == 0 and W.decomposition(inst).size == 0
    assert W.row(eos)[0].tolist() == [V.special_tokens["[/INST]"]]
    other = [t for t in range(V.vocab_size) if t not in (inst, eos)]
    assert all(W.row(t)[0].tolist() == [t] for t in other[:: 97])
    assert W.stats["special_unmapped_names"] == ["[INST]"] and W.stats["empty_rows"] == 1
    assert W.nnz == V.vocab_size - 1


# --------------------------------------------------------------------------------------------
# runtime: save/load, project, hashes, bad input
# --------------------------------------------------------------------------------------------

def test_save_load_roundtrip(W_tek_spm, tekken, spm, tmp_path):
    p = W_tek_spm.save(tmp_path / "w.safetensors")
    W = ProjectionMatrix.load(p, teacher=tekken, student=spm)
    assert W.shape == W_tek_spm.shape
    for a, b in zip(W.coo_arrays(), W_tek_spm.coo_arrays()):
        assert np.array_equal(a, b)
    assert np.array_equal(W.decomp_offsets, W_tek_spm.decomp_offsets)
    assert np.array_equal(W.decomp_ids, W_tek_spm.decomp_ids)
    assert W.stats == W_tek_spm.stats and W.meta["teacher_hash"] == tekken.content_hash
    coo, csr = W.torch_coo(), W.torch_csr()
    assert coo.shape == csr.shape == torch.Size(W.shape) and coo._nnz() == W.nnz
    dense_row = csr[5000].to_dense() if hasattr(csr[5000], "to_dense") else None
    if dense_row is not None:
        assert float(dense_row.sum()) == pytest.approx(1.0)
    assert [f for f in os.listdir(tmp_path) if f != "w.safetensors"] == []


def test_hash_mismatch(W_tek_spm, tekken, spm, tmp_path):
    p = W_tek_spm.save(tmp_path / "w.safetensors")
    with pytest.raises(ProjectionError) as e:
        ProjectionMatrix.load(p, teacher=spm, student=spm)
    assert "w.safetensors" in str(e.value) and "check_hashes=False" in str(e.value)
    W = ProjectionMatrix.load(p, teacher=spm, student=spm, check_hashes=False)
    assert W.nnz == W_tek_spm.nnz


def test_project_matches_reference(W_tek_spm, W_spm_tek):
    rng = np.random.default_rng(0)
    for W in (W_tek_spm, W_spm_tek):
        P, k = 64, 8
        ids = rng.integers(0, W.shape[0], size=(P, k))
        ids[:, 1] = ids[:, 0]  # repeated teacher ids
        ids[3, 5] = -1  # padding
        probs = rng.dirichlet(np.ones(k), size=P).astype(np.float32)
        probs[3, 5] = 0
        oi, op = W.project(ids, probs)
        assert isinstance(oi, np.ndarray) and oi.shape == (P, W.default_k(k)) and oi.dtype == np.int64
        check_project(W, ids, probs, oi, op)
        # mass preserved where every id has a non-empty row
        full = (np.diff(W.indptr)[np.maximum(ids, 0)] > 0) | (ids < 0)
        ok = full.all(1)
        np.testing.assert_allclose(op.sum(1)[ok], probs.sum(1)[ok], atol=1e-5)
        # torch input (leading dims kept) gives the same
        ti, tp = W.project(torch.from_numpy(ids).view(8, 8, k), torch.from_numpy(probs).view(8, 8, k))
        assert isinstance(ti, torch.Tensor) and ti.shape == (8, 8, W.default_k(k))
        assert np.array_equal(ti.reshape(P, -1).numpy(), oi) and np.allclose(tp.reshape(P, -1).numpy(), op)
        # picklable (DataLoader workers), same results after a round trip
        import pickle

        pi, pp = pickle.loads(pickle.dumps(W)).project(ids, probs)
        assert np.array_equal(pi, oi) and np.array_equal(pp, op)
        # the torch-ops path (used for accelerator tensors) agrees with the reference too
        gi, gp = W._project_torch(torch.from_numpy(ids), torch.from_numpy(probs), None, -1)
        check_project(W, ids, probs, gi.numpy(), gp.numpy())


def test_project_multi_entry_rows_and_truncation():
    rng = np.random.default_rng(1)
    V_t, V_s, nnz = 300, 40, 900
    r, c, v = rng.integers(0, V_t, nnz), rng.integers(0, V_s, nnz), rng.random(nnz).astype(np.float32)
    r2, c2, v2 = cut_arrays(r, c, v, V_t, top_k=5)
    W = ProjectionMatrix.from_coo(r2, c2, v2, (V_t, V_s))
    ids = rng.integers(0, V_t, size=(50, 6))
    probs = rng.dirichlet(np.ones(6), size=50)
    oi, op = W.project(ids, probs)
    assert oi.shape[1] == 6 * W.max_row_nnz
    check_project(W, ids, probs, oi, op, atol=1e-9)
    gi, gp = W._project_torch(torch.from_numpy(ids), torch.from_numpy(probs), None, -1)
    check_project(W, ids, probs, gi.numpy(), gp.numpy(), atol=1e-9)
    # > 128 distinct student ids per position (long shell-sort gaps)
    rb, cb = np.repeat(np.arange(V_t), 5), rng.integers(0, 5000, V_t * 5)
    Wb = ProjectionMatrix.from_coo(*cut_arrays(rb, cb, rng.random(rb.size).astype(np.float32), V_t), (V_t, 5000))
    big, bp = rng.integers(0, V_t, size=(20, 40)), rng.dirichlet(np.ones(40), size=20)
    bi, bpp = Wb.project(big, bp)
    assert (bi >= 0).sum(1).min() > 128
    check_project(Wb, big, bp, bi, bpp, atol=1e-9)
    ki, kp = W.project(ids, probs, K=3)  # the K most probable survive
    assert ki.shape == (50, 3)
    np.testing.assert_allclose(kp, op[:, :3])
    # dense path agrees
    dense = torch.zeros(50, V_t, dtype=torch.float64)
    dense.scatter_add_(1, torch.from_numpy(ids), torch.from_numpy(probs))
    out = W.project_dense(dense.float()).numpy()
    ref = np.zeros((50, V_s))
    for pos in range(50):
        np.add.at(ref[pos], oi[pos][oi[pos] >= 0], op[pos][oi[pos] >= 0])
    np.testing.assert_allclose(out, ref, atol=1e-5)
    with pytest.raises(IndexError):
        W.project(np.array([[V_t]]), np.array([[1.0]]))
    oi2, op2 = W.project(np.array([[V_t + 5, 3]]), np.array([[0.5, 0.5]]), drop_out_of_range=True)
    ri, rp = W.project(np.array([[-1, 3]]), np.array([[0.5, 0.5]]))
    assert np.array_equal(oi2, ri) and np.allclose(op2, rp)


def test_cut_matches_reference():
    rng = np.random.default_rng(2)
    V_t, V_s, nnz = 200, 50, 1500
    r, c, v = rng.integers(0, V_t, nnz), rng.integers(0, V_s, nnz), rng.random(nnz).astype(np.float32)
    W0 = ProjectionMatrix.from_coo(r, c, v, (V_t, V_s))
    W = cut(W0, top_k=3, min_weight=0.3)
    rows: dict[int, dict[int, float]] = {}
    for a, b, x in zip(*[t.tolist() for t in W0.coo_arrays()]):
        rows.setdefault(a, {})[b] = x
    for t in range(V_t):
        ent = sorted(rows.get(t, {}).items(), key=lambda kv: (-kv[1], kv[0]))
        keep = [kv for i, kv in enumerate(ent[:3]) if kv[1] >= 0.3 or i == 0]
        s = sum(x for _, x in keep)
        got_i, got_w = W.row(t)
        assert sorted(got_i.tolist()) == sorted(k for k, _ in keep)
        ref = dict(keep)
        for i, w in zip(got_i.tolist(), got_w.tolist()):
            assert w == pytest.approx(ref[i] / s, rel=1e-5)


def ref_stats(W, T, S):
    """The array-derived stats of a W, recomputed row by row in plain Python."""
    s_dict = ref_bytes_to_ids(S)
    tb = T.token_bytes
    n_text = exact = multi = single_nonexact = sp_mapped = empty = 0
    unmapped, dec_lens = [], []
    for t in range(T.vocab_size):
        ids, w = W.row(t)
        dec = W.decomposition(t).tolist()
        if ids.size == 0:
            empty += 1
        if tb.is_special[t]:
            if ids.size:
                sp_mapped += 1
            else:
                unmapped.append(T.token_str(t))
            continue
        n_text += 1
        dec_lens.append(len(dec))
        b = tb.get(t)
        is_exact = bool(b) and b in s_dict and ids.size == 1 and int(ids[0]) in s_dict[b] and w[0] == 1.0
        exact += is_exact
        multi += len(dec) > 1
        single_nonexact += len(dec) == 1 and not is_exact
    reached = set(W.indices.tolist())
    return {"teacher_vocab": T.vocab_size, "student_vocab": S.vocab_size, "teacher_text_tokens": n_text,
            "teacher_special_tokens": T.vocab_size - n_text, "exact": exact, "multi_token": multi,
            "single_token_nonexact": single_nonexact, "special_mapped": sp_mapped,
            "special_unmapped": len(unmapped), "special_unmapped_names": unmapped[:50], "empty_rows": empty,
            "mean_decomposition_len": round(sum(dec_lens) / len(dec_lens), 4), "max_decomposition_len": max(
                len(W.decomposition(t)) for t in range(T.vocab_size)),
            "student_coverage_pct": round(100.0 * len(reached) / S.vocab_size, 3), "nnz": len(W.indices)}


def test_apply_exact_restores_edited_rows(W_spm_tek, spm, tekken):
    r, c, v = W_spm_tek.coo_arrays()
    rng = np.random.default_rng(3)
    edit = rng.choice(r.size, 500, replace=False)
    c2 = c.copy()
    c2[edit] = (c2[edit] + 7) % tekken.vocab_size  # corrupt some rows
    extra_r = rng.integers(0, spm.vocab_size, 200)
    Wed = ProjectionMatrix.from_coo(np.concatenate([r, extra_r]), np.concatenate([c2, rng.integers(0, 1000, 200)]),
                                    np.concatenate([v, np.full(200, 0.5, np.float32)]), W_spm_tek.shape,
                                    decomp_offsets=W_spm_tek.decomp_offsets, decomp_ids=W_spm_tek.decomp_ids,
                                    meta=W_spm_tek.meta)
    W2, n = apply_exact(Wed, spm, tekken)
    s_dict = ref_bytes_to_ids(tekken)
    tb = spm.token_bytes
    n_exact = 0
    for t in range(spm.vocab_size):
        b = None if tb.is_special[t] else tb.get(t)
        if b and b in s_dict:
            n_exact += 1
            ids, w = W2.row(t)
            assert ids.size == 1 and int(ids[0]) in s_dict[b] and w[0] == 1
            assert W2.decomposition(t).tolist() == ids.tolist()
        else:  # untouched
            a_i, a_w = Wed.row(t)
            b_i, b_w = W2.row(t)
            assert np.array_equal(a_i, b_i) and np.array_equal(a_w, b_w)
            assert np.array_equal(Wed.decomposition(t), W2.decomposition(t))
    assert n > 0
    # the stats describe the new arrays, not the matrix W was edited from
    ref = ref_stats(W2, spm, tekken)
    st = W2.stats
    assert {k: st[k] for k in ref} == ref
    assert st["exact"] == n_exact and st["exact_rows_changed"] == n
    assert st["nnz"] != W_spm_tek.stats["nnz"]
    assert sum(st["tiers"].values()) == spm.vocab_size and st["tiers"]["exact"] == n_exact
    assert st["tiers_at_build"] == W_spm_tek.stats["tiers"]
    # on an unedited W nothing changes, and the recomputed stats agree with the build's
    W3, n3 = apply_exact(W_spm_tek, spm, tekken)
    assert n3 == 0
    assert {k: W3.stats[k] for k in ref} == {k: W_spm_tek.stats[k] for k in ref}


def test_cut_updates_stats(W_spm_tek, spm, tekken):
    rng = np.random.default_rng(4)
    V_t, V_s = W_spm_tek.shape
    r = np.repeat(np.arange(V_t), 3)
    c = rng.integers(0, V_s, r.size)
    v = rng.random(r.size).astype(np.float32) + 0.01
    v[r < 10] = 0  # rows of zero weights: emptied by the cut
    W = ProjectionMatrix.from_coo(r, c, v, W_spm_tek.shape, decomp_offsets=W_spm_tek.decomp_offsets,
                                  decomp_ids=W_spm_tek.decomp_ids, meta=W_spm_tek.meta)
    W1 = cut(W, top_k=1)
    ref = ref_stats(W1, spm, tekken)
    for k in ("nnz", "empty_rows", "student_coverage_pct"):
        assert W1.stats[k] == ref[k], k
    assert (W1.stats["nnz"], W1.stats["empty_rows"]) == (V_t - 10, 10)
    assert W1.stats["student_coverage_pct"] != W_spm_tek.stats["student_coverage_pct"]


# --------------------------------------------------------------------------------------------
# command lines and bad input
# --------------------------------------------------------------------------------------------

def _cli():
    from xtok.cli import main

    return main


def _no_leftovers(d, allowed=()):
    return sorted(f for f in os.listdir(d) if f not in allowed) == []


def test_cli_build_and_tools(tmp_path, tiny_pair):
    T, S = tiny_pair
    out = tmp_path / "w.safetensors"
    runner = CliRunner()
    res = runner.invoke(_cli(), ["build-projection", "-t", T.source, "-s", S.source, "-o", str(out), "--stats-json"])
    assert res.exit_code == 0, res.output
    assert "exact matches" in res.output and "nnz" in res.output
    stats = json.loads(res.output.strip().splitlines()[-1])
    W = ProjectionMatrix.load(out, teacher=T, student=S)
    assert stats == W.stats
    from projection_tools import cut as cut_mod, exact as exact_mod, inspect as inspect_mod

    for mod in (cut_mod, exact_mod, inspect_mod):
        r = runner.invoke(_tool(mod), ["--help"])
        assert r.exit_code == 0 and "--help" in r.output
    r = runner.invoke(_tool(inspect_mod), [str(out), "--teacher", T.source, "--student", S.source, "--rows", "3"])
    assert r.exit_code == 0, r.output
    assert "the" in r.output and "exact" in r.output
    r = runner.invoke(_tool(cut_mod), [str(out), "-o", str(tmp_path / "c.safetensors"), "--top-k", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(_tool(exact_mod), [str(out), "-t", T.source, "-s", S.source, "-o", str(tmp_path / "e.safetensors")])
    assert r.exit_code == 0, r.output
    # --special-map: a YAML override changes the role mapping; a bad one is a clean error, nothing written
    (tmp_path / "m.yaml").write_text("'<|im_end|>': '<s>'\n'<|endoftext|>': null\n")
    res = runner.invoke(_cli(), ["build-projection", "-t", T.source, "-s", S.source, "-o", str(tmp_path / "m.safetensors"),
                                 "-q", "--special-map", str(tmp_path / "m.yaml")])
    assert res.exit_code == 0, res.output
    Wm = ProjectionMatrix.load(tmp_path / "m.safetensors")
    assert Wm.row(T.special_tokens["<|im_end|>"])[0].tolist() == [S.special_tokens["<s>"]]
    assert Wm.row(T.special_tokens["<|endoftext|>"])[0].size == 0
    assert Wm.stats["special_unmapped_names"] == ["<|endoftext|>", "<|weird|>"]
    (tmp_path / "bad.yaml").write_text("'<|im_end|>': '<|no_such_special|>'\n")
    res = runner.invoke(_cli(), ["build-projection", "-t", T.source, "-s", S.source, "-o", str(tmp_path / "x"),
                                 "-q", "--special-map", str(tmp_path / "bad.yaml")])
    _clean_failure(res, "<|no_such_special|>", "student token")
    assert not (tmp_path / "x").exists()


def _tool(mod):
    """The click command behind `python -m projection_tools.X`."""
    return mod.cli


@pytest.mark.parametrize("case", ["unknown_path", "not_tokenizer", "missing_outdir"])
def test_cli_bad_input(tmp_path, case, tiny_pair):
    T, S = tiny_pair
    junk = tmp_path / "junk.json"
    junk.write_text('{"hello": 1}')
    out = tmp_path / "out" / "w.safetensors"
    args = {"unknown_path": ["-t", str(tmp_path / "nope"), "-s", S.source],
            "not_tokenizer": ["-t", T.source, "-s", str(junk)],
            "missing_outdir": ["-t", T.source, "-s", S.source]}[case]
    if case != "missing_outdir":
        out = tmp_path / "w.safetensors"
    res = CliRunner().invoke(_cli(), ["build-projection", *args, "-o", str(out), "-q"])
    assert res.exit_code != 0
    needle = {"unknown_path": "nope", "not_tokenizer": "junk.json", "missing_outdir": "does not exist"}[case]
    assert needle in res.output
    assert "Traceback" not in res.output
    assert _no_leftovers(tmp_path, allowed=("junk.json",))


def test_corrupted_and_foreign_files(tmp_path, tiny_pair):
    T, S = tiny_pair
    W = build_projection(T, S, progress=False)
    good = W.save(tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "foreign.safetensors"))
    for name, needle in (("trunc", "corrupted"), ("garbage", "corrupted"), ("foreign", "not an xtok projection"),
                         ("missing", "no such projection file")):
        with pytest.raises(ProjectionError) as e:
            ProjectionMatrix.load(tmp_path / f"{name}.safetensors")
        assert f"{name}.safetensors" in str(e.value) and needle in str(e.value)
    # the tools report it cleanly too, with no output left behind
    from projection_tools import cut as cut_mod

    res = CliRunner().invoke(_tool(cut_mod), [str(tmp_path / "trunc.safetensors"), "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code != 0 and "trunc.safetensors" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o.safetensors").exists()
    # hash mismatch through the exact tool
    from projection_tools import exact as exact_mod

    res = CliRunner().invoke(_tool(exact_mod), [str(tmp_path / "w.safetensors"), "-t", S.source, "-s", S.source,
                                                "-o", str(tmp_path / "e.safetensors")])
    assert res.exit_code != 0 and "content hash" in res.output
    assert not (tmp_path / "e.safetensors").exists()
    assert _no_leftovers(tmp_path, allowed=("w.safetensors", "trunc.safetensors", "garbage.safetensors",
                                            "foreign.safetensors"))


def _clean_failure(res, *needles):
    """A CLI run that failed the intended way: exit code != 0 via a ClickException (no uncaught
    exception, no traceback), with every needle in the message."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    for n in needles:
        assert n in res.output, (n, res.output)


def _unwritable_dir():
    """A folder that exists but where no file can be created (even as root): /proc."""
    import tempfile

    if not os.path.isdir("/proc"):
        pytest.skip("no /proc: no unwritable folder to test with")
    try:
        fd, p = tempfile.mkstemp(dir="/proc")
    except OSError:
        return "/proc"
    os.close(fd)
    os.unlink(p)
    pytest.skip("/proc is writable here: no unwritable folder to test with")


def test_unwritable_output_fails_fast(tmp_path, tiny_pair):
    """An output that cannot be written is reported before any work (here: before the teacher, which
    does not even exist, is looked at), as a clear message, by every command that writes; nothing left."""
    from projection_tools import cut as cut_mod, exact as exact_mod

    T, S = tiny_pair
    d = _unwritable_dir()
    good = build_projection(T, S, progress=False).save(tmp_path / "w.safetensors")
    (tmp_path / "plain.txt").write_text("x")
    for out, needle in ((f"{d}/w.safetensors", "cannot write"), (str(tmp_path / "plain.txt" / "w.safetensors"),
                                                                  "is not a folder")):
        runs = [(_cli(), ["build-projection", "-t", str(tmp_path / "nope"), "-s", S.source, "-o", out, "-q"]),
                (cut_mod.cli, [str(tmp_path / "nope.safetensors"), "-o", out]),
                (exact_mod.cli, [str(tmp_path / "nope.safetensors"), "-t", "nope", "-s", "nope", "-o", out])]
        for cmd, args in runs:
            res = CliRunner().invoke(cmd, args)
            _clean_failure(res, out, needle)
            assert "nope" not in res.output.replace(out, "")  # failed on the output, before the inputs
    from xtok.projection import ProjectionError, ProjectionWriteError

    W = ProjectionMatrix.load(good)
    with pytest.raises(ProjectionWriteError) as e:
        W.save(f"{d}/w.safetensors")
    assert isinstance(e.value, OSError) and isinstance(e.value, ProjectionError)
    assert f"{d}/w.safetensors" in str(e.value) and "cannot write" in str(e.value)
    assert _no_leftovers(tmp_path, allowed=("w.safetensors", "plain.txt"))


_FSIZE_CHILD = r"""
import json, os, resource, signal, sys
from click.testing import CliRunner
from projection_tools import cut as cut_mod, exact as exact_mod
from projection_tools.build import build_projection, cli as build_cli
from xtok.projection import ProjectionError
from xtok.tokens import load_tokenizer
t, s, d = sys.argv[1:4]
T, S = load_tokenizer(t), load_tokenizer(s)
W = build_projection(T, S, progress=False)  # JIT-compile everything before the limit
exact_mod.apply_exact(W, T, S)
inp = W.save(os.path.join(d, "in.safetensors"))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
out = {}
try:
    W.save(os.path.join(d, "api.safetensors"))
    out["api"] = None
except Exception as e:
    out["api"] = [type(e).__name__, isinstance(e, OSError), isinstance(e, ProjectionError), str(e)]
for name, cmd, args in (("build", build_cli, ["-t", t, "-s", s, "-o", os.path.join(d, "b.safetensors"), "-q"]),
                        ("cut", cut_mod.cli, [str(inp), "-o", os.path.join(d, "c.safetensors")]),
                        ("exact", exact_mod.cli, [str(inp), "-t", t, "-s", s, "-o", os.path.join(d, "e.safetensors")])):
    res = CliRunner().invoke(cmd, args)
    out[name] = [res.exit_code, res.output, type(res.exception).__name__]
print(json.dumps(out))
"""


def test_write_failure_leaves_nothing(tmp_path, tiny_pair):
    """A real write failure (file-size limit: EFBIG, as a full disk gives ENOSPC) during save: a clear
    ProjectionWriteError (also an OSError) from the API, a clean message from every CLI, no file left."""
    import subprocess
    import sys

    T, S = tiny_pair
    d = tmp_path / "out"
    d.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, T.source, S.source, str(d)], capture_output=True,
                       text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    kind, is_os, is_proj, msg = got["api"]
    assert kind == "ProjectionWriteError" and is_os and is_proj
    assert "api.safetensors" in msg and "cannot write" in msg and "File too large" in msg
    for name in ("build", "cut", "exact"):
        code, output, exc = got[name]
        assert code != 0 and exc == "SystemExit" and "Traceback" not in output, (name, output)
        assert f"{name[0]}.safetensors" in output and "cannot write" in output, (name, output)
    assert sorted(os.listdir(d)) == ["in.safetensors"]


# field of the format -> how to break it; each must be refused naming the file and the field
def _bad_cases():
    def put(**kw):
        def f(t, m):
            t.update(kw)
        return f

    def edit(name, fn):
        def f(t, m):
            t[name] = fn(t[name].copy())
        return f

    def setv(name, where, value):
        def g(a):
            a[where] = value
            return a
        return edit(name, g)

    return {
        "shape_len1": (edit("shape", lambda a: a[:1]), "'shape'"),
        "shape_float": (edit("shape", lambda a: a.astype(np.float64)), "'shape'"),
        "shape_rank2": (edit("shape", lambda a: a.reshape(1, 2)), "'shape'"),
        "shape_zero": (setv("shape", 0, 0), "'shape'"),
        "shape_vs_metadata": (setv("shape", 1, 7), "'student_vocab'"),
        "indices_float": (edit("indices", lambda a: a.astype(np.float32)), "'indices'"),
        "indices_int64": (edit("indices", lambda a: a.astype(np.int64)), "'indices'"),
        "indices_rank1": (edit("indices", lambda a: a.ravel()), "'indices'"),
        "indices_3xnnz": (edit("indices", lambda a: np.vstack([a, a[:1]])), "'indices'"),
        "indices_row_oob": (setv("indices", (0, -1), 10 ** 6), "'indices'"),
        "indices_col_negative": (setv("indices", (1, 0), -1), "'indices'"),
        "values_short": (edit("values", lambda a: a[:-1]), "'values'"),
        "values_float64": (edit("values", lambda a: a.astype(np.float64)), "'values'"),
        "values_nan": (setv("values", 3, np.nan), "'values'"),
        "values_negative": (setv("values", 3, -0.5), "'values'"),
        "offsets_short": (edit("decomp_offsets", lambda a: a[:-1]), "'decomp_offsets'"),
        "offsets_long": (edit("decomp_offsets", lambda a: np.append(a, a[-1])), "'decomp_offsets'"),
        "offsets_float": (edit("decomp_offsets", lambda a: a.astype(np.float64)), "'decomp_offsets'"),
        "offsets_decreasing": (setv("decomp_offsets", 5, 10 ** 4), "'decomp_offsets'"),
        "offsets_start": (edit("decomp_offsets", lambda a: a + 1), "'decomp_offsets'"),
        "offsets_vs_ids": (edit("decomp_ids", lambda a: a[:-1]), "'decomp_offsets'"),
        "decomp_ids_oob": (setv("decomp_ids", 0, 10 ** 6), "'decomp_ids'"),
        "decomp_ids_float": (edit("decomp_ids", lambda a: a.astype(np.float32)), "'decomp_ids'"),
        "decomp_ids_missing": (lambda t, m: t.pop("decomp_ids"), "'decomp_offsets'"),
        "stats_not_object": (lambda t, m: m.update(stats="[1, 2]"), "'stats'"),
        "options_not_json": (lambda t, m: m.update(options="{"), "'options'"),
    }


_BAD = _bad_cases()


@pytest.fixture(scope="module")
def tiny_w_bytes(tiny_pair, tmp_path_factory):
    T, S = tiny_pair
    return build_projection(T, S, progress=False).save(tmp_path_factory.mktemp("w") / "w.safetensors").read_bytes()


@pytest.mark.parametrize("case", list(_BAD))
def test_malformed_file_refused(tmp_path, tiny_pair, tiny_w_bytes, case):
    """A file that parses as safetensors but breaks the format: ProjectionError naming file and field from
    the API; exit code != 0, that message and no traceback from cut / inspect / exact; no output left."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from projection_tools import cut as cut_mod, exact as exact_mod, inspect as inspect_mod

    T, S = tiny_pair
    good = tmp_path / "good.safetensors"
    good.write_bytes(tiny_w_bytes)
    with safe_open(str(good), framework="numpy") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}
    mutate, field = _BAD[case]
    mutate(t, meta)
    bad = tmp_path / "bad.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, str(bad), metadata=meta)
    with pytest.raises(ProjectionError) as e:
        ProjectionMatrix.load(bad)
    assert "bad.safetensors" in str(e.value) and field in str(e.value), str(e.value)
    out = tmp_path / "o.safetensors"
    for cmd, args in ((cut_mod.cli, [str(bad), "-o", str(out)]),
                      (inspect_mod.cli, [str(bad), "-t", T.source, "-s", S.source, "--rows", "2"]),
                      (exact_mod.cli, [str(bad), "-t", T.source, "-s", S.source, "-o", str(out)])):
        _clean_failure(CliRunner().invoke(cmd, args), "bad.safetensors", field)
    assert _no_leftovers(tmp_path, allowed=("good.safetensors", "bad.safetensors"))


def test_constructor_checks_decompositions():
    indptr = np.array([0, 1, 2]); cols = np.array([0, 1]); vals = np.ones(2, np.float32)
    ProjectionMatrix(indptr, cols, vals, (2, 2), np.array([0, 1, 2]), np.array([0, 1]))
    for off, ids in (([0, 1], [0]), ([0, 2, 1], [0, 1]), ([1, 1, 2], [0, 1]), ([0, 1, 3], [0, 1])):
        with pytest.raises(ProjectionError, match="decomp_offsets"):
            ProjectionMatrix(indptr, cols, vals, (2, 2), np.array(off), np.array(ids))


def test_xtok_projection_does_not_import_tools():
    import subprocess
    import sys

    code = ("import sys, xtok.projection as p; "
            "assert not any(m.startswith('projection_tools') for m in sys.modules), 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_project_on_cuda(W_spm_tek):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, W_spm_tek.shape[0], size=(128, 10))
    probs = rng.dirichlet(np.ones(10), size=128).astype(np.float32)
    W = W_spm_tek
    W.to("cuda")
    try:
        gi, gp = W.project(torch.from_numpy(ids).cuda(), torch.from_numpy(probs).cuda())
        assert gi.device.type == "cuda"
        check_project(W, ids, probs, gi.cpu().numpy(), gp.cpu().numpy())
        assert W.torch_csr().device.type == "cuda"
    finally:
        W.to("cpu")


def _rewrite(path, out, edit_tensors=None, edit_meta=None):
    """Rewrite a W file with safetensors directly (what a hand edit does), tensors/metadata changed."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(t)
    if edit_meta:
        edit_meta(meta)
    save_file(t, str(out), metadata=meta)
    return out


def test_edited_weights_are_refused_content_checksum(tmp_path, tiny_pair):
    """Issue 14, item 3: a W whose values were changed after it was written does not load silently."""
    T, S = tiny_pair
    W = build_projection(T, S, progress=False)
    path = W.save(tmp_path / "w.safetensors")
    W1 = ProjectionMatrix.load(path, teacher=T, student=S)
    assert W1.content_verified and "content_sha256" not in W1.meta
    t_id = int(np.nonzero(np.diff(W1.indptr) == 1)[0][3])
    ids, probs = W1.project(np.array([[t_id]]), np.array([[1.0]]))
    assert abs(probs.sum() - 1.0) < 1e-6

    def five(t):
        t["values"][int(np.nonzero(t["indices"][0] == t_id)[0][0])] = 5.0

    edited = _rewrite(path, tmp_path / "edited.safetensors", five)
    with pytest.raises(ProjectionError, match=r"edited.safetensors: its content does not match the checksum recorded "
                                              r"when it was written.*Rebuild it with `xtok build-projection`"):
        ProjectionMatrix.load(edited)
    # what it would have done: mass 5 out of 1
    raw = ProjectionMatrix.load(edited, verify=False)
    assert not raw.content_verified and abs(raw.project(np.array([[t_id]]), np.array([[1.0]]))[1].sum() - 5.0) < 1e-6
    # a metadata edit (another student hash) is caught too
    other = _rewrite(path, tmp_path / "meta.safetensors", edit_meta=lambda m: m.update(student_hash="0" * 64))
    with pytest.raises(ProjectionError, match="does not match the checksum"):
        ProjectionMatrix.load(other, check_hashes=False)
    # an older file (no checksum): loads unverified, but its rows must still match options.normalize
    old = _rewrite(path, tmp_path / "old.safetensors", edit_meta=lambda m: m.pop("content_sha256"))
    Wold = ProjectionMatrix.load(old)
    assert not Wold.content_verified and Wold.nnz == W1.nnz
    old_edited = _rewrite(edited, tmp_path / "old_edited.safetensors", edit_meta=lambda m: m.pop("content_sha256"))
    with pytest.raises(ProjectionError, match=rf"old_edited.safetensors: metadata options.normalize is true but 1 "
                                              rf"non-empty rows do not sum to 1 \(teacher id {t_id} sums to 5\)"):
        ProjectionMatrix.load(old_edited)
    # an intended edit: re-saved (new checksum, normalize option off) it loads
    raw.meta["options"]["normalize"] = False
    raw.save(tmp_path / "resaved.safetensors")
    assert ProjectionMatrix.load(tmp_path / "resaved.safetensors").content_verified
    # the collator's tools refuse it too: a clean error from projection_tools.cut, nothing written
    from projection_tools import cut as cut_mod

    r = CliRunner().invoke(cut_mod.cli, [str(edited), "-o", str(tmp_path / "c.safetensors")])
    assert r.exit_code != 0 and "does not match the checksum" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "c.safetensors").exists()


def test_written_files_get_the_default_mode(tmp_path, tiny_pair):
    """Issue 14, item 5: W files get the mode of any new file (0o666 less the umask), as a store's do."""
    from xtok.store import StoreWriter

    T, S = tiny_pair
    old = os.umask(0o022)
    try:
        out = tmp_path / "w.safetensors"
        r = CliRunner().invoke(_cli(), ["build-projection", "-t", T.source, "-s", S.source, "-o", str(out), "-q"])
        assert r.exit_code == 0, r.output
        w = StoreWriter(tmp_path / "s", {"model": "m", "vocab_size": 10, "top_k": 1})
        w.finish()
        modes = {p.name: os.stat(p).st_mode & 0o777 for p in (out, tmp_path / "s" / "manifest.json")}
        assert modes == {"w.safetensors": 0o644, "manifest.json": 0o644}, modes
        os.umask(0o027)
        build_projection(T, S, progress=False).save(tmp_path / "w2.safetensors")
        assert os.stat(tmp_path / "w2.safetensors").st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
