"""The teacher statistics of output positions, computed on the device: `teacher_targets` applies the
output layer to hidden states in chunks of positions, fused with the log-sum-exp, top-k (optionally a
top-p cap), the exact tail mass, the realised token's log-prob, the word-start mass and sampled tail
ids, so no [N, V] fp32 logits exist beyond one chunk and only [N, k]-sized results leave the device.
`store_rows` turns its results into the per-example arrays a teacher store keeps (quantised
log-probs). Used by `xtok extract`; usable by any caller holding hidden states and an output layer."""
from __future__ import annotations

import math

import numpy as np

from ..store import quantize_logprobs

TARGET_FIELDS = ("topk_ids", "topk_logprobs", "n_kept", "tail_mass", "target_logprob", "word_start_mass", "tail_ids")


def output_logits(h, w, b, logit_scale: float = 1.0, softcap: float | None = None):
    """float32 logits of the output layer: softcap(logit_scale * (h @ w.T + b)) (the order the models use)."""
    import torch

    logits = torch.nn.functional.linear(h, w, b).float()
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def teacher_targets(hidden, weight, targets, *, vocab_size: int, top_k: int, word_start=None, bias=None,
                    temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                    top_p: float | None = None,
                    sample_tail: int = 0, uniforms=None, chunk_rows: int | None = None, chunk_bytes: int = 256 << 20,
                    out_device="cpu"):
    """Teacher statistics for N output positions, computed in chunks of positions on hidden's device.

    hidden [N, D] (final hidden states at the positions), weight [V_model, D] (output layer), targets
    [N] (realised next token ids), vocab_size: the tokenizer's vocabulary (model rows beyond it are
    padding and are excluded from the softmax), logits = softcap(logit_scale * (hidden @ weight.T + bias)) /
    temperature, word_start bool [vocab_size], uniforms [N, m] in
    [0, 1) for the sampled tail (inverse-CDF sampling, so results depend only on the uniforms).
    Returns tensors on `out_device` (default the CPU, what a store writer needs; None: hidden's device,
    what a live teacher needs): topk_ids int32 [N, k], topk_logprobs float32 [N, k] (descending, normalised
    by the exact full-vocab log-sum-exp), n_kept int64 [N] (top-p), tail_mass float32 [N] (exact,
    from the log-sum-exp of the tail), target_logprob float32 [N], word_start_mass float32 [N],
    tail_ids int32 [N, m] (-1 when the tail is empty).
    """
    import torch

    N, V = hidden.shape[0], int(vocab_size)
    k = min(int(top_k), V)
    m = int(sample_tail)
    dev = hidden.device
    out_dev = dev if out_device is None else torch.device(out_device)
    if chunk_rows is None:
        chunk_rows = max(1, int(chunk_bytes // (V * 4 * 5)))
    w = weight[:V]
    b = bias[:V] if bias is not None else None
    ws = word_start.to(dev) if word_start is not None else None
    targets = targets.to(dev)
    out = {n: [] for n in TARGET_FIELDS}
    for s in range(0, N, chunk_rows):
        # the chunk's logits are passed, not held here: the [n, V] buffer is freed before the next chunk's
        part = _chunk_targets(_scaled_logits(hidden[s: s + chunk_rows], w, b, logit_scale, softcap, temperature),
                              targets[s: s + chunk_rows], k, ws, top_p,
                              uniforms[s: s + chunk_rows] if m else None, out_dev)
        for n, v in part.items():
            out[n].append(v)
    res = {}
    for n, parts in out.items():
        if parts:
            res[n] = torch.cat(parts)
    if "tail_ids" not in res:
        res["tail_ids"] = torch.zeros((N, 0), dtype=torch.int32, device=out_dev)
    if N == 0:
        z = dict(device=out_dev)
        res = {"topk_ids": torch.zeros((0, k), dtype=torch.int32, **z), "topk_logprobs": torch.zeros((0, k), **z),
               "n_kept": torch.zeros(0, dtype=torch.long, **z), "tail_mass": torch.zeros(0, **z),
               "target_logprob": torch.zeros(0, **z), "word_start_mass": torch.zeros(0, **z),
               "tail_ids": torch.zeros((0, m), dtype=torch.int32, **z)}
    return res


def _scaled_logits(h, w, b, logit_scale, softcap, temperature):
    logits = output_logits(h, w, b, logit_scale, softcap)
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def _chunk_targets(logits, tgt, k: int, ws, top_p, uniforms, out_dev) -> dict:
    """teacher_targets' statistics of one chunk of positions from its logits [n, V] (consumed: exp in
    place) as tensors on out_dev; 'tail_ids' only when uniforms [n, m] are given."""
    import torch

    V = logits.shape[1]
    dev = logits.device
    out = {}
    vals, ids = torch.topk(logits, k, dim=-1, sorted=True)
    tgt = tgt.long()
    tl = logits.gather(1, tgt.clamp(0, V - 1)[:, None]).squeeze(-1)
    # one exp pass: probs = exp(logits - max) in place, lse = max + log(sum)
    mx = vals[:, :1]
    probs = logits.sub_(mx).exp_()                       # unnormalised; logits is consumed
    z = probs.sum(-1, keepdim=True)
    lse = mx + z.log()
    lp = vals - lse
    tlp = tl - lse.squeeze(-1)
    if top_p is not None:
        cum = torch.cumsum(lp.exp(), dim=-1)
        n_kept = ((cum < top_p).sum(-1) + 1).clamp(max=k)
    else:
        n_kept = torch.full((logits.shape[0],), k, dtype=torch.long, device=dev)
    kept = torch.arange(k, device=dev)[None, :] < n_kept[:, None]
    if ws is not None:
        wsm = (probs @ ws.to(probs.dtype)) / z.squeeze(-1)
    else:
        wsm = torch.zeros_like(tlp)
    # tail: zero the kept top-k entries and sum what is left (no cancellation for tiny tails)
    probs.scatter_(1, ids, torch.where(kept, torch.zeros_like(vals), vals.sub(mx).exp()))
    tail_mass = probs.sum(-1) / z.squeeze(-1)
    if uniforms is not None:
        u = uniforms.to(dev, torch.float32)
        cdf = torch.cumsum(probs, dim=-1)
        total = cdf[:, -1:]
        tid = torch.searchsorted(cdf, (u * total).contiguous(), right=True).clamp(max=V - 1)
        tid = torch.where(total > 0, tid, torch.full_like(tid, -1))
        out["tail_ids"] = tid.to(torch.int32).to(out_dev)
        del cdf
    del logits, probs
    lp = torch.where(kept, lp, torch.full_like(lp, -math.inf))
    ids = torch.where(kept, ids, torch.full_like(ids, -1))
    out["topk_ids"] = ids.to(torch.int32).to(out_dev)
    out["topk_logprobs"] = lp.to(out_dev)
    out["n_kept"] = n_kept.to(out_dev)
    out["tail_mass"] = tail_mass.to(out_dev)
    out["target_logprob"] = tlp.to(out_dev)
    out["word_start_mass"] = wsm.float().to(out_dev)
    return out


def store_rows(targets: dict, counts, *, top_p: float | None, sample_tail: int) -> list[dict]:
    """`teacher_targets` results for consecutive examples (counts[i] positions each) -> per example, the
    arrays a teacher store keeps: topk_ids, codes (the log-probs quantised by xtok.store.quantize_logprobs),
    tail_mass, target_logprob, word_start_mass, n_kept (None without top_p) and tail_ids (None without
    a sampled tail)."""
    lp = targets["topk_logprobs"].numpy()
    codes = quantize_logprobs(np.where(np.isfinite(lp), lp, -np.inf))
    splits = np.cumsum(counts)[:-1]
    parts = {n: np.split(v, splits) for n, v in (
        ("topk_ids", targets["topk_ids"].numpy()), ("codes", codes), ("tail_mass", targets["tail_mass"].numpy()),
        ("target_logprob", targets["target_logprob"].numpy()),
        ("word_start_mass", targets["word_start_mass"].numpy()),
        ("n_kept", targets["n_kept"].numpy()), ("tail_ids", targets["tail_ids"].numpy()))}
    res = []
    for b in range(len(counts)):
        d = {n: parts[n][b] for n in parts}
        if top_p is None:
            d["n_kept"] = None
        if not sample_tail:
            d["tail_ids"] = None
        res.append(d)
    return res
