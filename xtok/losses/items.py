"""Loss items from the collator's batch (docs/architecture.md, "collate -> losses"): which flat student
rows `b*T + t` carry a KL target, a chunk-likelihood token or an SFT label, and what is evaluated there.

Every id that an item evaluates (a KL target id with probability > 0, a chunk token, a label) must be a
row of the student's output: given `vocab_size`, an id outside [0, vocab_size) is a ValueError naming
the component, the example and the position, and the likely cause (a W or a batch built for another
student tokenizer), instead of an IndexError deep in the row engine (or a device-side assert on CUDA)."""
from __future__ import annotations

from typing import Mapping

import torch

from .engine import KLGroup, KLSpec

IGNORE_INDEX = -100


def student_vocab(student) -> int:
    """Rows of the student's output: logits [..., V], or (hidden, lm_head_weight [V, H])."""
    return int(student[1].shape[0]) if isinstance(student, (tuple, list)) else int(student.shape[-1])


def _check_ids(ids: torch.Tensor, used: torch.Tensor, vocab_size: int | None, describe) -> None:
    """ValueError for the first id of `ids` where `used` that lies outside [0, vocab_size);
    describe(flat index of it in ids, id) -> the message."""
    if vocab_size is None or ids.numel() == 0:
        return
    bad = used & ((ids < 0) | (ids >= vocab_size))
    if bool(bad.any()):
        n = int(bad.sum())
        j = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(describe(j, int(ids.reshape(-1)[j])) + (f" ({n - 1} more such ids)" if n > 1 else ""))


def _where(vocab_size: int) -> str:
    return f"outside the student's vocabulary [0, {vocab_size}) (the rows of its output layer / logits)"


def kl_items(tb: Mapping, T: int, spec: KLSpec, device, *, vocab_size: int | None = None,
             who: str = "CrossTokenizerKLLoss"):
    """Valid target positions of one teacher -> (KLGroup, (b, p) index of each item). vocab_size: the
    student's output rows (target ids with probability > 0 are checked against it; the ids of padding
    entries, probability 0, are not ids and are set to 0)."""
    pos = tb["positions"].to(device).long()
    ok = tb["mask"].to(device).bool() & tb["present"].to(device).bool()[:, None] & (pos >= 0) & (pos < T)
    b, p = ok.nonzero(as_tuple=True)
    rows = b * T + pos[b, p]
    q = tb["target_probs"].to(device)[b, p]
    ids = tb["target_ids"].to(device).long()[b, p]
    K = max(int(ids.shape[-1]), 1) if ids.dim() == 2 else 1
    _check_ids(ids, q > 0, vocab_size, lambda j, v: (
        f"{who}: target id {v} of example {int(b[j // K])} (target {int(p[j // K])}, student position "
        f"{int(pos[b[j // K], p[j // K]])}) is {_where(vocab_size)}. The teacher's targets were projected with a W "
        "built for another student tokenizer: rebuild W with `xtok build-projection --student <the student's "
        "tokenizer>` and give the collator that tokenizer."))
    used = q > 0
    ids = torch.where(used, ids, torch.zeros_like(ids))  # padding (prob 0) may hold any id, e.g. project()'s -1
    g = KLGroup(rows, ids, q, tb["tail_mass"].to(device)[b, p], used, spec)
    return g, (b, p)


def chunk_items(tb: Mapping, input_ids: torch.Tensor, *, vocab_size: int | None = None,
                who: str = "ChunkLikelihoodLoss"):
    """Valid chunks -> token items (rows, token ids, chunk index) and the chunks' (b, c)."""
    B, T = input_ids.shape
    dev = input_ids.device
    spans = tb["chunk_spans"].to(dev).long()
    s0, s1 = spans[..., 0], spans[..., 1]
    ok = tb["chunk_mask"].to(dev).bool() & tb["present"].to(dev).bool()[:, None] & (s0 >= 1) & (s1 > s0) & (s1 <= T)
    b, c = ok.nonzero(as_tuple=True)
    lens = (s1 - s0)[b, c]
    n = b.numel()
    chunk_of = torch.repeat_interleave(torch.arange(n, device=dev), lens)
    starts = torch.cumsum(lens, 0) - lens
    tok_pos = s0[b, c][chunk_of] + (torch.arange(chunk_of.numel(), device=dev) - starts[chunk_of])
    tb_ = b[chunk_of]
    rows = tb_ * T + tok_pos - 1
    toks = input_ids.long()[tb_, tok_pos]
    _check_ids(toks, torch.ones_like(toks, dtype=torch.bool), vocab_size, lambda j, v: (
        f"{who}: input id {v} at example {int(tb_[j])}, position {int(tok_pos[j])} (inside a teacher chunk) is "
        f"{_where(vocab_size)}. The batch's input_ids come from another tokenizer than the student model's: "
        "give the collator the student model's own tokenizer."))
    return rows, toks, chunk_of, (b, c)


def sft_items(labels: torch.Tensor, *, vocab_size: int | None = None, who: str = "SFTLoss"):
    """Label tokens -> (rows, token ids, b): output position t predicts labels[t+1] (-100: none)."""
    B, T = labels.shape
    nxt = labels[:, 1:].long()
    keep = nxt != IGNORE_INDEX
    _check_ids(nxt, keep, vocab_size, lambda j, v: (
        f"{who}: label {v} at example {j // max(T - 1, 1)}, position {j % max(T - 1, 1) + 1} is {_where(vocab_size)} "
        f"(and not the ignore index {IGNORE_INDEX}). The labels come from another tokenizer than the student "
        "model's, or mark ignored tokens with -100."))
    b, t = keep.nonzero(as_tuple=True)
    return b * T + t, nxt[b, t], b


def no_rows(device):
    """An empty long tensor: no token items."""
    return torch.zeros(0, dtype=torch.long, device=device)
