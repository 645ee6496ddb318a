"""Tiny Llama models, padding, a seeded training loop and the exact held-out bits-per-byte metric."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

LN2 = math.log(2.0)


@dataclass
class ModelConfig:
    dim: int = 128
    layers: int = 4
    heads: int = 4
    ffn: int = 384
    max_len: int = 1024


def make_model(vocab: int, cfg: ModelConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=vocab, hidden_size=cfg.dim, intermediate_size=cfg.ffn,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.heads, max_position_embeddings=cfg.max_len,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=None, pad_token_id=None,
                       attn_implementation="sdpa")
    model = LlamaForCausalLM(conf)
    model.config.use_cache = False
    return model


def pad(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad compact-id sequences with 0. Returns ``ids [B,T]`` and ``lengths [B]``.

    Right padding needs no attention mask for a causal model: real positions never attend to pads.
    """
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s)
    return ids, torch.as_tensor([len(s) for s in seqs])


def target_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, T-1]`` bool: output position p predicts token p+1, valid when p+1 < length."""
    return torch.arange(T - 1)[None, :] < (lengths[:, None] - 1)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def sft_loss(logits: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over real target positions."""
    m = target_mask(lengths, ids.shape[1])
    lp = logits[:, :-1].float().log_softmax(-1)
    nll = -lp.gather(-1, ids[:, 1:, None])[..., 0]
    return nll[m].mean()


def heldout_bits(model, seqs: list[np.ndarray], batch_size: int = 16) -> float:
    """Total -log2 p of every held-out token (all tokens after the BOS): `xtok.evaluation.heldout_bits`."""
    from xtok.evaluation import heldout_bits as _bits

    return _bits(model, seqs, batch_size)


def bits_per_byte(model, seqs: list[np.ndarray], n_bytes: int, batch_size: int = 16) -> float:
    return heldout_bits(model, seqs, batch_size) / n_bytes


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    clip: float = 1.0
    data_seed: int = 0    # example order: identical for every method at a given seed


def batch_schedule(n_examples: int, cfg: TrainConfig, seed: int) -> list[np.ndarray]:
    """Example indices for every step: epochs of seeded permutations, same for every method."""
    rng = np.random.default_rng(10_000 + seed + cfg.data_seed)
    out, perm, pos = [], rng.permutation(n_examples), 0
    for _ in range(cfg.steps):
        if pos + cfg.batch_size > n_examples:
            perm, pos = rng.permutation(n_examples), 0
        out.append(perm[pos:pos + cfg.batch_size])
        pos += cfg.batch_size
    return out


Objective = Callable[[torch.nn.Module, np.ndarray], "tuple[torch.Tensor, dict]"]


def train(model, objective: Objective, n_examples: int, cfg: TrainConfig, seed: int,
          log_every: int = 0, tag: str = "") -> dict:
    """Seeded AdamW + linear warmup + cosine decay. ``objective(model, example_idx) -> (loss, logs)``."""
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

    def lr_at(step):
        from xtok.evaluation import warmup_cosine

        return warmup_cosine(step, cfg.steps, cfg.warmup, floor=0.1)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0, hist = time.time(), []
    for step, idx in enumerate(batch_schedule(n_examples, cfg, seed)):
        loss, logs = objective(model, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        hist.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            extra = " ".join(f"{k}={v:.3f}" for k, v in logs.items())
            print(f"  [{tag}] step {step:4d} loss {float(loss.detach()):.4f} {extra} ({time.time() - t0:.0f}s)",
                  flush=True)
    model.eval()
    return {"train_seconds": time.time() - t0, "final_loss": float(np.mean(hist[-10:])),
            "config": asdict(cfg)}
