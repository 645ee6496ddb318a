"""Fast checks of the quality benchmark's metric and baseline losses against slow, independent
re-computations (benchmarks/quality; the benchmark itself runs with benchmarks/quality/run.py), and a
smoke run of `--preset real` on tiny GGUF teachers written by the test."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality import baselines  # noqa: E402
from benchmarks.quality.data import split_corpus  # noqa: E402
from benchmarks.quality.model import ModelConfig, bits_per_byte, make_model  # noqa: E402


def test_bits_per_byte_matches_slow_per_token_loop():
    torch.manual_seed(0)
    V = 37
    model = make_model(V, ModelConfig(dim=32, layers=2, heads=2, ffn=64, max_len=64), seed=0)
    rng = np.random.default_rng(0)
    seqs = [np.concatenate([[0], rng.integers(1, V, size=n)]) for n in (1, 5, 17, 9, 30)]
    n_bytes = 123
    got = bits_per_byte(model, seqs, n_bytes, batch_size=2)   # batched, right-padded
    slow = 0.0
    with torch.no_grad():
        for s in seqs:                                        # one sequence, one prefix at a time
            for p in range(1, len(s)):
                logits = model(input_ids=torch.as_tensor(s[:p])[None]).logits[0, -1].double()
                logz = math.log(sum(math.exp(x) for x in logits.tolist()))
                slow += -(float(logits[s[p]]) - logz) / math.log(2)
    assert got == pytest.approx(slow / n_bytes, rel=1e-5)


def _uld_slow(ps, pt):
    s, t = sorted(ps, reverse=True), sorted(pt, reverse=True)
    n = max(len(s), len(t))
    s, t = s + [0.0] * (n - len(s)), t + [0.0] * (n - len(t))
    return sum(abs(a - b) for a, b in zip(s, t))


def test_uld_distance_matches_slow_reference():
    g = torch.Generator().manual_seed(1)
    ps = (torch.randn(6, 13, generator=g) * 2).softmax(-1).double()
    pt = (torch.randn(6, 20, generator=g) * 2).softmax(-1).double()
    got = baselines.uld_distance(ps, pt)
    ref = [_uld_slow(ps[i].tolist(), pt[i].tolist()) for i in range(6)]
    assert got.tolist() == pytest.approx(ref, rel=1e-9)
    # the top-N speed-up is a lower bound, exact when N covers the shorter vocabulary
    trunc = baselines.uld_distance(ps, pt, top=4)
    assert (trunc <= got + 1e-6).all()
    assert baselines.uld_distance(ps, pt, top=13).tolist() == pytest.approx(ref, rel=1e-9)


def test_uld_pairing_rules():
    q = baselines.proportional_pairs(10, 7)
    assert len(q) == 10 and q[0] == 0 and q[-1] == 6 and (np.diff(q) >= 0).all()
    assert baselines.proportional_pairs(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert baselines.index_pairs(10, 7).tolist() == list(range(7))


def test_sparse_kd_term_matches_slow_bucket_kl():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 11, generator=g, dtype=torch.float64)
    t_full = torch.randn(2, 3, 11, generator=g, dtype=torch.float64).softmax(-1)
    t_probs, t_ids = t_full.topk(4, dim=-1)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    got = float(baselines.sparse_kd_term(logits, t_ids, t_probs, mask))
    q = logits.softmax(-1)
    kls = []
    for b in range(2):
        for p in range(3):
            if not mask[b, p]:
                continue
            ids = t_ids[b, p].tolist()
            P = t_probs[b, p].tolist() + [1 - sum(t_probs[b, p].tolist())]
            Q = [float(q[b, p, i]) for i in ids] + [1 - sum(float(q[b, p, i]) for i in ids)]
            kls.append(sum(a * math.log(a / c) for a, c in zip(P, Q)))
    assert got == pytest.approx(sum(kls) / len(kls), rel=1e-4)


def test_split_is_deterministic_disjoint_and_complete():
    text = "".join(f"line {i} " + "x" * (i % 13) + "\n" for i in range(3000))
    a, b = split_corpus(text), split_corpus(text)
    assert a.train == b.train and a.heldout == b.heldout
    assert a.heldout and a.train
    lines = lambda xs: [l for x in xs for l in x.splitlines()]  # noqa: E731
    assert sorted(lines(a.train) + lines(a.heldout)) == sorted(text.splitlines())
    assert not set(lines(a.train)) & set(lines(a.heldout))
    frac = sum(map(len, a.heldout)) / len(text)
    assert 0.07 < frac < 0.13


# ------------------------------------------------------------------ the `real` preset (issue 11)
from benchmarks.quality import real_methods as rm  # noqa: E402


def test_bucket_kl_matches_slow_reference():
    g = torch.Generator().manual_seed(3)
    lq = torch.randn(5, 12, generator=g, dtype=torch.float64).log_softmax(-1)
    t = torch.randn(5, 12, generator=g, dtype=torch.float64).softmax(-1)
    probs, ids = t.topk(4, dim=-1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 3] = False          # a padded entry: its mass belongs to the tail
    valid[2, 0] = False
    got = rm.bucket_kl(lq, ids, probs, valid)
    for r in range(5):
        keep = [j for j in range(4) if valid[r, j]]
        P = [float(probs[r, j]) for j in keep]
        Q = [math.exp(float(lq[r, ids[r, j]])) for j in keep]
        P.append(1 - sum(P)); Q.append(1 - sum(Q))
        ref = sum(a * math.log(a / b) for a, b in zip(P, Q))
        assert float(got[r]) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_uld_topk_is_the_exact_sorted_l1_when_k_covers_the_support():
    g = torch.Generator().manual_seed(4)
    ps = (torch.randn(6, 9, generator=g, dtype=torch.float64) * 2).softmax(-1)
    pt_full = (torch.randn(6, 9, generator=g, dtype=torch.float64) * 2).softmax(-1)
    t_sorted = pt_full.sort(-1, descending=True).values
    exact = [_uld_slow(ps[i].tolist(), pt_full[i].tolist()) for i in range(6)]
    got = rm.uld_topk(ps, t_sorted, torch.zeros(6, dtype=torch.float64))
    assert got.tolist() == pytest.approx(exact, rel=1e-9)
    # with a truncated teacher (top-4 + tail) it is a lower bound of the exact distance
    low = rm.uld_topk(ps, t_sorted[:, :4], 1 - t_sorted[:, :4].sum(-1))
    assert (low <= torch.tensor(exact, dtype=torch.float64) + 1e-12).all()


def _gold_slow(lq, c_s, t_match, t_probs, t_valid, t_tail, c_t, s_matched):
    V = len(lq)
    et, es = math.exp(c_t), math.exp(c_s)
    Q = [math.exp(x) * es for x in lq]
    M = [j for j in range(len(t_probs)) if t_valid[j] and t_match[j] >= 0]
    P = {j: t_probs[j] * et for j in range(len(t_probs)) if t_valid[j]}
    gkl = sum(P[j] * math.log(P[j] / Q[t_match[j]]) for j in M)
    p_rest = et - sum(P[j] for j in M)
    q_rest = es - sum(Q[t_match[j]] for j in M)
    gkl += p_rest * math.log(p_rest / q_rest) - et + es
    Ut = sorted((P[j] for j in P if t_match[j] < 0), reverse=True)
    Us = sorted((Q[v] for v in range(V) if not s_matched[v]), reverse=True)[:len(Ut)]
    Us += [0.0] * (len(Ut) - len(Us))
    uld = sum(abs(a - b) for a, b in zip(Ut, Us))
    uld += abs((sum(Q[v] for v in range(V) if not s_matched[v]) - sum(Us)) - t_tail * et)
    return gkl, uld


def test_gold_terms_match_slow_reference():
    g = torch.Generator().manual_seed(5)
    N, V, k = 4, 15, 5
    lq = torch.randn(N, V, generator=g, dtype=torch.float64).log_softmax(-1)
    t = torch.randn(N, 20, generator=g, dtype=torch.float64).softmax(-1)
    t_probs, _ = t.topk(k, dim=-1)
    t_tail = 1 - t_probs.sum(-1)
    t_valid = torch.ones(N, k, dtype=torch.bool)
    t_valid[3, 4] = False
    t_match = torch.tensor([[0, 3, -1, 7, -1], [-1, -1, -1, -1, -1], [2, 4, 6, 8, 10], [1, -1, 5, -1, 9]])
    s_matched = torch.zeros(V, dtype=torch.bool)
    s_matched[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] = True
    c_s = torch.tensor([0.0, -0.7, -2.1, -0.2], dtype=torch.float64)
    c_t = torch.tensor([0.0, -0.5, -1.9, -1.0], dtype=torch.float64)
    gkl, uld = rm.gold_terms(lq, c_s, t_match, t_probs, t_valid, t_tail, c_t, s_matched)
    for r in range(N):
        rg, ru = _gold_slow(lq[r].tolist(), float(c_s[r]), t_match[r].tolist(), t_probs[r].tolist(),
                            t_valid[r].tolist(), float(t_tail[r]), float(c_t[r]), s_matched.tolist())
        assert float(gkl[r]) == pytest.approx(rg, rel=1e-9, abs=1e-12)
        assert float(uld[r]) == pytest.approx(ru, rel=1e-9, abs=1e-12)
    # GKL is a divergence: zero when the teacher equals the student on every bucket (same masses, same c)
    q_m = lq.gather(-1, t_match.clamp_min(0)).exp()
    same = t_match >= 0
    gkl0, _ = rm.gold_terms(lq, c_s, t_match, q_m, same, 1 - torch.where(same, q_m, 0.0).sum(-1), c_s, s_matched)
    assert float(gkl0.abs().max()) < 1e-10     # (the 1e-12 log guards leave ~1e-11)
    assert float(gkl.min()) > 0


def test_gold_chunks_sum_the_chunks_own_tokens(spm_tok, tekken_tok):
    from xtok.alignment import align

    text = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day, Citizen!\n#### 18"
    multi = set()
    for tt, st in ((tekken_tok, spm_tok), (spm_tok, tekken_tok)):   # multi-token chunks on either side
        t_ids = np.concatenate([[tt.bos_id], tt.encode(text)])
        s_ids = np.concatenate([[st.bos_id], st.encode(text)])
        lp = -np.random.default_rng(0).random(len(t_ids) - 1).astype(np.float32)
        g = rm.gold_chunks(tt, st, t_ids, s_ids, lp)
        chunks = [c for c in align(tt, st, t_ids, s_ids).chunks.tolist() if c[0] >= 1 and c[2] >= 1]
        assert len(chunks) == len(g["tpos"]) > 10
        multi |= {"teacher" for c in chunks if c[1] - c[0] > 1} | {"student" for c in chunks if c[3] - c[2] > 1}
        cont = {}
        for ci, p in zip(g["cont_chunk"].tolist(), g["cont_pos"].tolist()):
            cont.setdefault(ci, []).append(p)
        for i, (t0, t1, s0, s1) in enumerate(chunks):
            assert g["tpos"][i] == t0 - 1 and g["spos"][i] == s0 - 1
            assert g["c_t"][i] == pytest.approx(sum(float(lp[p]) for p in range(t0, t1 - 1)), abs=1e-5)
            assert cont.get(i, []) == list(range(s0, s1 - 1))
    assert multi == {"teacher", "student"}                    # merges on both sides were exercised


def test_real_split_is_deterministic_and_disjoint(tmp_path):
    from benchmarks.quality.real_data import RealCorpusConfig, build_split

    txt = tmp_path / "t.txt"
    txt.write_text("".join(f"line {i} " + "y" * (i % 17) + "\n" for i in range(4000)))
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"})
                          + "\n" for i in range(50)))
    cfg = RealCorpusConfig(shakespeare=str(txt), gsm8k=str(qa), shakespeare_bytes=30000, shakespeare_blocks=10,
                           gsm8k_problems=40, heldout_every=5, example_bytes=300)
    a, b = build_split(cfg), build_split(cfg)
    assert a == b
    assert a.heldout_source.count("gsm8k") == 8 and a.train_source.count("gsm8k") == 32
    lines = lambda xs: [l for x in xs for l in x.splitlines()]  # noqa: E731
    assert not set(lines(a.train)) & set(lines(a.heldout))
    assert sum(len(x) for x, s in zip(a.train + a.heldout, a.train_source + a.heldout_source)
               if s == "shakespeare") <= 30000


def _tiny_real_setup(tmp_path, monkeypatch, shakespeare_text):
    """Two tiny random GGUF teachers (CI has no teacher packages), a small corpus and the real-smoke
    command line. Returns (models, files, argv, docs dir)."""
    pytest.importorskip("gguf", reason="the gguf package (xtok[gguf]) is not installed")
    from benchmarks.quality.tiny_gguf import tiny_llama, write_llama_gguf
    from xtok.tokens import mistral_common_data_dir

    monkeypatch.setenv("XTOK_CACHE_DIR", str(tmp_path / "xtok-cache"))
    mc = mistral_common_data_dir()
    models, files = {}, {}
    for name, vocab, spm, seed in (("smollm2", 32000, "tokenizer.model.v1", 1),
                                   ("gemma3", 32768, "mistral_instruct_tokenizer_240323.model.v3", 2)):
        models[name] = tiny_llama(vocab, seed=seed, logit_scale=3.0)
        (tmp_path / name).mkdir()
        files[name] = write_llama_gguf(models[name], tmp_path / name / f"{name}.gguf", str(mc / spm))
    txt = tmp_path / "text.txt"
    txt.write_text(shakespeare_text[:8000])
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"Tom has {i} apples and buys {i + 2} more. How many?",
                                      "answer": f"{i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n#### {2 * i + 2}"})
                          + "\n" for i in range(10)))
    docs = tmp_path / "docs"
    argv = ["--preset", "real-smoke", "--teacher", f"smollm2={files['smollm2']}", "--teacher",
            f"gemma3={files['gemma3']}", "--student-tokenizer", "mistral-common:tekken_240911.json",
            "--shakespeare", str(txt), "--gsm8k", str(qa), "--cache", str(tmp_path / "cache"),
            "--docs-dir", str(docs), "--workers", "1", "--threads", "1"]
    return models, files, argv, docs


@pytest.mark.slow
def test_real_preset_end_to_end_with_tiny_gguf_teachers(tmp_path, monkeypatch, shakespeare_text):
    """`run.py --preset real-smoke`: the real preset's whole path (GGUF teachers through `xtok extract`,
    `xtok build-projection`, every method, results.json/.md/.png) on two tiny random GGUF teachers written
    here (CI has no teacher packages), a third tokenizer for the students, and a small corpus."""
    from benchmarks.quality import real
    from benchmarks.quality.real_data import RealCorpusConfig, build_split
    from xtok.tokens import load_tokenizer

    models, files, argv, docs = _tiny_real_setup(tmp_path, monkeypatch, shakespeare_text)
    rep = real.main(argv)
    assert set(rep["methods"]) == set(real.METHODS)
    for m, r in rep["methods"].items():
        assert not r.get("errors"), (m, r.get("errors"))
        assert len(r["runs"]) == 1 and math.isfinite(r["runs"][0]["bpb"]) and r["runs"][0]["bpb"] > 0, m
    assert json.loads((docs / "results.json").read_text())["methods"]["xtok_two"]["runs"][0]["bpb"] == \
        rep["methods"]["xtok_two"]["runs"][0]["bpb"]
    md = (docs / "results.md").read_text()
    assert "Targets of issue 11" in md and all(r["label"] in md for r in rep["methods"].values())
    # the sizing group (the same methods on every training example) is run and rendered beside the main group
    assert rep["settings"]["train_every"] == 2 and rep["sizing"]["train_every"] == 1
    assert rep["sizing"]["train_examples_used"] > rep["settings"]["train_examples_used"]
    assert all(len(r["runs"]) == 1 for r in rep["sizing"]["methods"].values())
    assert "## Sizing" in md and f"all {rep['sizing']['train_examples_used']:,} examples" in md
    assert (docs / "results.png").stat().st_size > 1000
    assert set(rep["targets"]) >= {"setup_upper_bound_beats_sft", "gap_closed", "xtok_beats_uld", "xtok_beats_gold",
                                   "two_teachers_vs_best_single"}
    # the teachers' own bpb (read from their stores) equals a float64 forward of the same weights
    split = build_split(RealCorpusConfig(**rep["settings"]["corpus"]))
    n_bytes = sum(len(t.encode()) for t in split.heldout)
    for name, model in models.items():
        tok = load_tokenizer(str(files[name]))
        bits = 0.0
        with torch.no_grad():
            for t in split.heldout:
                ids = torch.as_tensor(np.concatenate([[tok.bos_id], tok.encode(t)]))
                lp = model(input_ids=ids[None]).logits[0, :-1].double().log_softmax(-1)
                bits -= float(lp.gather(-1, ids[1:, None]).sum()) / math.log(2)
        assert rep["teachers"][name]["bpb"] == pytest.approx(bits / n_bytes, rel=2e-3)
    # the stores were made by this run (the cache folder was empty), through `xtok extract`
    assert all(t["extract"]["cached"] is False and t["extract"]["extract_seconds"] > 0
               for t in rep["teachers"].values())


@pytest.mark.slow
def test_real_preset_onpolicy_with_tiny_gguf_teachers(tmp_path, monkeypatch, shakespeare_text):
    """`run.py --preset real-smoke --methods xtok_kl --onpolicy` (issue 13): the xtok KL student's saved weights,
    continued by more off-policy steps and by on-policy steps (lam 0.5 and 1) with the live GGUF teacher at the
    same teacher-token budget, evaluated (held-out bpb, the teacher's bpb on the student's samples) and
    rendered; a second run reuses every cached arm."""
    from benchmarks.quality import onpolicy, real
    from xtok.extract import load_teacher
    from xtok.tokens import load_tokenizer

    models, files, argv, docs = _tiny_real_setup(tmp_path, monkeypatch, shakespeare_text)
    rep = real.main(argv + ["--methods", "xtok_kl", "--onpolicy", "--no-sizing"])
    op = rep["onpolicy"]
    cfg = real.PRESETS["real-smoke"]["onpolicy"]
    assert set(op["arms"]) == {"start", "offpolicy", "lam=0.5", "lam=1"}
    A = {arm: a["runs"][0] for arm, a in op["arms"].items()}
    assert all(not a["errors"] and len(a["runs"]) == 1 for a in op["arms"].values()), op["arms"]
    # the starting point is the main run's student (weights saved and re-loaded)
    assert A["start"]["heldout_bpb"] == pytest.approx(rep["methods"]["xtok_kl"]["runs"][0]["bpb"], rel=1e-6)
    # the budget: off-policy takes exactly N steps and spends B; on-policy arms spend at least B, at most one step over
    B = A["offpolicy"]["budget"]
    assert B > 0 and A["offpolicy"]["steps"] == cfg["offpolicy_steps"] and A["offpolicy"]["teacher_tokens"] == B
    assert A["offpolicy"]["onpolicy_steps"] == 0
    assert A["lam=1"]["onpolicy_steps"] == A["lam=1"]["steps"] >= 1 and A["lam=1"]["generated_tokens"] > 0
    for arm in ("lam=0.5", "lam=1"):
        a = A[arm]
        assert a["budget"] == B and a["teacher_tokens"] >= B
        assert a["teacher_tokens"] - B < a["teacher_tokens"] / max(a["steps"] - 1, 1) + 1e-9 or a["steps"] == 1
    for arm in ("offpolicy", "lam=0.5", "lam=1"):        # every arm trained: the student changed
        assert A[arm]["heldout_bpb"] != A["start"]["heldout_bpb"]
    for a in A.values():
        assert math.isfinite(a["teacher_bpb_sampled"]) and a["teacher_bpb_sampled"] > 0
        assert math.isfinite(a["teacher_bpb_greedy"]) and a["teacher_bpb_greedy"] > 0
    md = (docs / "results.md").read_text()
    assert "On-policy vs more off-policy steps (issue 13)" in md and "(c) on-policy, lam = 1" in md
    assert json.loads((docs / "results.json").read_text())["onpolicy"]["arms"]["lam=1"]["runs"][0]["heldout_bpb"] == \
        A["lam=1"]["heldout_bpb"]
    # teacher_bits: with no prefix every token after BOS counts and equals a plain forward of the same weights;
    # after a prefix it is the same forward's bits of the tokens past the prefix
    teacher, _, _ = load_teacher(str(files["smollm2"]), dtype="float32", device="cpu")
    tok = load_tokenizer(str(files["smollm2"]))
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    bits, nbytes = onpolicy.teacher_bits(teacher, tok, b"", text.encode())
    ids = torch.as_tensor(np.concatenate([[tok.bos_id], tok.encode(text)]))
    with torch.no_grad():
        lp = models["smollm2"](input_ids=ids[None]).logits[0, :-1].double().log_softmax(-1)
    tok_bits = -lp.gather(-1, ids[1:, None])[:, 0].numpy() / math.log(2)
    assert nbytes == len(text.encode()) and bits == pytest.approx(tok_bits.sum(), rel=1e-4)
    _, spans = tok.encode_with_offsets(text)
    cut = int(spans[5, 0])                     # a token boundary: tokens 5.. are the continuation
    b2, n2 = onpolicy.teacher_bits(teacher, tok, text.encode()[:cut], text.encode()[cut:])
    assert n2 == len(text.encode()) - cut and b2 == pytest.approx(tok_bits[5:].sum(), rel=1e-4)
    # a second run reuses the cached students and arms
    rep2 = real.main(argv + ["--methods", "xtok_kl", "--onpolicy", "--no-sizing"])
    assert all(r.get("cached") for a in rep2["onpolicy"]["arms"].values() for r in a["runs"])
    assert rep2["onpolicy"]["arms"]["lam=0.5"]["heldout_bpb"] == op["arms"]["lam=0.5"]["heldout_bpb"]


def test_real_preset_names_a_missing_teacher_file(tmp_path):
    """A --teacher path that does not exist stops the run before anything is built, naming the option
    and the fix; nothing is written."""
    from benchmarks.quality import real

    out = tmp_path / "r.json"
    with pytest.raises(SystemExit, match=r"--teacher smollm2=.*missing\.gguf: no such file"):
        real.main(["--preset", "real-smoke", "--teacher", f"smollm2={tmp_path / 'missing.gguf'}", "--methods", "sft",
                   "--cache", str(tmp_path / "cache"), "--out", str(out), "--no-docs"])
    assert not out.exists()
