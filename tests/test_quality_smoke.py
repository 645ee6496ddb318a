"""Fast checks of the quality benchmark's metric and baseline losses against slow, independent
re-computations (benchmarks/quality; the benchmark itself runs with benchmarks/quality/run.py)."""
from __future__ import annotations

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
