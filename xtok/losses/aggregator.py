"""`MultiTeacherLossAggregator`: the SFT cross-entropy and every teacher's KL and chunk losses
(`TeacherLoss` per teacher), weighted and normalised, evaluated in a single pass over the student's
rows (one run of the row engine for all components)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from .components import ChunkLikelihoodLoss, CrossTokenizerKLLoss
from .engine import limit_vocab, run_rows, student_tensor
from .items import IGNORE_INDEX, chunk_items, kl_items, no_rows, sft_items, student_vocab


@dataclass
class TeacherLoss:
    """Per-teacher configuration of MultiTeacherLossAggregator: KL weight, chunk-likelihood weight, and
    the two loss objects (their reduction / chunk_size are not used by the aggregator)."""
    weight: float = 1.0
    chunk_weight: float = 0.0
    kl: CrossTokenizerKLLoss = field(default_factory=CrossTokenizerKLLoss)
    chunk: ChunkLikelihoodLoss = field(default_factory=ChunkLikelihoodLoss)


class MultiTeacherLossAggregator(nn.Module):
    """Weighted sum of the per-teacher KL and chunk losses and the SFT cross-entropy, in one pass.

    teachers: {name: weight or TeacherLoss}. sft_weight: weight of SFTLoss on batch["labels"].
    Normalisation (`normalize`):
      'tokens' (default): every component is a sum over its items divided by the same D = number of
        trained label tokens in the batch (labels[:, 1:] != -100), or `num_items` if given (pass a
        global count under DDP). An absent teacher therefore contributes exactly nothing and the other
        weights are untouched.
      'per_component': each component is the mean over its own valid items (classic per-teacher mean;
        note this spreads a teacher's weight over the examples where it is present).
    renormalize_absent: if True, every teacher term (KL and chunk) of example b is multiplied by
      f_b = (sum over all configured teachers of weight + chunk_weight) /
            (sum over the teachers present in b of weight + chunk_weight),
      so the teachers present in an example carry the full teacher weight (a teacher's total weight
      counts, so chunk-only teachers are renormalised like the others); f_b = 1 otherwise.
    check_temperature: raise ValueError when a teacher batch's 'temperature' (its store's) differs from
      that teacher's KL tau (also disabled per teacher by its CrossTokenizerKLLoss(check_temperature=False)).
    Returns (loss, logs): logs holds detached tensors: 'loss', 'sft', 'kl/<name>', 'chunk/<name>'
    (unweighted component values), 'kl_per_position/<name>', 'present/<name>', 'tokens'.
    A configured teacher missing from batch['teachers'] is absent; batch teachers not configured are
    ignored. batch['student_vocab_size'] (set by the collator: its student tokenizer's ids) limits the
    student's softmax to those ids: rows of a padded output layer get no mass (`limit_vocab`).
    """

    def __init__(self, teachers: Mapping[str, float | TeacherLoss], sft_weight: float = 0.0,
                 normalize: str = "tokens", renormalize_absent: bool = False, chunk_size: int | None = None,
                 check_temperature: bool = True):
        super().__init__()
        self.teachers = {n: (c if isinstance(c, TeacherLoss) else TeacherLoss(weight=float(c)))
                         for n, c in teachers.items()}
        if normalize not in ("tokens", "per_component"):
            raise ValueError("normalize must be 'tokens' or 'per_component'")
        self.sft_weight, self.normalize = float(sft_weight), normalize
        self.renormalize_absent, self.chunk_size = renormalize_absent, chunk_size
        self.check_temperature = bool(check_temperature)

    def forward(self, student, batch: Mapping, num_items=None, sft: bool = True):
        """(loss, logs) of `student` (logits or (hidden, lm_head_weight)) on a collator batch; num_items:
        the normaliser D (default: the batch's trained label tokens); sft=False leaves the SFT term out
        (e.g. a batch of the student's own samples)."""
        student = limit_vocab(student, batch.get("student_vocab_size"), "MultiTeacherLossAggregator")
        x = student_tensor(student)
        dev = x.device
        B, T = x.shape[0], x.shape[1]
        labels = batch["labels"].to(dev)
        tbs = batch.get("teachers", {}) or {}
        names = list(self.teachers)
        present = torch.stack([tbs[n]["present"].to(dev).bool() if n in tbs else torch.zeros(B, dtype=torch.bool, device=dev)
                               for n in names], 1) if names else torch.zeros(B, 0, dtype=torch.bool, device=dev)
        if self.check_temperature:
            for n in names:
                if n in tbs and self.teachers[n].weight != 0.0:
                    self.teachers[n].kl.check_batch_temperature(
                        tbs[n], f"MultiTeacherLossAggregator, teacher {n!r}",
                        "configure it as TeacherLoss(..., kl=CrossTokenizerKLLoss(..., tau={t}))")
        factor = self._absent_factors(present, names, B, dev)
        sft_weight = self.sft_weight if sft else 0.0
        tok_rows, tok_ids, groups, sft_n, kl_meta, chunk_meta = self._items(labels, batch, tbs, names, T, dev,
                                                                           sft_weight, student_vocab(student))
        outs = run_rows(student, tok_rows, tok_ids, groups, self.chunk_size)
        return self._combine(outs[0], outs[1:], labels, present, factor, names, sft_n, kl_meta, chunk_meta, num_items,
                             sft_weight)

    def _absent_factors(self, present, names, B: int, dev):
        """Per-example factor f_b of the teacher terms (renormalize_absent; 1 otherwise), float64 [B]."""
        # a teacher's total weight (KL + chunk) decides how its absence is renormalised
        w = torch.tensor([self.teachers[n].weight + self.teachers[n].chunk_weight for n in names],
                         dtype=torch.float64, device=dev)
        if self.renormalize_absent and names:
            wp = (present.double() * w).sum(1)
            return torch.where(wp > 0, w.sum() / wp.clamp_min(1e-300), 0.0)
        return torch.ones(B, dtype=torch.float64, device=dev)

    def _items(self, labels, batch, tbs, names, T: int, dev, sft_weight: float, V: int | None = None):
        """The token items (SFT first, then each teacher's chunk tokens) and the KL groups, with where
        each component's values sit in the engine's outputs."""
        tok_rows, tok_ids, groups = [], [], []
        sft_n = 0
        if sft_weight != 0.0:
            r, t, _ = sft_items(labels, vocab_size=V, who="MultiTeacherLossAggregator (SFT)")
            tok_rows.append(r); tok_ids.append(t); sft_n = r.numel()
        kl_meta, chunk_meta = {}, {}
        off = sft_n
        for n in names:
            cfg = self.teachers[n]
            if n not in tbs:
                continue
            if cfg.weight != 0.0:
                g, (b, _p) = kl_items(tbs[n], T, cfg.kl.spec, dev, vocab_size=V,
                                      who=f"MultiTeacherLossAggregator, teacher {n!r} (KL)")
                kl_meta[n] = (len(groups), b)
                groups.append(g)
            if cfg.chunk_weight != 0.0:
                r, t, chunk_of, (b, c) = chunk_items(tbs[n], batch["input_ids"].to(dev), vocab_size=V,
                                                     who=f"MultiTeacherLossAggregator, teacher {n!r} (chunks)")
                chunk_meta[n] = (off, r.numel(), chunk_of, b, tbs[n]["chunk_teacher_logprob"].to(dev)[b, c])
                tok_rows.append(r); tok_ids.append(t); off += r.numel()
        tr = torch.cat(tok_rows) if tok_rows else no_rows(dev)
        ti = torch.cat(tok_ids) if tok_ids else no_rows(dev)
        return tr, ti, groups, sft_n, kl_meta, chunk_meta

    def _combine(self, tok_lp, kl_vals, labels, present, factor, names, sft_n, kl_meta, chunk_meta, num_items,
                 sft_weight: float):
        """(loss, logs) from the engine's outputs: weighted, normalised components."""
        dev = labels.device
        with torch.autocast(dev.type, enabled=False):
            n_tok = (labels[:, 1:] != IGNORE_INDEX).sum()
            D = (torch.as_tensor(num_items, device=dev, dtype=tok_lp.dtype) if num_items is not None
                 else n_tok.to(tok_lp.dtype).clamp_min(1))
            per = self.normalize == "per_component"
            total = tok_lp.sum() * 0.0 + sum(v.sum() * 0.0 for v in kl_vals)  # keeps the graph when empty
            logs = {"tokens": n_tok.detach()}
            if sft_weight != 0.0:
                ce = -tok_lp[:sft_n]
                sft = ce.sum() / (max(sft_n, 1) if per else D)
                total = total + sft_weight * sft
                logs["sft"] = sft.detach()
            for i, n in enumerate(names):
                cfg = self.teachers[n]
                logs[f"present/{n}"] = present[:, i].float().mean().detach()
                if n in kl_meta:
                    gi, b = kl_meta[n]
                    d = kl_vals[gi] * cfg.kl.scale
                    kl = (d * factor[b].to(d.dtype)).sum() / (max(d.numel(), 1) if per else D)
                    total = total + cfg.weight * kl
                    logs[f"kl/{n}"] = kl.detach()
                    logs[f"kl_per_position/{n}"] = (d.sum() / max(d.numel(), 1)).detach()
                if n in chunk_meta:
                    o, m, chunk_of, b, tlp = chunk_meta[n]
                    cl = cfg.chunk.from_token_logprobs(tok_lp[o:o + m], chunk_of, b.numel(), tlp)
                    cv = (cl * factor[b].to(cl.dtype)).sum() / (max(cl.numel(), 1) if per else D)
                    total = total + cfg.chunk_weight * cv
                    logs[f"chunk/{n}"] = cv.detach()
            logs["loss"] = total.detach()
        return total, logs
