"""Evaluating and training small students the same way everywhere (the demo, the quality benchmark,
your own scripts): the exact held-out bits-per-byte metric and the warmup + cosine learning-rate
schedule.

`bits_per_byte(model, sequences, n_bytes)`: the sum over every sequence of -log2 p(token | prefix) for
every token after the first (the model's own forward: its full-vocabulary softmax, or `vocab_size`
rows of it), divided by the UTF-8 bytes of the text those tokens spell. Two models on different
tokenizers are compared on the same bytes, so the figure does not depend on the tokenizer.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["pad_right", "heldout_bits", "bits_per_byte", "warmup_cosine", "LN2"]

LN2 = math.log(2.0)


def pad_right(seqs: Sequence[np.ndarray], pad_id: int = 0) -> dict:
    """input_ids / attention_mask [B, T] long and labels (-100 on padding) of id sequences, right-padded."""
    import torch

    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), int(pad_id), np.int64)
    att = np.zeros((len(seqs), T), np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        att[i, : len(s)] = 1
    ids_t, att_t = torch.from_numpy(ids), torch.from_numpy(att)
    return {"input_ids": ids_t, "attention_mask": att_t, "labels": torch.where(att_t.bool(), ids_t, -100)}


def heldout_bits(model, seqs: Sequence[np.ndarray], batch_size: int = 16, vocab_size: int | None = None,
                 sort_by_length: bool = True) -> float:
    """Total -log2 p of every token after the first of each sequence (float64 sum). Sequences are batched
    (by length when sort_by_length) with right padding: a causal model's real positions never see the
    pads. `vocab_size`: use only the first rows of the output (a padded embedding)."""
    import torch

    was_training = model.training
    model.eval()
    order = np.argsort([len(s) for s in seqs], kind="stable") if sort_by_length else np.arange(len(seqs))
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            b = pad_right([seqs[j] for j in order[i:i + batch_size]])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            if vocab_size is not None:
                logits = logits[..., : int(vocab_size)]
            lp = logits.float().log_softmax(-1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]
            total -= float(lp[b["attention_mask"][:, 1:].bool()].double().sum())
    model.train(was_training)
    return total / LN2


def bits_per_byte(model, seqs: Sequence[np.ndarray], n_bytes: int, batch_size: int = 16,
                  vocab_size: int | None = None, sort_by_length: bool = True) -> float:
    """Held-out bits per byte: `heldout_bits` / n_bytes (module doc)."""
    return heldout_bits(model, seqs, batch_size, vocab_size, sort_by_length) / int(n_bytes)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """The learning-rate factor at `step` of `total`: linear warmup over `warmup` steps to 1, then cosine
    decay to `floor`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * t))
