"""Training objectives that need no xtok internals: SFT, ULD, same-tokenizer sparse top-k KD.

Every distillation objective is ``(1 - alpha) * CE + alpha * D`` with the same ``alpha`` for every
method (``D`` = the method's distillation term, per target position, averaged over positions).
"""
from __future__ import annotations

import numpy as np
import torch

from .model import logits_of, pad, sft_loss, target_mask


# --------------------------------------------------------------------------------------------- SFT
def sft_objective(side):
    def objective(model, idx):
        ids, lengths = pad([side.train[i] for i in idx])
        loss = sft_loss(logits_of(model, ids), ids, lengths)
        return loss, {}
    return objective


# ------------------------------------------------------------------------------ teacher top-k (A)
@torch.no_grad()
def teacher_topk(teacher, seqs: list[np.ndarray], k: int, batch_size: int = 16) -> list[dict]:
    """Per example: top-k compact ids ``[n, k]`` int32 and log-probs ``[n, k]`` float32 at every output
    position 0..n-1 (n = len - 1), normalised over the teacher's full (compact) vocabulary."""
    teacher.eval()
    out: list[dict] = [None] * len(seqs)  # type: ignore[list-item]
    order = np.argsort([len(s) for s in seqs])
    for i in range(0, len(seqs), batch_size):
        js = order[i:i + batch_size]
        ids, lengths = pad([seqs[j] for j in js])
        lp = logits_of(teacher, ids)[:, :-1].float().log_softmax(-1)
        v, ix = lp.topk(k, dim=-1)
        for b, j in enumerate(js):
            n = int(lengths[b]) - 1
            out[j] = {"ids": ix[b, :n].to(torch.int32).numpy(), "logprobs": v[b, :n].numpy()}
    return out


def sparse_kd_term(logits: torch.Tensor, t_ids: torch.Tensor, t_probs: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """KL(p_bucket || q_bucket) over the buckets {top-k ids} + {tail}, mean over masked positions.

    ``t_probs`` are the teacher's top-k probabilities (not renormalised); the tail bucket holds
    ``1 - sum(t_probs)`` on the teacher side and ``1 - sum q[t_ids]`` on the student side.
    """
    lq = logits.float().log_softmax(-1)
    lq_k = lq.gather(-1, t_ids)                                          # [B,T,k]
    p_tail = (1 - t_probs.sum(-1)).clamp_min(0)
    q_tail = (1 - lq_k.exp().sum(-1)).clamp_min(1e-12)
    eps = 1e-12
    kl = (t_probs * (torch.log(t_probs + eps) - lq_k)).sum(-1) + p_tail * (torch.log(p_tail + eps)
                                                                          - torch.log(q_tail))
    return kl[mask].mean()


def sparse_kd_objective(side, targets: list[dict], alpha: float):
    """Same-tokenizer sparse top-k KD (the upper bound: student shares the teacher's tokenizer)."""
    def objective(model, idx):
        ids, lengths = pad([side.train[i] for i in idx])
        logits = logits_of(model, ids)
        B, T = ids.shape
        k = targets[idx[0]]["ids"].shape[1]
        t_ids = torch.zeros(B, T - 1, k, dtype=torch.long)
        t_lp = torch.full((B, T - 1, k), -float("inf"))
        for b, i in enumerate(idx):
            n = len(targets[i]["ids"])
            t_ids[b, :n] = torch.from_numpy(targets[i]["ids"].astype(np.int64))
            t_lp[b, :n] = torch.from_numpy(targets[i]["logprobs"])
        mask = target_mask(lengths, T)
        ce = sft_loss(logits, ids, lengths)
        kd = sparse_kd_term(logits[:, :-1], t_ids, t_lp.exp(), mask)
        return (1 - alpha) * ce + alpha * kd, {"ce": float(ce.detach()), "kd": float(kd.detach())}
    return objective


# --------------------------------------------------------------------------------------------- ULD
def proportional_pairs(n_student: int, n_teacher: int) -> np.ndarray:
    """Teacher output position paired with each student output position 0..n_student-1.

    ULD pairs positions by sequence index (no alignment); we use the proportional variant
    ``q = floor((p + 0.5) * n_teacher / n_student)``, which is never worse than plain index pairing
    when the two tokenizations have different lengths.
    """
    p = np.arange(n_student)
    return np.minimum(((p + 0.5) * n_teacher / n_student).astype(np.int64), n_teacher - 1)


def index_pairs(n_student: int, n_teacher: int) -> np.ndarray:
    """The original ULD rule: position i with position i, truncated to the shorter sequence."""
    return np.arange(min(n_student, n_teacher))


def uld_distance(p_student: torch.Tensor, p_teacher: torch.Tensor, top: int = 0) -> torch.Tensor:
    """Per-position ULD distance: L1 between descending-sorted probability vectors, the shorter one
    zero-padded (the closed form of the 1-D Wasserstein distance used by ULD). Returns ``[N]``.

    ``top > 0`` keeps only the ``top`` highest ranks of each side (a CPU speed-up: a full sort of
    ~10k-entry rows is 5x slower) and adds ``|tail_s - tail_t|`` for the remaining mass, a lower
    bound of the exact remainder; ``top=0`` is the exact full sort."""
    if top and top < min(p_student.shape[-1], p_teacher.shape[-1]):
        s = p_student.topk(top, dim=-1).values
        t = p_teacher.topk(top, dim=-1).values
        d = (s - t).abs().sum(-1)
        return d + ((1 - s.sum(-1)) - (1 - t.sum(-1))).abs()
    s = p_student.sort(dim=-1, descending=True).values
    t = p_teacher.sort(dim=-1, descending=True).values
    n = min(s.shape[-1], t.shape[-1])
    d = (s[..., :n] - t[..., :n]).abs().sum(-1)
    d = d + s[..., n:].sum(-1) + t[..., n:].sum(-1)    # against the zero padding
    return d


def uld_objective(side_b, side_a, teacher, alpha: float, pairing: str = "proportional", top: int = 1024):
    """Universal Logit Distillation: CE + sorted-probability distance, teacher run online."""
    pair_fn = proportional_pairs if pairing == "proportional" else index_pairs
    teacher.eval()

    def objective(model, idx):
        ids, lengths = pad([side_b.train[i] for i in idx])
        t_ids, t_len = pad([side_a.train[i] for i in idx])
        with torch.no_grad():
            p_t = logits_of(teacher, t_ids)[:, :-1].float().softmax(-1)
        logits = logits_of(model, ids)
        ce = sft_loss(logits, ids, lengths)
        sb, tb, sp, tp = [], [], [], []
        for b in range(len(idx)):
            ns, nt = int(lengths[b]) - 1, int(t_len[b]) - 1
            q = pair_fn(ns, nt)
            sb.append(np.full(len(q), b)); sp.append(np.arange(len(q)))
            tb.append(np.full(len(q), b)); tp.append(q)
        sb, sp, tb, tp = (torch.from_numpy(np.concatenate(x)) for x in (sb, sp, tb, tp))
        p_s = logits[:, :-1][sb, sp].float().softmax(-1)
        d = uld_distance(p_s, p_t[tb, tp], top).mean()
        return (1 - alpha) * ce + alpha * d, {"ce": float(ce.detach()), "uld": float(d.detach())}
    return objective
