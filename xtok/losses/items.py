"""Loss items from the collator's batch (docs/architecture.md, "collate -> losses"): which flat student
rows `b*T + t` carry a KL target, a chunk-likelihood token or an SFT label, and what is evaluated there."""
from __future__ import annotations

from typing import Mapping

import torch

from .engine import KLGroup, KLSpec

IGNORE_INDEX = -100


def kl_items(tb: Mapping, T: int, spec: KLSpec, device):
    """Valid target positions of one teacher -> (KLGroup, (b, p) index of each item)."""
    pos = tb["positions"].to(device).long()
    ok = tb["mask"].to(device).bool() & tb["present"].to(device).bool()[:, None] & (pos >= 0) & (pos < T)
    b, p = ok.nonzero(as_tuple=True)
    rows = b * T + pos[b, p]
    q = tb["target_probs"].to(device)[b, p]
    g = KLGroup(rows, tb["target_ids"].to(device).long()[b, p], q, tb["tail_mass"].to(device)[b, p], q > 0, spec)
    return g, (b, p)


def chunk_items(tb: Mapping, input_ids: torch.Tensor):
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
    return rows, toks, chunk_of, (b, c)


def sft_items(labels: torch.Tensor):
    """Label tokens -> (rows, token ids, b): output position t predicts labels[t+1] (-100: none)."""
    B, T = labels.shape
    nxt = labels[:, 1:].long()
    b, t = (nxt != IGNORE_INDEX).nonzero(as_tuple=True)
    return b * T + t, nxt[b, t], b


def no_rows(device):
    """An empty long tensor: no token items."""
    return torch.zeros(0, dtype=torch.long, device=device)
