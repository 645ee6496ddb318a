"""The public single-component losses: `CrossTokenizerKLLoss` (one teacher's projected top-k + tail
bucket vs the student), `ChunkLikelihoodLoss` (aligned-chunk likelihoods) and `SFTLoss` (the student's
own labels). Each builds its items from the collator's batch, runs them through the row engine and
reduces."""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from .divergences import CHUNK_VARIANTS, KL_VARIANTS, REVERSE_EPS, binary_divergence
from .engine import KLSpec, limit_vocab, run_rows, student_tensor
from .items import chunk_items, kl_items, no_rows, sft_items, student_vocab


def _reduce(vals: torch.Tensor, reduction: str, index=None, shape=None):
    if reduction == "mean":
        return vals.sum() / max(vals.numel(), 1)
    if reduction == "sum":
        return vals.sum()
    if reduction == "none":
        out = vals.new_zeros(shape)
        out[index] = vals
        return out
    raise ValueError(f"unknown reduction {reduction!r}")


def _check_temperature(teacher_batch: Mapping, tau: float, where: str, fix: str):
    """ValueError if the teacher batch says its targets were extracted at a temperature != tau.

    The collator puts the store's temperature (manifest 'temperature') under the teacher's key
    'temperature' (a python float); a missing key or None means unknown: no check."""
    t = teacher_batch.get("temperature") if hasattr(teacher_batch, "get") else None
    if t is None:
        return
    vals = sorted(set(torch.as_tensor(t, dtype=torch.float64).flatten().tolist())) if isinstance(t, torch.Tensor) \
        else [float(t)]
    for v in vals:
        if not math.isclose(v, tau, rel_tol=1e-6, abs_tol=1e-12):
            raise ValueError(
                f"{where}: the teacher targets were extracted at temperature {v:g} (teacher batch 'temperature', "
                f"from the store's manifest) but the loss applies tau={tau:g} to the student logits, so the student "
                f"would be matched to a teacher at another temperature. Fix: {fix.format(t=f'{v:g}')}, or re-extract "
                f"the store with `xtok extract --temperature {tau:g}`; pass check_temperature=False if the mismatch "
                f"is intended.")


class CrossTokenizerKLLoss(nn.Module):
    """KL-type divergence between one teacher's projected sparse target (+ tail bucket) and the student.

    variant: 'forward' KL(teacher || student), 'reverse' KL(student || teacher), 'jsd' JSD(beta).
    tau: temperature on the student logits (the teacher targets are used as stored). tau_squared:
    multiply by tau**2. eps: the reverse-KL floor on the teacher's cell probabilities (REVERSE_EPS).
    reduction: 'mean' over valid target positions, 'sum', or 'none' ([B,P], zeros where masked).
    chunk_size: rows per chunk (default: 2**24 / V rows, ~64 MiB of fp32 logits per chunk).
    check_temperature: if the teacher batch has a 'temperature' (the store's extraction temperature,
    put there by the collator) that differs from tau, raise ValueError (False: no check).
    Call: loss(logits [B,T,V] or (hidden [B,T,H], lm_head_weight [V,H]), teacher_batch).
    """

    def __init__(self, variant: str = "forward", tau: float = 1.0, tau_squared: bool = False, beta: float = 0.5,
                 eps: float = REVERSE_EPS, reduction: str = "mean", chunk_size: int | None = None,
                 check_temperature: bool = True):
        super().__init__()
        if variant not in KL_VARIANTS:
            raise ValueError(f"unknown KL variant {variant!r}; expected one of {KL_VARIANTS}")
        if variant == "jsd" and not 0.0 < beta < 1.0:
            raise ValueError("jsd needs 0 < beta < 1")
        if tau <= 0:
            raise ValueError("tau must be > 0")
        if not eps > 0:
            raise ValueError("eps (the reverse-KL floor) must be > 0")
        self.spec = KLSpec(variant, float(tau), float(beta), float(eps))
        self.tau_squared, self.reduction, self.chunk_size = tau_squared, reduction, chunk_size
        self.check_temperature = bool(check_temperature)

    def check_batch_temperature(self, teacher_batch: Mapping, where: str = "CrossTokenizerKLLoss",
                                fix: str = "construct CrossTokenizerKLLoss(..., tau={t})"):
        if self.check_temperature:
            _check_temperature(teacher_batch, self.spec.tau, where, fix)

    @property
    def scale(self) -> float:
        return self.spec.tau ** 2 if self.tau_squared else 1.0

    def forward(self, student, teacher_batch: Mapping, reduction: str | None = None, vocab_size: int | None = None):
        """vocab_size: the student tokenizer's ids (a padded output layer's extra rows get no mass; see
        `limit_vocab`); None: every row of the student's output."""
        student = limit_vocab(student, vocab_size, "CrossTokenizerKLLoss")
        x = student_tensor(student)
        self.check_batch_temperature(teacher_batch)
        T = x.shape[1]
        g, idx = kl_items(teacher_batch, T, self.spec, x.device, vocab_size=student_vocab(student))
        _, vals = run_rows(student, no_rows(x.device), no_rows(x.device), [g], self.chunk_size)
        return _reduce(vals * self.scale, reduction or self.reduction, idx, teacher_batch["positions"].shape)


class ChunkLikelihoodLoss(nn.Module):
    """Binary divergence between the teacher's and the student's log-likelihood of each aligned chunk.

    For chunk c with student span [s0, s1): logp_s(c) = sum_{s0<=j<s1} log p_student(input_ids[j] | <j)
    (output position j-1, tau = 1) and logp_t(c) = chunk_teacher_logprob; loss = binary_divergence(
    logp_t, logp_s, variant, tau). reduction: 'mean' over valid chunks, 'sum', 'none' ([B,C]).
    Call: loss(student, teacher_batch, input_ids).
    """

    def __init__(self, variant: str = "forward", tau: float = 1.0, max_logp: float = -1e-6,
                 reduction: str = "mean", chunk_size: int | None = None):
        super().__init__()
        if variant not in CHUNK_VARIANTS:
            raise ValueError(f"unknown chunk variant {variant!r}; expected one of {CHUNK_VARIANTS}")
        self.variant, self.tau, self.max_logp = variant, float(tau), float(max_logp)
        self.reduction, self.chunk_size = reduction, chunk_size

    def from_token_logprobs(self, tok_lp, chunk_of, n_chunks, teacher_lp):
        lp_s = tok_lp.new_zeros(n_chunks).index_add(0, chunk_of, tok_lp)
        return binary_divergence(teacher_lp.to(lp_s.dtype), lp_s, self.variant, self.tau, self.max_logp)

    def forward(self, student, teacher_batch: Mapping, input_ids: torch.Tensor, reduction: str | None = None,
                vocab_size: int | None = None):
        student = limit_vocab(student, vocab_size, "ChunkLikelihoodLoss")
        x = student_tensor(student)
        rows, toks, chunk_of, (b, c) = chunk_items(teacher_batch, input_ids.to(x.device),
                                                   vocab_size=student_vocab(student))
        tok_lp, = run_rows(student, rows, toks, [], self.chunk_size)
        vals = self.from_token_logprobs(tok_lp, chunk_of, b.numel(),
                                        teacher_batch["chunk_teacher_logprob"].to(x.device)[b, c])
        return _reduce(vals, reduction or self.reduction, (b, c), teacher_batch["chunk_mask"].shape)


class SFTLoss(nn.Module):
    """Cross-entropy of the student on its own labels: output position t predicts labels[t+1];
    labels == -100 are ignored. reduction: 'mean' over label tokens, 'sum', 'none' ([B,T], at t)."""

    def __init__(self, reduction: str = "mean", chunk_size: int | None = None):
        super().__init__()
        self.reduction, self.chunk_size = reduction, chunk_size

    def forward(self, student, labels: torch.Tensor, reduction: str | None = None, vocab_size: int | None = None):
        student = limit_vocab(student, vocab_size, "SFTLoss")
        x = student_tensor(student)
        labels = labels.to(x.device)
        rows, toks, b = sft_items(labels, vocab_size=student_vocab(student))
        tok_lp, = run_rows(student, rows, toks, [], self.chunk_size)
        T = labels.shape[1]
        return _reduce(-tok_lp, reduction or self.reduction, (b, rows - b * T), labels.shape)
