"""xtok.losses against dense float64 references written here independently (full softmax, python
loops over positions): values and gradients for every variant and both input paths (logits, fused
hidden + lm_head), gradcheck (KL, chunk, SFT, aggregator), KL >= 0, zero at the teacher, a tail that
is float32 noise, masks for every component, identity W == sparse top-k KD with a tail bucket (with
sampled tail tokens), aggregator weighting / absent teachers / renormalisation with chunk-only
teachers, the store-temperature check, bf16 autocast, no full-size tensors (also for non-contiguous
inputs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from xtok.losses import (ChunkLikelihoodLoss, CrossTokenizerKLLoss, MultiTeacherLossAggregator, SFTLoss,
                         TeacherLoss)

D64 = torch.float64
REVERSE_FLOOR = 1e-5  # the documented reverse-KL floor on the teacher's cells (docs/losses.md section 1)

# ------------------------------------------------------------------------------------------------
# random batches in the collator's layout
# ------------------------------------------------------------------------------------------------


def make_teacher(B, T, V, P, K, seed, tail=True, dtype=D64, absent=(), masked_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, T, (B, P), generator=g)
    mask = torch.rand(B, P, generator=g) > masked_frac
    ids = torch.zeros(B, P, K, dtype=torch.long)
    probs = torch.zeros(B, P, K, dtype=dtype)
    tail_mass = torch.zeros(B, P, dtype=dtype)
    for b in range(B):
        for p in range(P):
            k = int(torch.randint(1, K + 1, (1,), generator=g))  # rows with fewer ids are padded (id 0, prob 0)
            ids[b, p, :k] = torch.randperm(V, generator=g)[:k]
            w = torch.rand(k, generator=g, dtype=dtype) + 0.05
            r = float(torch.rand(1, generator=g)) * 0.5 if tail else 0.0
            probs[b, p, :k] = w / w.sum() * (1 - r)
            tail_mass[b, p] = r
    present = torch.ones(B, dtype=torch.bool)
    for b in absent:
        present[b] = False
    C = 3
    spans = torch.zeros(B, C, 2, dtype=torch.long)
    cmask = torch.zeros(B, C, dtype=torch.bool)
    clp = torch.zeros(B, C, dtype=torch.float32)
    for b in range(B):
        s = 1
        for c in range(C):
            ln = int(torch.randint(1, 3, (1,), generator=g))
            if s + ln > T:
                break
            spans[b, c] = torch.tensor([s, s + ln])
            cmask[b, c] = bool(torch.rand(1, generator=g) > 0.2)
            clp[b, c] = -float(torch.rand(1, generator=g)) * 3 * ln - 0.01
            s += ln + int(torch.randint(0, 2, (1,), generator=g))
    return {"positions": pos, "mask": mask, "target_ids": ids, "target_probs": probs, "tail_mass": tail_mass,
            "chunk_spans": spans, "chunk_teacher_logprob": clp, "chunk_mask": cmask, "present": present}


def make_batch(B, T, V, seed, teachers=("a", "b"), **kw):
    g = torch.Generator().manual_seed(seed + 1000)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    labels = input_ids.clone()
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": labels,
            "teachers": {n: make_teacher(B, T, V, 5, 4, seed + i, **kw) for i, n in enumerate(teachers)}}


# ------------------------------------------------------------------------------------------------
# independent dense references (float64, full softmax, loops)
# ------------------------------------------------------------------------------------------------


def ref_kl_terms(logits, tb, variant, tau=1.0, beta=0.5, eps=REVERSE_FLOOR):
    """list of ((b, p), divergence) for every valid target position."""
    out = []
    B, P = tb["positions"].shape
    T = logits.shape[1]
    for b in range(B):
        if not bool(tb["present"][b]):
            continue
        for p in range(P):
            t = int(tb["positions"][b, p])
            if not bool(tb["mask"][b, p]) or not 0 <= t < T:
                continue
            s = torch.softmax(logits[b, t].to(D64) / tau, dim=0)
            ids, q = tb["target_ids"][b, p], tb["target_probs"][b, p].to(D64)
            keep = q > 0
            ids, q = ids[keep], q[keep]
            inset = torch.zeros_like(s, dtype=torch.bool)
            inset[ids] = True
            s_cells = torch.cat([s[ids], s[~inset].sum()[None]])
            q_cells = torch.cat([q, tb["tail_mass"][b, p].to(D64)[None]])
            q_cells = q_cells / q_cells.sum()
            if variant == "forward":
                d = sum(qc * torch.log(qc / sc) for qc, sc in zip(q_cells, s_cells) if qc > 0)
            elif variant == "reverse":
                qf = q_cells.clamp_min(eps)
                qf = qf / qf.sum()
                d = (s_cells * torch.log(s_cells / qf)).sum()
            else:
                m = beta * q_cells + (1 - beta) * s_cells
                d = beta * sum(qc * torch.log(qc / mc) for qc, mc in zip(q_cells, m) if qc > 0) \
                    + (1 - beta) * (s_cells * torch.log(s_cells / m)).sum()
            out.append(((b, p), d))
    return out


def ref_chunk_terms(logits, tb, input_ids, variant="forward", tau=1.0):
    out = []
    B, C = tb["chunk_mask"].shape
    for b in range(B):
        if not bool(tb["present"][b]):
            continue
        for c in range(C):
            if not bool(tb["chunk_mask"][b, c]):
                continue
            s0, s1 = (int(v) for v in tb["chunk_spans"][b, c])
            lps = sum(torch.log_softmax(logits[b, j - 1].to(D64), 0)[int(input_ids[b, j])] for j in range(s0, s1))
            pt = torch.exp(tb["chunk_teacher_logprob"][b, c].to(D64) / tau)
            ps = torch.exp(lps / tau)
            if variant == "reverse":
                pt, ps = ps, pt
            out.append(((b, c), pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))))
    return out


def ref_sft_sum(logits, labels):
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).to(D64), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


def mean_of(terms):
    return sum(d for _, d in terms) / max(len(terms), 1)


# ------------------------------------------------------------------------------------------------
# CrossTokenizerKLLoss
# ------------------------------------------------------------------------------------------------

VARIANTS = [("forward", 1.0, 0.5), ("forward", 2.0, 0.5), ("reverse", 1.0, 0.5), ("reverse", 0.7, 0.5),
            ("jsd", 1.0, 0.5), ("jsd", 1.5, 0.2)]


@pytest.mark.parametrize("variant,tau,beta", VARIANTS)
@pytest.mark.parametrize("fused", [False, True])
def test_kl_values_and_grads_match_dense_reference(variant, tau, beta, fused):
    B, T, V, H = 3, 7, 23, 6
    tb = make_teacher(B, T, V, 6, 5, seed=1, absent=(2,))
    g = torch.Generator().manual_seed(2)
    if fused:
        h = torch.randn(B, T, H, dtype=D64, generator=g, requires_grad=True)
        W = torch.randn(V, H, dtype=D64, generator=g, requires_grad=True)
        inputs, student = (h, W), lambda: (h, W)
        logits_of = lambda: h @ W.t()  # noqa: E731
    else:
        z = (torch.randn(B, T, V, dtype=D64, generator=g) * 2).requires_grad_(True)
        inputs, student, logits_of = (z,), (lambda: z), (lambda: z)
    loss = CrossTokenizerKLLoss(variant, tau=tau, beta=beta, tau_squared=True, chunk_size=4)(student(), tb)
    ref = mean_of(ref_kl_terms(logits_of(), tb, variant, tau, beta)) * tau ** 2
    assert len(ref_kl_terms(logits_of(), tb, variant, tau, beta)) >= 5
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    g_mine = torch.autograd.grad(loss, inputs)
    g_ref = torch.autograd.grad(ref, inputs)
    for a, b in zip(g_mine, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", ["forward", "reverse", "jsd"])
def test_kl_gradcheck(variant):
    B, T, V, H = 2, 4, 9, 3
    tb = make_teacher(B, T, V, 3, 3, seed=3)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(B, T, V, dtype=D64, generator=g, requires_grad=True)
    f = CrossTokenizerKLLoss(variant, tau=1.3, chunk_size=2)
    assert torch.autograd.gradcheck(lambda x: f(x, tb), (z,))
    h = torch.randn(B, T, H, dtype=D64, generator=g, requires_grad=True)
    W = torch.randn(V, H, dtype=D64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: f((a, w), tb), (h, W))
    # frozen hidden states: only W gets a gradient, the same one
    gW = torch.autograd.grad(f((h, W), tb), W)[0]
    torch.testing.assert_close(torch.autograd.grad(f((h.detach(), W), tb), W)[0], gW, rtol=0, atol=0)


def test_kl_per_position_reduction_none_and_nonnegative():
    B, T, V = 4, 9, 31
    for seed in range(4):
        tb = make_teacher(B, T, V, 7, 6, seed=10 + seed)
        z = torch.randn(B, T, V, dtype=torch.float32, generator=torch.Generator().manual_seed(seed)) * 4
        for variant in ("forward", "reverse", "jsd"):
            per = CrossTokenizerKLLoss(variant, reduction="none", chunk_size=5)(z, tb)
            assert per.shape == (B, 7)
            ref = ref_kl_terms(z, tb, variant)
            assert len(ref) > 0
            for (b, p), d in ref:
                assert d >= 0
                torch.testing.assert_close(per[b, p].double(), d, rtol=2e-4, atol=2e-6)
            valid = torch.zeros(B, 7, dtype=torch.bool)
            for (b, p), _ in ref:
                valid[b, p] = True
            assert (per[~valid] == 0).all()
            assert (per[valid] >= -1e-6).all()


def student_at_teacher(tb, B, T, V, tau, seed):
    """Logits whose softmax(z / tau) equals the teacher on the target ids and spreads the tail mass
    (randomly) over the other ids: the (projected) teacher itself."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, dtype=D64, generator=g)
    used = set()
    for b in range(B):
        for p in range(tb["positions"].shape[1]):
            t = int(tb["positions"][b, p])
            if (b, t) in used:
                tb["mask"][b, p] = False  # one target per student position
                continue
            used.add((b, t))
            q, ids = tb["target_probs"][b, p], tb["target_ids"][b, p]
            keep = q > 0
            dist = torch.rand(V, generator=g, dtype=D64) + 0.1
            dist[ids[keep]] = 0
            dist = dist / dist.sum() * tb["tail_mass"][b, p]
            dist[ids[keep]] = q[keep].to(D64)
            z[b, t] = torch.log(dist) * tau + 3.0
    return z


@pytest.mark.parametrize("variant", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("fused", [False, True])
def test_kl_zero_and_stationary_at_teacher(variant, fused):
    B, T, V, tau = 2, 6, 17, 1.7
    tb = make_teacher(B, T, V, 4, 4, seed=5)
    z = student_at_teacher(tb, B, T, V, tau, seed=6).requires_grad_(True)
    f = CrossTokenizerKLLoss(variant, tau=tau, chunk_size=3)
    if fused:  # hidden = logits rows, W = identity: the fused path must agree
        W = torch.eye(V, dtype=D64, requires_grad=True)
        loss = f((z, W), tb)
    else:
        loss = f(z, tb)
    assert abs(loss.item()) < 1e-12
    (gz,) = torch.autograd.grad(loss, z)
    assert gz.abs().max() < 1e-10
    # and moving away from the teacher makes it strictly positive
    z2 = z.detach().clone()
    b, p = tb["mask"].nonzero()[0].tolist()
    z2[b, int(tb["positions"][b, p]), int(tb["target_ids"][b, p, 0])] += 1.0
    assert float(f(z2, tb)) > 1e-6


MASK_VARIANTS = ["forward", "reverse", "jsd", "chunk", "sft", "aggregator"]
KL_VARIANTS_ = ("forward", "reverse", "jsd")


def _masked_setup(kind):
    """(loss of logits, used [B,T] rows from an independent python loop over the batch, batch)."""
    B, T, V = 3, 8, 19
    batch = make_batch(B, T, V, seed=7, teachers=("a",))
    tb = batch["teachers"]["a"]
    tb["present"][1] = False
    labels = batch["labels"]
    kl_rows = {(b, int(tb["positions"][b, p])) for b in range(B) for p in range(tb["mask"].shape[1])
               if tb["mask"][b, p] and tb["present"][b]}
    chunk_rows = {(b, j - 1) for b in range(B) for c in range(tb["chunk_mask"].shape[1])
                  if tb["chunk_mask"][b, c] and tb["present"][b]
                  for j in range(int(tb["chunk_spans"][b, c, 0]), int(tb["chunk_spans"][b, c, 1]))}
    sft_rows = {(b, t) for b in range(B) for t in range(T - 1) if labels[b, t + 1] != -100}
    if kind in KL_VARIANTS_:
        f, rows = CrossTokenizerKLLoss(kind, tau=1.3, chunk_size=2), kl_rows
        fn = lambda z, bt: f(z, bt["teachers"]["a"])  # noqa: E731
    elif kind == "chunk":
        f, rows = ChunkLikelihoodLoss(tau=1.5, chunk_size=2), chunk_rows
        fn = lambda z, bt: f(z, bt["teachers"]["a"], bt["input_ids"])  # noqa: E731
    elif kind == "sft":
        f, rows = SFTLoss(chunk_size=2), sft_rows
        fn = lambda z, bt: f(z, bt["labels"])  # noqa: E731
    else:
        agg = MultiTeacherLossAggregator({"a": TeacherLoss(1.0, 0.5, CrossTokenizerKLLoss("reverse"))}, sft_weight=0.3,
                                         chunk_size=2)
        rows = kl_rows | chunk_rows | sft_rows
        fn = lambda z, bt: agg(z, bt)[0]  # noqa: E731
    used = torch.zeros(B, T, dtype=torch.bool)
    for b, t in rows:
        used[b, t] = True
    return fn, used, batch, (B, T, V)


@pytest.mark.parametrize("kind", MASK_VARIANTS)
def test_masks_absent_and_untargeted_positions_change_nothing(kind):
    fn, used, batch, (B, T, V) = _masked_setup(kind)
    z = torch.randn(B, T, V, dtype=D64, generator=torch.Generator().manual_seed(8), requires_grad=True)
    base = fn(z, batch)
    assert base.item() > 0
    (gz,) = torch.autograd.grad(base, z)
    assert (~used).any() and used.any()
    assert (gz[~used] == 0).all() and (gz[used] != 0).any(dim=-1).all()
    z2 = z.detach().clone()
    z2[~used] = torch.randn(int((~used).sum()), V, dtype=D64, generator=torch.Generator().manual_seed(9)) * 10
    torch.testing.assert_close(fn(z2, batch), base.detach(), rtol=0, atol=0)
    # a used position's logits do matter (the check above can fail)
    z3 = z.detach().clone()
    z3[used] += torch.randn(int(used.sum()), V, dtype=D64, generator=torch.Generator().manual_seed(10))
    assert fn(z3, batch).item() != base.item()
    # a masked / absent target's contents change nothing either
    tb = batch["teachers"]["a"]
    tb2 = {k: v.clone() for k, v in tb.items()}
    tb2["target_probs"][1] = 0.0                      # example 1: teacher absent
    tb2["target_ids"][~tb["mask"]] = 3                # masked target positions
    tb2["tail_mass"][~tb["mask"]] = 0.7
    tb2["chunk_teacher_logprob"][~tb["chunk_mask"]] = -0.123
    tb2["chunk_teacher_logprob"][1] = -5.0
    torch.testing.assert_close(fn(z, {**batch, "teachers": {"a": tb2}}), base, rtol=0, atol=0)


def test_chunk_size_invariance():
    B, T, V = 2, 9, 29
    batch = make_batch(B, T, V, seed=9)
    z = torch.randn(B, T, V, dtype=D64, generator=torch.Generator().manual_seed(10))
    agg = lambda cs: MultiTeacherLossAggregator({"a": TeacherLoss(1.0, 0.3), "b": TeacherLoss(0.5, 0.0, CrossTokenizerKLLoss("jsd"))},  # noqa: E731
                                                sft_weight=0.7, chunk_size=cs)
    vals = []
    for cs in (1, 3, 7, None):
        x = z.clone().requires_grad_(True)
        loss, _ = agg(cs)(x, batch)
        loss.backward()
        vals.append((loss.detach(), x.grad))
    for v, gr in vals[1:]:
        torch.testing.assert_close(v, vals[0][0], rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(gr, vals[0][1], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# same tokenizer: identity W == standard sparse top-k KD with a tail bucket
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("m", [0, 6])
def test_identity_projection_is_sparse_topk_kd_with_tail_bucket(variant, beta, m):
    """Same tokenizer (identity W): the loss on the collator-style target (top-k probs, plus m sampled
    tail ids of weight r/m each, projected through W in float32; tail_mass = max(0, 1 - sum) as the
    collator computes it) equals sparse top-k KD with a tail bucket computed directly from the dense
    float64 teacher: cells = top-k ids and the distinct sampled ids (mass r * count / m), bucket = the
    rest (r without samples, 0 with them)."""
    from xtok.projection import ProjectionMatrix

    B, T, V, k = 2, 6, 40, 5
    g = torch.Generator().manual_seed(11 + m)
    t_logits = torch.randn(B, T, V, dtype=D64, generator=g) * 3
    s_logits = torch.randn(B, T, V, dtype=D64, generator=g, requires_grad=True)
    W = ProjectionMatrix.from_coo(np.arange(V), np.arange(V), np.ones(V), (V, V))
    t_p = torch.softmax(t_logits, -1)
    top_p, top_ids = t_p.topk(k, dim=-1)
    r_true = 1 - top_p.sum(-1)
    in_ids, in_p = top_ids, top_p
    if m:
        tail_p = t_p.scatter(-1, top_ids, 0.0).reshape(-1, V)
        tail_ids = torch.multinomial(tail_p, m, replacement=True, generator=g).reshape(B, T, m)
        in_ids = torch.cat([top_ids, tail_ids], -1)
        in_p = torch.cat([top_p, (r_true / m)[..., None].expand(B, T, m)], -1)
    pids, pprobs = W.project(in_ids.reshape(-1, in_ids.shape[-1]), in_p.float().reshape(-1, in_ids.shape[-1]))
    pids, pprobs = pids.reshape(B, T, -1), pprobs.reshape(B, T, -1)
    keep = pids >= 0
    pprobs = torch.where(keep, pprobs, 0.0)
    tail_mass = (1 - pprobs.sum(-1, dtype=D64)).clamp(0, 1).float()
    tb = {"positions": torch.arange(T).repeat(B, 1), "mask": torch.ones(B, T, dtype=torch.bool),
          "target_ids": torch.where(keep, pids, 0), "target_probs": pprobs, "tail_mass": tail_mass,
          "present": torch.ones(B, dtype=torch.bool)}
    if m:  # the bucket of the stored target is float32 rounding noise around 0
        assert float(tail_mass.max()) < 1e-6
    loss = CrossTokenizerKLLoss(variant, beta=beta, chunk_size=5)(s_logits, tb)
    # direct sparse KD with a tail bucket, from the dense teacher, in float64, position by position
    s_p = torch.softmax(s_logits, -1)
    terms = []
    for b in range(B):
        for t in range(T):
            cell = {int(i): float(p) for i, p in zip(top_ids[b, t], top_p[b, t])}
            if m:
                for i in tail_ids[b, t].tolist():
                    cell[i] = cell.get(i, 0.0) + float(r_true[b, t]) / m
            ids = torch.tensor(sorted(cell))
            q = torch.tensor([cell[i] for i in sorted(cell)], dtype=D64)
            q = torch.cat([q, (1 - q.sum()).clamp_min(0)[None] if m else r_true[b, t][None]])
            sc = torch.cat([s_p[b, t, ids], (1 - s_p[b, t, ids].sum())[None]])
            if variant == "forward":
                terms.append((torch.xlogy(q, q) - q * sc.log()).sum())
            elif variant == "reverse":
                qf = q.clamp_min(REVERSE_FLOOR)
                terms.append((sc * (sc.log() - (qf / qf.sum()).log())).sum())
            else:
                mix = beta * q + (1 - beta) * sc
                terms.append(beta * (torch.xlogy(q, q) - q * mix.log()).sum()
                             + (1 - beta) * (sc * (sc.log() - mix.log())).sum())
    direct = torch.stack(terms).mean()
    torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-6)  # teacher probs went through float32
    g1 = torch.autograd.grad(loss, s_logits)[0]
    g2 = torch.autograd.grad(direct, s_logits)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["forward", "reverse", "jsd"])
def test_kl_stable_when_tail_is_float32_noise(variant):
    """A teacher whose top-k holds all its mass: the collator's tail_mass = max(0, 1 - sum q) in
    float32 is rounding noise in [0, ~1e-7]. The loss and its gradient must not depend on that noise
    (reverse KL with its floor at float32 noise level, 1e-8, varied by ~13% here), and stay >= 0."""
    B, T, V, K = 2, 5, 30, 6
    g = torch.Generator().manual_seed(40)
    q = torch.softmax(torch.randn(B, T, K, generator=g, dtype=D64) * 2, -1).float()  # sums to 1 (float32)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    z = torch.randn(B, T, V, dtype=D64, generator=g) * 2
    res = []
    for r in (0.0, 1e-9, 5e-8, 1e-7):
        tb = {"positions": torch.arange(T).repeat(B, 1), "mask": torch.ones(B, T, dtype=torch.bool),
              "target_ids": ids, "target_probs": q, "tail_mass": torch.full((B, T), r, dtype=torch.float32),
              "present": torch.ones(B, dtype=torch.bool)}
        x = z.clone().requires_grad_(True)
        per = CrossTokenizerKLLoss(variant, chunk_size=3, reduction="none")(x, tb)
        assert (per >= 0).all()
        loss = per.mean()
        loss.backward()
        res.append((loss.detach(), x.grad))
        # and it is the documented estimator (dense float64 reference, same floor)
        torch.testing.assert_close(loss, mean_of(ref_kl_terms(z, tb, variant)), rtol=1e-10, atol=1e-12)
    for loss, grad in res[1:]:
        torch.testing.assert_close(loss, res[0][0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, res[0][1], rtol=1e-5, atol=1e-7)


def test_tail_bucket_vs_biased_topk_renormalisation():
    """The public top-k estimator (teacher renormalised over top-k vs full-vocab student) is not zero
    at the teacher; ours is, and ours is minimised there."""
    V, k = 50, 4
    t = torch.randn(V, dtype=D64, generator=torch.Generator().manual_seed(28)) * 2
    lp = torch.log_softmax(t, 0)
    top_lp, ids = lp.topk(k)
    biased = (top_lp.exp() / top_lp.exp().sum() * (top_lp - torch.log(top_lp.exp().sum()) - lp[ids])).sum()
    assert biased > 1e-3
    tb = {"positions": torch.zeros(1, 1, dtype=torch.long), "mask": torch.ones(1, 1, dtype=torch.bool),
          "target_ids": ids[None, None], "target_probs": top_lp.exp()[None, None],
          "tail_mass": 1 - top_lp.exp().sum()[None, None], "present": torch.ones(1, dtype=torch.bool)}
    assert abs(float(CrossTokenizerKLLoss()(t[None, None], tb))) < 1e-12
    # gradient descent from a random student recovers the teacher's cells
    z = torch.zeros(1, 1, V, dtype=D64, requires_grad=True)
    opt = torch.optim.LBFGS([z], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = CrossTokenizerKLLoss()(z, tb)
        loss.backward()
        return loss
    opt.step(closure)
    s = torch.softmax(z.detach()[0, 0], 0)
    torch.testing.assert_close(s[ids], top_lp.exp(), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# ChunkLikelihoodLoss, SFTLoss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,tau", [("forward", 1.0), ("forward", 2.5), ("reverse", 1.0)])
@pytest.mark.parametrize("fused", [False, True])
def test_chunk_loss_matches_reference(variant, tau, fused):
    B, T, V, H = 3, 8, 13, 5
    batch = make_batch(B, T, V, seed=12, teachers=("a",))
    tb = batch["teachers"]["a"]
    tb["present"][2] = False
    g = torch.Generator().manual_seed(13)
    h = torch.randn(B, T, H, dtype=D64, generator=g, requires_grad=True)
    W = torch.randn(V, H, dtype=D64, generator=g, requires_grad=True)
    z = (h @ W.t()).detach().requires_grad_(True)
    f = ChunkLikelihoodLoss(variant, tau=tau, chunk_size=3)
    if fused:
        loss, inputs, logits = f((h, W), tb, batch["input_ids"]), (h, W), h @ W.t()
    else:
        loss, inputs, logits = f(z, tb, batch["input_ids"]), (z,), z
    terms = ref_chunk_terms(logits, tb, batch["input_ids"], variant, tau)
    assert len(terms) >= 2
    ref = mean_of(terms)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", ["forward", "reverse"])
def test_chunk_loss_gradcheck(variant):
    B, T, V = 1, 6, 7
    batch = make_batch(B, T, V, seed=26, teachers=("a",))
    tb = batch["teachers"]["a"]
    tb["chunk_mask"][:] = tb["chunk_spans"][..., 1] > 0
    z = torch.randn(B, T, V, dtype=D64, generator=torch.Generator().manual_seed(27), requires_grad=True)
    f = ChunkLikelihoodLoss(variant, tau=1.7, chunk_size=2)
    assert torch.autograd.gradcheck(lambda x: f(x, tb, batch["input_ids"]), (z,))


def test_chunk_loss_zero_when_student_matches_teacher():
    B, T, V = 1, 6, 11
    z = torch.randn(B, T, V, dtype=D64, generator=torch.Generator().manual_seed(14))
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(15))
    lp = torch.log_softmax(z, -1)
    spans = torch.tensor([[[1, 3], [3, 6]]])
    tlp = torch.stack([lp[0, 0, ids[0, 1]] + lp[0, 1, ids[0, 2]], sum(lp[0, j - 1, ids[0, j]] for j in range(3, 6))])[None]
    tb = {"chunk_spans": spans, "chunk_teacher_logprob": tlp, "chunk_mask": torch.ones(1, 2, dtype=torch.bool),
          "present": torch.ones(1, dtype=torch.bool)}
    zz = z.clone().requires_grad_(True)
    loss = ChunkLikelihoodLoss(tau=1.5)(zz, tb, ids)
    assert abs(loss.item()) < 1e-12
    assert torch.autograd.grad(loss, zz)[0].abs().max() < 1e-10


@pytest.mark.parametrize("fused", [False, True])
def test_sft_matches_cross_entropy(fused):
    B, T, V, H = 3, 7, 17, 4
    batch = make_batch(B, T, V, seed=16, teachers=())
    g = torch.Generator().manual_seed(17)
    h = torch.randn(B, T, H, dtype=D64, generator=g, requires_grad=True)
    W = torch.randn(V, H, dtype=D64, generator=g, requires_grad=True)
    z = (h @ W.t()).detach().requires_grad_(True)
    labels = batch["labels"]
    n = int((labels[:, 1:] != -100).sum())
    loss, inputs, logits = (SFTLoss(chunk_size=4)((h, W), labels), (h, W), h @ W.t()) if fused else \
        (SFTLoss(chunk_size=4)(z, labels), (z,), z)
    ref = ref_sft_sum(logits, labels) / n
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    per = SFTLoss(reduction="none")(z, labels)
    assert per.shape == (B, T) and (per[:, -1] == 0).all()


# ------------------------------------------------------------------------------------------------
# MultiTeacherLossAggregator
# ------------------------------------------------------------------------------------------------


def agg_reference(logits, batch, cfg, sft_weight, renorm=False, per_component=False):
    labels = batch["labels"]
    D = int((labels[:, 1:] != -100).sum())
    B = labels.shape[0]
    names = list(cfg)
    pres = torch.tensor([[bool(batch["teachers"][n]["present"][b]) if n in batch["teachers"] else False
                          for n in names] for b in range(B)])
    # renormalize_absent: a teacher's total weight (KL + chunk) counts, in pure python
    tot = [cfg[n].weight + cfg[n].chunk_weight for n in names]
    fac = []
    for b in range(B):
        here = sum(t for t, p in zip(tot, pres[b].tolist()) if p)
        fac.append(sum(tot) / here if renorm and here > 0 else 1.0)
    total = sft_weight * ref_sft_sum(logits, labels) / D if sft_weight else 0.0
    for n in names:
        if n not in batch["teachers"]:
            continue
        c, tb = cfg[n], batch["teachers"][n]
        kl = ref_kl_terms(logits, tb, c.kl.spec.variant, c.kl.spec.tau, c.kl.spec.beta)
        kls = sum(fac[b] * d * c.kl.scale for (b, _), d in kl)
        total = total + c.weight * kls / (max(len(kl), 1) if per_component else D)
        if c.chunk_weight:
            ch = ref_chunk_terms(logits, tb, batch["input_ids"], c.chunk.variant, c.chunk.tau)
            total = total + c.chunk_weight * sum(fac[b] * d for (b, _), d in ch) / (max(len(ch), 1) if per_component else D)
    return total


@pytest.mark.parametrize("renorm,per_component,fused,cs", [(False, False, False, 5), (False, False, False, 1),
                                                           (True, False, False, 5), (False, True, False, 5),
                                                           (True, False, True, 5), (False, False, True, 1)])
def test_aggregator_matches_reference(renorm, per_component, fused, cs):
    """cs = 1: every chunk is one row, where the SFT / chunk token items share the softmax buffer of
    the tau = 1 teacher ('b') on that row."""
    B, T, V, H = 4, 8, 21, 5
    batch = make_batch(B, T, V, seed=18, teachers=("a", "b"))
    batch["teachers"]["a"]["present"][1] = False
    batch["teachers"]["b"]["present"][2] = False
    cfg = {"a": TeacherLoss(1.0, 0.4, CrossTokenizerKLLoss("forward", tau=2.0, tau_squared=True)),
           "b": TeacherLoss(0.3, 0.0, CrossTokenizerKLLoss("reverse")),
           "c": TeacherLoss(2.0, 1.0)}  # configured, not in the batch: absent everywhere
    agg = MultiTeacherLossAggregator(cfg, sft_weight=0.5, renormalize_absent=renorm,
                                     normalize="per_component" if per_component else "tokens", chunk_size=cs)
    g = torch.Generator().manual_seed(19)
    h = torch.randn(B, T, H, dtype=D64, generator=g, requires_grad=True)
    W = torch.randn(V, H, dtype=D64, generator=g, requires_grad=True)
    z = (h @ W.t()).detach().requires_grad_(True)
    student, inputs, logits = ((h, W), (h, W), h @ W.t()) if fused else (z, (z,), z)
    loss, logs = agg(student, batch)
    ref = agg_reference(logits, batch, cfg, 0.5, renorm, per_component)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert all(not v.requires_grad for v in logs.values())
    assert {"loss", "sft", "kl/a", "kl/b", "chunk/a", "present/c"} <= set(logs)
    assert float(logs["present/c"]) == 0.0 and float(logs["present/a"]) == 0.75


RENORM_CONFIGS = {
    "chunk_only": {"a": TeacherLoss(0.0, 0.7), "b": TeacherLoss(0.0, 0.3, chunk=ChunkLikelihoodLoss("reverse", tau=2.0)),
                   "c": TeacherLoss(0.0, 1.0)},
    "mixed": {"a": TeacherLoss(1.0, 0.0), "b": TeacherLoss(0.0, 0.5), "c": TeacherLoss(0.2, 0.0)},
    "both": {"a": TeacherLoss(0.6, 0.4, CrossTokenizerKLLoss("jsd")), "b": TeacherLoss(0.0, 0.5),
             "c": TeacherLoss(0.0, 2.0)},
}


@pytest.mark.parametrize("name", list(RENORM_CONFIGS))
@pytest.mark.parametrize("fused", [False, True])
def test_aggregator_renormalize_absent_uses_total_weight(name, fused):
    """renormalize_absent with chunk-only and mixed teachers: f_b = sum of all teachers' (weight +
    chunk_weight) / the same sum over the teachers present in b (pure python reference). With a factor
    built from KL weights alone, an example without any KL teacher lost its chunk terms (f_b = 0)."""
    B, T, V, H = 4, 8, 21, 5
    batch = make_batch(B, T, V, seed=30, teachers=("a", "b"))
    batch["teachers"]["a"]["present"][1] = False
    batch["teachers"]["b"]["present"][2] = False
    batch["teachers"]["a"]["present"][3] = False
    batch["teachers"]["b"]["present"][3] = False  # nobody: nothing to renormalise
    cfg = RENORM_CONFIGS[name]  # 'c' is configured but never in the batch: absent everywhere
    g = torch.Generator().manual_seed(31)
    h = torch.randn(B, T, H, dtype=D64, generator=g, requires_grad=True)
    W = torch.randn(V, H, dtype=D64, generator=g, requires_grad=True)
    z = (h @ W.t()).detach().requires_grad_(True)
    student, inputs = ((h, W), (h, W)) if fused else (z, (z,))
    for renorm in (False, True):
        logits = h @ W.t() if fused else z
        loss, logs = MultiTeacherLossAggregator(cfg, sft_weight=0.2, renormalize_absent=renorm, chunk_size=3)(student, batch)
        ref = agg_reference(logits, batch, cfg, 0.2, renorm)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        for a, b in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        if renorm:
            assert all(float(logs[f"chunk/{n}"]) > float(plain[f"chunk/{n}"]) > 0
                       for n in ("a", "b") if cfg[n].chunk_weight)
        plain = logs


def test_aggregator_absent_teacher_contributes_nothing_and_does_not_reweight():
    B, T, V = 3, 7, 15
    batch = make_batch(B, T, V, seed=20, teachers=("a", "b"))
    z = torch.randn(B, T, V, dtype=D64, generator=torch.Generator().manual_seed(21))
    agg = MultiTeacherLossAggregator({"a": 1.0, "b": 1.0}, sft_weight=1.0)
    full, logs_full = agg(z, batch)
    # b absent for example 0: total drops by exactly b's example-0 terms; a's and sft unchanged
    batch2 = {**batch, "teachers": {**batch["teachers"], "b": {**batch["teachers"]["b"]}}}
    batch2["teachers"]["b"]["present"] = torch.tensor([False, True, True])
    part, logs_part = agg(z, batch2)
    D = int((batch["labels"][:, 1:] != -100).sum())
    b0 = sum(d for (b, _), d in ref_kl_terms(z, batch["teachers"]["b"], "forward") if b == 0)
    assert b0 > 0
    torch.testing.assert_close(full - part, b0 / D, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logs_full["kl/a"], logs_part["kl/a"], rtol=0, atol=0)
    torch.testing.assert_close(logs_full["sft"], logs_part["sft"], rtol=0, atol=0)
    # all teachers absent: loss == sft only, and it still back-propagates
    x = z.clone().requires_grad_(True)
    none = {**batch, "teachers": {}}
    loss, logs = MultiTeacherLossAggregator({"a": 1.0}, sft_weight=1.0)(x, none)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_sft_sum(z, batch["labels"]) / D)
    # nothing at all to train: a zero loss that still has a graph
    empty = {**none, "labels": torch.full((B, T), -100)}
    loss, _ = MultiTeacherLossAggregator({"a": 1.0}, sft_weight=1.0)(x, empty)
    loss.backward()
    assert loss.item() == 0.0


@pytest.mark.parametrize("fused", [False, True])
def test_aggregator_gradcheck(fused):
    B, T, V, H = 2, 5, 7, 3
    batch = make_batch(B, T, V, seed=35, teachers=("a", "b"))
    batch["teachers"]["b"]["present"][1] = False
    cfg = {"a": TeacherLoss(1.0, 0.6, CrossTokenizerKLLoss("forward", tau=1.5, tau_squared=True),
                            ChunkLikelihoodLoss("forward", tau=2.0)),
           "b": TeacherLoss(0.4, 0.3, CrossTokenizerKLLoss("reverse"), ChunkLikelihoodLoss("reverse")),
           "c": TeacherLoss(0.5, 0.0, CrossTokenizerKLLoss("jsd", beta=0.3))}
    batch["teachers"]["c"] = make_teacher(B, T, V, 4, 3, seed=36)
    agg = MultiTeacherLossAggregator(cfg, sft_weight=0.5, renormalize_absent=True, chunk_size=3)
    g = torch.Generator().manual_seed(37)
    if fused:
        h = torch.randn(B, T, H, dtype=D64, generator=g, requires_grad=True)
        W = torch.randn(V, H, dtype=D64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, w: agg((a, w), batch)[0], (h, W))
    else:
        z = torch.randn(B, T, V, dtype=D64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: agg(x, batch)[0], (z,))


def test_sft_gradcheck():
    B, T, V, H = 2, 5, 7, 3
    labels = make_batch(B, T, V, seed=38, teachers=())["labels"]
    g = torch.Generator().manual_seed(39)
    f = SFTLoss(chunk_size=3)
    z = torch.randn(B, T, V, dtype=D64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: f(x, labels), (z,))
    h = torch.randn(B, T, H, dtype=D64, generator=g, requires_grad=True)
    W = torch.randn(V, H, dtype=D64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: f((a, w), labels), (h, W))


def test_store_temperature_must_match_tau():
    """The collator passes the store's extraction temperature as teacher_batch['temperature']."""
    B, T, V = 2, 6, 13
    batch = make_batch(B, T, V, seed=41, teachers=("a", "b"))
    z = torch.randn(B, T, V, dtype=D64, generator=torch.Generator().manual_seed(42))
    tb = batch["teachers"]["a"]
    plain = CrossTokenizerKLLoss("forward", tau=2.0)(z, tb)
    # same temperature (float, int, 0-d tensor): no error, the same value
    for t in (2.0, 2, torch.tensor(2.0), None):
        torch.testing.assert_close(CrossTokenizerKLLoss("forward", tau=2.0)(z, {**tb, "temperature": t}), plain,
                                   rtol=0, atol=0)
    with pytest.raises(ValueError) as e:
        CrossTokenizerKLLoss("forward", tau=2.0)(z, {**tb, "temperature": 1.0})
    msg = str(e.value)
    assert "temperature 1" in msg and "tau=2" in msg and "CrossTokenizerKLLoss(..., tau=1)" in msg
    assert "check_temperature=False" in msg
    off = CrossTokenizerKLLoss("forward", tau=2.0, check_temperature=False)(z, {**tb, "temperature": 1.0})
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    # aggregator: names the teacher; only teachers with a KL term are checked
    tbs = {"a": {**tb, "temperature": 1.0}, "b": {**batch["teachers"]["b"], "temperature": 3.0}}
    cfg = {"a": TeacherLoss(1.0, 0.5, CrossTokenizerKLLoss(tau=1.0)), "b": TeacherLoss(1.0, 0.0, CrossTokenizerKLLoss(tau=2.0))}
    with pytest.raises(ValueError, match=r"teacher 'b'.*temperature 3.*tau=2.*TeacherLoss\(\.\.\., kl=CrossTokenizerKLLoss\(\.\.\., tau=3\)\)"):
        MultiTeacherLossAggregator(cfg, sft_weight=1.0)(z, {**batch, "teachers": tbs})
    for agg in (MultiTeacherLossAggregator(cfg, sft_weight=1.0, check_temperature=False),
                MultiTeacherLossAggregator({**cfg, "b": TeacherLoss(1.0, 0.0, CrossTokenizerKLLoss(tau=2.0, check_temperature=False))},
                                           sft_weight=1.0),
                MultiTeacherLossAggregator({**cfg, "b": TeacherLoss(0.0, 1.0)}, sft_weight=1.0)):
        loss, _ = agg(z, {**batch, "teachers": tbs})
        torch.testing.assert_close(loss, agg(z, batch)[0], rtol=0, atol=0)


def test_losses_hold_no_state():
    agg = MultiTeacherLossAggregator({"a": 1.0}, sft_weight=1.0)
    assert list(agg.parameters()) == [] and list(agg.buffers()) == []
    assert agg.state_dict() == {}


# ------------------------------------------------------------------------------------------------
# bf16 autocast, memory shape of the computation
# ------------------------------------------------------------------------------------------------


def test_bf16_autocast_logits_and_fused():
    B, T, V, H = 2, 8, 64, 16
    batch = make_batch(B, T, V, seed=22, teachers=("a",), dtype=torch.float32)
    g = torch.Generator().manual_seed(23)
    lin = torch.nn.Linear(H, V, bias=False)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    agg = MultiTeacherLossAggregator({"a": TeacherLoss(1.0, 0.5, CrossTokenizerKLLoss("jsd"))}, sft_weight=1.0, chunk_size=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(h)
        assert logits.dtype == torch.bfloat16
        loss, _ = agg(logits, batch)
        loss_f, _ = agg((h, lin.weight), batch)
    assert loss.dtype == torch.float32 and loss_f.dtype == torch.float32
    # same maths in fp64 from the same bf16 logits / fp32 fused logits
    ref = agg_reference(logits.detach().double(), batch, agg.teachers, 1.0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    ref_f = agg_reference((h @ lin.weight.t()).detach().double(), batch, agg.teachers, 1.0)
    torch.testing.assert_close(loss_f.double(), ref_f, rtol=1e-5, atol=1e-5)
    gl = torch.autograd.grad(loss, logits)[0]
    assert gl.dtype == torch.bfloat16
    gh, gw = torch.autograd.grad(loss_f, (h, lin.weight))
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32 and torch.isfinite(gw).all()


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel, self.fp32_big = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
                if t.dtype == torch.float32:
                    self.fp32_big = max(self.fp32_big, t.numel())
        return out


def test_fused_never_materialises_full_logits_and_logits_path_no_fp32_copy():
    B, T, V, H, cs = 2, 64, 512, 8, 16
    batch = make_batch(B, T, V, seed=24, teachers=("a",), dtype=torch.float32)
    batch["teachers"]["a"] = make_teacher(B, T, V, 48, 4, seed=25, dtype=torch.float32, masked_frac=0.0)
    agg = MultiTeacherLossAggregator({"a": TeacherLoss(1.0, 0.5)}, sft_weight=1.0, chunk_size=cs)
    h = torch.randn(B, T, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    with _MaxNumel() as m:
        loss, _ = agg((h, W), batch)
        loss.backward()
    # biggest tensor: a few chunks' worth of rows x V (or W's grad), never B*T*V
    assert m.max_numel <= max(2 * cs * V, V * H) < B * T * V
    z = (h @ W.t()).detach().to(torch.bfloat16).requires_grad_(True)
    with _MaxNumel() as m:
        loss, _ = agg(z, batch)
        loss.backward()
    assert m.fp32_big <= 2 * cs * V  # no fp32 [B,T,V] (the bf16 grad of the logits is the only full one)


class _BigTensors(TorchDispatchMode):
    """Counts the new tensors (not views of, or in-place results on, an argument) of at least `numel`
    elements that the dispatched ops produce."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and not any(
                    t.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() for a in flat):
                self.count += 1
        return out


@pytest.mark.parametrize("kind", ["sliced_logits", "sliced_logits_bf16", "transposed_hidden", "sliced_hidden"])
def test_non_contiguous_inputs_are_never_copied_in_full(kind):
    """logits[:, :-1] (a strided view), a transposed or sliced hidden: each chunk reads only its rows
    (x.reshape(-1, F) would copy the whole input once per chunk, in forward and backward). Forward:
    no tensor of the input's size; backward: only the gradient of the input. Same values as the
    contiguous input."""
    B, T, V, H, cs = 2, 64, 96, 32, 16  # full hidden (B*T*H) > every chunk temporary and W (V*H)
    batch = make_batch(B, T, V, seed=32, teachers=("a",), dtype=torch.float32)
    batch["teachers"]["a"] = make_teacher(B, T, V, 48, 4, seed=33, dtype=torch.float32, masked_frac=0.0)
    agg = MultiTeacherLossAggregator({"a": TeacherLoss(1.0, 0.5)}, sft_weight=1.0, chunk_size=cs)
    g = torch.Generator().manual_seed(34)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    if kind.startswith("sliced_logits"):
        dt = torch.bfloat16 if kind.endswith("bf16") else torch.float32
        base = torch.randn(B, T + 1, V, generator=g).to(dt).requires_grad_(True)
        x = base[:, :-1]
        student, contig, inputs = x, x.detach().contiguous().requires_grad_(True), (x,)
        full = B * T * V
    else:
        if kind == "transposed_hidden":
            base = torch.randn(T, B, H, generator=g, requires_grad=True)
            x = base.transpose(0, 1)
        else:
            base = torch.randn(B, T + 3, H, generator=g, requires_grad=True)
            x = base[:, 2:-1]
        student, contig, inputs = (x, W), x.detach().contiguous().requires_grad_(True), (x, W)
        full = B * T * H
    assert not x.is_contiguous() and x.shape[:2] == (B, T)
    with _BigTensors(full) as m:
        loss, _ = agg(student, batch)
    assert m.count == 0
    with _BigTensors(full) as m:
        grads = torch.autograd.grad(loss, inputs)
    assert m.count == 1  # the gradient of x itself
    ref_loss, _ = agg(contig if kind.startswith("sliced_logits") else (contig, W), batch)
    ref_grads = torch.autograd.grad(ref_loss, (contig,) + inputs[1:])
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_out_of_range_ids_are_clear_errors(fused):
    """Issue 14, item 5: a target id / chunk token / label outside the student's vocabulary is a
    ValueError naming the component, the example and the position (not an IndexError from the engine,
    or a device-side assert on CUDA); padding (prob 0, label -100) is not an id and passes."""
    B, T, V, H = 2, 10, 40, 8
    batch = make_batch(B, T, V, 3)
    g = torch.Generator().manual_seed(0)
    if fused:
        student = (torch.randn(B, T, H, generator=g, dtype=D64), torch.randn(V, H, generator=g, dtype=D64))
    else:
        student = torch.randn(B, T, V, generator=g, dtype=D64)
    tb = batch["teachers"]["a"]
    # a clean batch works, also with padded entries whose id is out of range but whose prob is 0
    pad = tb["target_probs"] == 0
    assert bool(pad.any())
    clean = dict(tb, target_ids=torch.where(pad, torch.full_like(tb["target_ids"], V + 7), tb["target_ids"]))
    ok = CrossTokenizerKLLoss()(student, clean)
    assert torch.isfinite(ok)
    # a target id >= V with a probability
    bad = {k: v.clone() for k, v in tb.items()}
    b, p = [int(x) for x in (bad["mask"] & bad["present"][:, None]).nonzero()[1]]
    bad["target_ids"][b, p, 0], bad["target_probs"][b, p, 0] = V + 3, 0.2
    pos = int(bad["positions"][b, p])
    with pytest.raises(ValueError, match=rf"CrossTokenizerKLLoss: target id {V + 3} of example {b} \(target {p}, "
                                         rf"student position {pos}\) is outside the student's vocabulary \[0, {V}\).*"
                                         r"xtok build-projection --student"):
        CrossTokenizerKLLoss()(student, bad)
    agg = MultiTeacherLossAggregator({"a": 1.0, "b": 0.5}, sft_weight=1.0)
    with pytest.raises(ValueError, match=rf"MultiTeacherLossAggregator, teacher 'a' \(KL\): target id {V + 3}"):
        agg(student, dict(batch, teachers={"a": bad, "b": batch["teachers"]["b"]}))
    # negative ids with a probability are not padding either
    neg = {k: v.clone() for k, v in tb.items()}
    neg["target_ids"][b, p, 0], neg["target_probs"][b, p, 0] = -1, 0.2
    with pytest.raises(ValueError, match=r"target id -1 of example"):
        CrossTokenizerKLLoss()(student, neg)
    # vocab_size limits the student: ids between vocab_size and the output rows are out of range too
    lim = {k: v.clone() for k, v in tb.items()}
    lim["target_ids"][b, p, 0], lim["target_probs"][b, p, 0] = V - 1, 0.2
    with pytest.raises(ValueError, match=rf"target id {V - 1} .*\[0, {V - 2}\)"):
        CrossTokenizerKLLoss()(student, lim, vocab_size=V - 2)
    # labels and chunk tokens
    labels = batch["labels"].clone()
    labels[1, 4] = V
    with pytest.raises(ValueError, match=rf"SFTLoss: label {V} at example 1, position 4 is outside the student's "
                                         rf"vocabulary \[0, {V}\) .*\(and not the ignore index -100\)"):
        SFTLoss()(student, labels)
    with pytest.raises(ValueError, match=r"MultiTeacherLossAggregator \(SFT\): label"):
        agg(student, dict(batch, labels=labels))
    ids = batch["input_ids"].clone()
    s0 = int(tb["chunk_spans"][0, 0, 0])
    tb0 = dict(tb, chunk_mask=tb["chunk_mask"].clone())
    tb0["chunk_mask"][0, 0] = True
    tb0["present"] = torch.ones(B, dtype=torch.bool)
    ids[0, s0] = V + 1
    with pytest.raises(ValueError, match=rf"ChunkLikelihoodLoss: input id {V + 1} at example 0, position {s0} "
                                         r"\(inside a teacher chunk\) is outside"):
        ChunkLikelihoodLoss()(student, tb0, ids)


def test_bits_per_byte_equals_a_direct_sum():
    """xtok.evaluation.bits_per_byte = sum of -log2 softmax(logits)[next token] over every token after the
    first of each sequence, / bytes, computed one sequence at a time without padding (an independent loop);
    the batch order and padding do not change it; vocab_size limits the softmax."""
    import math

    from transformers import LlamaConfig, LlamaForCausalLM

    from xtok.evaluation import bits_per_byte

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)).eval()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 40, int(rng.integers(2, 12))) for _ in range(7)]
    ref = 0.0
    with torch.no_grad():
        for s in seqs:
            lp = m(input_ids=torch.as_tensor(s)[None]).logits[0, :-1].double().log_softmax(-1)
            ref -= float(lp[torch.arange(len(s) - 1), torch.as_tensor(s[1:])].sum()) / math.log(2)
    for bs, srt in ((1, False), (3, True), (7, False)):
        assert abs(bits_per_byte(m, seqs, 100, batch_size=bs, sort_by_length=srt) - ref / 100) < 1e-4
    with torch.no_grad():
        ref40 = 0.0
        for s in seqs:
            lp = m(input_ids=torch.as_tensor(s)[None]).logits[0, :-1, :40].double().log_softmax(-1)
            ref40 -= float(lp[torch.arange(len(s) - 1), torch.as_tensor(s[1:])].sum()) / math.log(2)
    assert abs(bits_per_byte(m, seqs, 100, vocab_size=40) - ref40 / 100) < 1e-4
