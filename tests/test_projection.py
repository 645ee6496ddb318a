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

from conftest import MISTRAL_SPM, TEKKEN, asset
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


def check_real_pair(T, S, W, n_sample=1500, seed=0):
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
    # first token of every sampled non-exact row = what the student tokenizer itself produces
    exact_set = set(exact_rows)
    cand = [t for t in range(T.vocab_size) if not tbT.is_special[t] and t not in exact_set and tbT.get(t)]
    rng = random.Random(seed)
    sample = rng.sample(cand, min(n_sample, len(cand)))
    n_greedy = 0
    for t in sample:
        how, dec = ref_decompose(S, tbT.get(t), s_dict, maxlen)
        got = W.decomposition(t).tolist()
        if how == "text":
            assert got == dec, (t, tbT.get(t))
        elif how == "greedy":
            n_greedy += 1
            assert [S.token_bytes.get(i) for i in got] == dec, (t, tbT.get(t))
        else:  # unrepresentable bytes: unverified encoding or unk
            assert W.stats["tiers"].get("unverified", 0) + W.stats["tiers"].get("unk", 0) > 0
            continue
        assert W.row(t)[0].tolist() == [got[0]]
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
    for t in range(spm.vocab_size):
        b = None if tb.is_special[t] else tb.get(t)
        if b and b in s_dict:
            ids, w = W2.row(t)
            assert ids.size == 1 and int(ids[0]) in s_dict[b] and w[0] == 1
            assert W2.decomposition(t).tolist() == ids.tolist()
        else:  # untouched
            a_i, a_w = Wed.row(t)
            b_i, b_w = W2.row(t)
            assert np.array_equal(a_i, b_i) and np.array_equal(a_w, b_w)
            assert np.array_equal(Wed.decomposition(t), W2.decomposition(t))
    assert n > 0


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


def test_write_failure_leaves_nothing(tmp_path, tiny_pair, monkeypatch):
    T, S = tiny_pair
    W = build_projection(T, S, progress=False)
    import safetensors.numpy as stn

    def boom(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(stn, "save_file", boom)
    with pytest.raises(OSError):
        W.save(tmp_path / "w.safetensors")
    assert os.listdir(tmp_path) == []


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
