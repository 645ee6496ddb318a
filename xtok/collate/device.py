"""Live (online) teachers, device side: run the teacher and fill its batch fields, on the training device.

`fill_online_targets(batch, teachers)` takes a batch from `CrossTokenizerCollator` whose online teachers
carry their token ids and targets plan (`xtok.collate.online`) and, per teacher, under
`torch.no_grad()` on the device the batch is on:

1. runs the model body over `teacher_input_ids` (the output layer is applied only at the rows needed:
   the KL target positions and every position inside a planned chunk);
2. computes the same per-position statistics as `xtok extract` with the same code
   (`xtok.extract.teacher_targets`: fused log-sum-exp, top-k, exact tail mass, the realised token's
   log-prob), over the tokenizer's vocabulary only (padded output rows are left out);
3. projects the top-k into student ids through W (`ProjectionMatrix.project`: torch on an accelerator,
   the Numba kernel on the CPU) and sums the realised-token log-probs over each chunk;

so the teacher's dict then has the fields a store teacher has (target_ids, target_probs, tail_mass,
chunk_teacher_logprob) and `MultiTeacherLossAggregator` takes the batch unchanged. The teacher model
stays in eval mode with gradients off.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..tokens import Tokenizer
from .teachers import TeacherSpec

__all__ = ["OnlineTeacher", "fill_online_targets"]


class OnlineTeacher:
    """A live teacher on a device: its model split into body + output layer (checked against the
    model's own forward once), its vocabulary size, W for the student, top-k and temperature."""

    def __init__(self, spec: TeacherSpec, student: Tokenizer, device=None):
        import torch

        from ..extract import ExtractError, check_output_layer, teacher_parts

        self.spec = spec
        model = spec.model
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"teacher {spec.name!r}: model= must be a torch causal LM (a transformers model), got "
                            f"{type(model).__name__}.")
        if device is not None:
            model.to(device)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.device = next(model.parameters()).device
        tok = spec.tok
        try:
            self.body, self.head = teacher_parts(model, spec.name)
        except ExtractError as e:
            raise ValueError(str(e)) from None
        self.vocab_size = check_vocab_rows(int(self.head.weight.shape[0]), tok.vocab_size, f"teacher {spec.name!r}")
        probe = np.asarray(tok.encode("The quick brown fox jumps over the lazy dog. 1, 2, 3: Hello, world!"), np.int64)
        probe = probe[(probe >= 0) & (probe < self.vocab_size)][:16]
        if probe.size >= 2:
            check_output_layer(model, self.body, self.head, probe, self.vocab_size, f"teacher {spec.name!r}")
        self.W = spec.projector(student).proj
        self.top_k = min(int(spec.top_k), self.vocab_size)
        self.temperature = spec.target_temperature

    def fill(self, tb: dict) -> dict:
        """Fill one online teacher's batch dict in place (module doc) and return it."""
        import torch

        from ..extract import teacher_targets

        dev = self.device
        ids = tb["teacher_input_ids"].to(dev)
        att = tb["teacher_attention_mask"].to(dev)
        B, Tt = ids.shape
        present = tb["present"].to(dev).bool()
        kl_mask = tb["mask"].to(dev).bool() & present[:, None]
        t_pos = tb["teacher_positions"].to(dev).long()
        chunk_mask = tb["chunk_mask"].to(dev).bool() & present[:, None]
        chunk_t = tb["chunk_teacher_positions"].to(dev).long()
        need = torch.zeros(B, Tt + 1, dtype=torch.long, device=dev)  # positions the output layer runs at
        kb, kp = kl_mask.nonzero(as_tuple=True)
        need[kb, t_pos[kb, kp]] = 1
        cb, cc = chunk_mask.nonzero(as_tuple=True)
        edge = torch.zeros(B, Tt + 1, dtype=torch.long, device=dev)
        edge.index_put_((cb, chunk_t[cb, cc, 0]), torch.ones_like(cb), accumulate=True)
        edge.index_put_((cb, chunk_t[cb, cc, 1]), -torch.ones_like(cb), accumulate=True)
        need = (need + (edge.cumsum(1) > 0).long())[:, :Tt] > 0
        need[:, Tt - 1] = False  # no next token there
        rb, rt = need.nonzero(as_tuple=True)
        with torch.no_grad():
            out = self.body(input_ids=ids, attention_mask=att, use_cache=False)
            hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state
            h = hidden[rb, rt]
            del hidden, out
            r = teacher_targets(h, self.head.weight, ids[rb, rt + 1], vocab_size=self.vocab_size, top_k=self.top_k,
                                bias=self.head.bias, temperature=self.temperature, softcap=self.head.softcap,
                                logit_scale=self.head.scale, out_device=None)
        row_of = torch.full((B, Tt), -1, dtype=torch.long, device=dev)
        row_of[rb, rt] = torch.arange(rb.numel(), device=dev)
        # KL targets: the teacher's top-k at each target position, projected into student ids
        P = t_pos.shape[1]
        rows = row_of[kb, t_pos[kb, kp]]
        topk_ids = r["topk_ids"].to(dev)[rows].long()
        probs = r["topk_logprobs"].to(dev)[rows].float().exp()
        s_ids, s_probs = self.W.project(topk_ids, probs)
        K = max(int(s_ids.shape[-1]) if s_ids.dim() == 2 else 1, 1)
        target_ids = torch.zeros(B, P, K, dtype=torch.int32, device=dev)
        target_probs = torch.zeros(B, P, K, dtype=torch.float32, device=dev)
        tail = torch.zeros(B, P, dtype=torch.float32, device=dev)
        if rows.numel():
            s_ids, s_probs = s_ids.to(dev), s_probs.to(dev).float()
            valid = (s_ids >= 0) & (s_probs > 0)
            target_ids[kb, kp] = torch.where(valid, s_ids, 0).to(torch.int32)
            target_probs[kb, kp] = torch.where(valid, s_probs, 0.0)
            tail[kb, kp] = (1.0 - target_probs[kb, kp].double().sum(-1)).clamp_min(0.0).float()
        # chunk log-likelihoods: sums of the realised tokens' log-probs over each chunk's teacher positions
        lp = torch.zeros(B, Tt + 1, dtype=torch.float64, device=dev)
        lp[rb, rt + 1] = r["target_logprob"].to(dev).double()  # lp[b, t + 1] = log p(token t + 1 | <= t)
        cum = lp.cumsum(1)
        chunk_lp = torch.zeros(chunk_t.shape[:2], dtype=torch.float32, device=dev)
        if cb.numel():
            first, stop = chunk_t[cb, cc, 0], chunk_t[cb, cc, 1]
            chunk_lp[cb, cc] = (cum[cb, stop] - cum[cb, first]).float()
        tb.update({"target_ids": target_ids, "target_probs": target_probs, "tail_mass": tail,
                   "chunk_teacher_logprob": chunk_lp, "temperature": self.temperature})
        return tb


def check_vocab_rows(n_rows: int, n_ids: int, who: str) -> int:
    """The number of vocabulary rows to use for a model with `n_rows` output rows and a tokenizer of
    `n_ids` ids: `n_ids` (rows beyond it are embedding padding and never get or give mass); a
    ValueError naming both numbers when the model has fewer rows than the tokenizer has ids."""
    if n_rows < n_ids:
        raise ValueError(f"{who}: the model's output layer has {n_rows} rows but its tokenizer has {n_ids} ids; "
                         "they do not belong together (pass the model's own tokenizer).")
    return n_ids


def fill_online_targets(batch: dict, teachers: Sequence[TeacherSpec] | Mapping[str, "OnlineTeacher"],
                        student: Tokenizer | None = None, device=None) -> dict:
    """Run every online teacher of `batch` (module doc) and return the batch. `teachers`: the collator's
    TeacherSpecs (each wrapped in an OnlineTeacher on first use, cached on the spec) or ready
    OnlineTeachers by name; `student`: the student tokenizer (for W's hash check)."""
    tbs = batch.get("teachers") or {}
    items = teachers.items() if isinstance(teachers, Mapping) else [(t.name, t) for t in teachers]
    for name, t in items:
        tb = tbs.get(name)
        if tb is None or not tb.get("online"):
            continue
        if isinstance(t, TeacherSpec):
            runner = t.runner
            if runner is None:
                if student is None:
                    raise ValueError("fill_online_targets: pass student= (the student tokenizer) with TeacherSpecs.")
                runner = t.runner = OnlineTeacher(t, student, device)
        else:
            runner = t
        runner.fill(tb)
    return batch
