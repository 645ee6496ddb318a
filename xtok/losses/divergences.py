"""Per-row divergences of the losses (docs/losses.md, section 1 and 2): the student's log-probs over
the partition (target ids + one tail bucket), the divergence of those cells against the teacher's
projected probs and tail mass, and the Bernoulli divergence of chunk likelihoods. Pure torch,
differentiable, evaluated in the caller's dtype."""
from __future__ import annotations

import torch

KL_VARIANTS = ("forward", "reverse", "jsd")
CHUNK_VARIANTS = ("forward", "reverse")
_NEG = -1e30  # stands for log(0) inside logsumexp: finite, so gradients stay finite
# Reverse-KL floor on the teacher's cell probabilities (`q~ = max(q, eps)`, renormalised). The
# collator computes tail_mass = max(0, 1 - sum q) from float32 probabilities, so a tail that is truly
# ~0 arrives as float32 rounding noise in [0, ~1.3e-7]; with a floor of 1e-5 every such value maps to
# the same cell probability, and noise on a genuine r >= eps moves log q~ by at most noise / eps ~ 1%.
REVERSE_EPS = 1e-5


def partition_logprobs(z: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, tau: float = 1.0):
    """Student log-probs over the partition (target ids, tail bucket).

    z [n,V] logits, ids [n,K] long, valid [n,K] bool (ids must be distinct among valid entries).
    Returns (log_s [n,K] = log softmax(z/tau)[ids], log_u [n] = log of the student mass outside the valid
    ids), with log_u computed as logsumexp over the complement (exact, no 1 - sum cancellation).
    """
    zt = z / tau if tau != 1.0 else z
    lse = torch.logsumexp(zt, dim=-1)
    log_s = zt.gather(1, ids) - lse[:, None]
    inset = torch.zeros(zt.shape, dtype=torch.bool, device=zt.device)
    r_idx, k_idx = valid.nonzero(as_tuple=True)
    inset[r_idx, ids[r_idx, k_idx]] = True
    log_u = torch.logsumexp(zt.masked_fill(inset, _NEG), dim=-1) - lse
    return log_s, log_u


def partition_divergence(log_s, log_u, q, r, valid, variant: str = "forward", beta: float = 0.5,
                         eps: float = REVERSE_EPS):
    """Divergence per row over the K+1 cells (valid target ids + the tail bucket).

    log_s [n,K], log_u [n]: student; q [n,K], r [n]: teacher probs and tail mass, normalised here over
    the cells (q_k / Z, r / Z with Z = sum q + r, = 1 up to storage rounding).
      forward: KL(q || s) = sum_c q_c (log q_c - log s_c)
      reverse: KL(s || q~) = sum_c s_c (log s_c - log q~_c), q~ = max(q, eps) renormalised
      jsd:     beta KL(q || m) + (1 - beta) KL(s || m), m = beta q + (1 - beta) s
    The reverse floor `eps` (default REVERSE_EPS = 1e-5) keeps a cell the teacher gives 0 finite and
    sits well above the float32 noise of the collator's tail_mass (see REVERSE_EPS); the same function
    runs in the forward and (for the cell gradients) in the backward, so both see the same floor.
    forward and jsd need no floor (bounded and continuous in q, r).
    """
    dt = log_s.dtype
    vmask = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
    ls = torch.cat([log_s, log_u[:, None]], dim=1)
    qq = torch.cat([torch.where(valid, q.to(dt), 0.0), r.to(dt).clamp_min(0.0)[:, None]], dim=1)
    qq = qq.clamp_min(0.0)
    qq = qq / qq.sum(dim=1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
    if variant == "forward":
        terms = torch.xlogy(qq, qq) - qq * ls
    elif variant == "reverse":
        qf = torch.where(vmask, qq.clamp_min(eps), 0.0)
        log_qf = torch.log(torch.where(vmask, qf / qf.sum(dim=1, keepdim=True), 1.0))
        terms = ls.exp() * (ls - log_qf)
    elif variant == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError("jsd needs 0 < beta < 1 (use 'forward' / 'reverse' for the end points)")
        log_q = torch.log(torch.where(qq > 0, qq, 1.0))
        log_q = torch.where(qq > 0, log_q, _NEG)
        log_m = torch.logaddexp(log_q + torch.log(torch.tensor(beta, dtype=dt)),
                                ls + torch.log(torch.tensor(1.0 - beta, dtype=dt)))
        terms = beta * (torch.xlogy(qq, qq) - qq * log_m) + (1.0 - beta) * ls.exp() * (ls - log_m)
    else:
        raise ValueError(f"unknown KL variant {variant!r}; expected one of {KL_VARIANTS}")
    return torch.where(vmask, terms, 0.0).sum(dim=1)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0 (both branches finite for a <= -1e-30)."""
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def binary_divergence(logp_teacher, logp_student, variant: str = "forward", tau: float = 1.0,
                      max_logp: float = -1e-6):
    """Bernoulli divergence between p_t = exp(logp_t / tau) and p_s = exp(logp_s / tau) (per chunk).

    forward: p_t log(p_t/p_s) + (1-p_t) log((1-p_t)/(1-p_s)); reverse swaps the roles. Log-probs are
    clamped to <= max_logp so that log(1 - p) stays finite.
    """
    a_t = (logp_teacher / tau).clamp(max=max_logp)
    a_s = (logp_student / tau).clamp(max=max_logp)
    if variant == "reverse":
        a_t, a_s = a_s, a_t
    elif variant != "forward":
        raise ValueError(f"unknown chunk variant {variant!r}; expected one of {CHUNK_VARIANTS}")
    p = a_t.exp()
    return p * (a_t - a_s) + (1.0 - p) * (_log1mexp(a_t) - _log1mexp(a_s))


