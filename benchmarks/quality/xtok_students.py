"""Students (3) and (4): xtok projected KL (+ chunk likelihood), through xtok's public API.

- W: `xtok build-projection` (CLI) for tokenizer A -> tokenizer B, cached.
- Teacher store: written with `xtok.store.StoreWriter` / `encode_example` / `quantize_logprobs`.
  Not with `xtok extract`: extract loads a HF checkpoint whose output layer covers the tokenizer's
  full vocabulary (131k), while the benchmark teacher's softmax runs over the compact corpus
  vocabulary (data.py); a full-vocab export would need -inf logits for the ~120k absent ids, which a
  bias-free Llama head cannot express. So the benchmark computes the teacher's top-k over its compact
  vocabulary (= the exact full distribution of this teacher, whose other ids have probability 0),
  maps the ids back to tokenizer-A ids and writes a standard store.
- Batches: `xtok.CrossTokenizerCollator` + `xtok.TeacherSpec` (student tokenisation, alignment,
  projection, chunk spans); the student ids / target ids are then mapped to the student's compact
  vocabulary (target mass on ids outside it, if any, moves to the tail bucket).
- Loss: `xtok.MultiTeacherLossAggregator` with sft_weight = 1 - alpha, KL weight alpha, chunk
  weight alpha (student 4) or 0 (student 3), normalize='per_component' (the same per-position means
  as the baselines' (1 - alpha) CE + alpha D).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .model import logits_of, pad

TEACHER_NAME = "tekken"


def _key(i: int) -> str:
    return f"train-{i}"


def build_store(corpus, teacher, path: Path, k: int, batch_size: int = 16) -> None:
    from xtok.store import StoreWriter, encode_example, quantize_logprobs

    if (path / "manifest.json").exists():
        return
    tokA = corpus.A.tokenizer
    full = torch.as_tensor(corpus.A.full_ids)
    ws = torch.as_tensor(tokA.token_bytes.word_start[corpus.A.full_ids])
    seqs = corpus.A.train
    rows = [None] * len(seqs)
    order = np.argsort([len(s) for s in seqs])
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            js = order[i:i + batch_size]
            ids, lengths = pad([seqs[j] for j in js])
            lp = logits_of(teacher, ids)[:, :-1].float().log_softmax(-1)
            v, ix = lp.topk(k, dim=-1)
            tgt = lp.gather(-1, ids[:, 1:, None])[..., 0]
            wsm = (lp.exp() * ws).sum(-1)
            for b, j in enumerate(js):
                n = int(lengths[b]) - 1
                topk_lp = v[b, :n].numpy()
                tail = np.clip(1.0 - np.exp(topk_lp.astype(np.float64)).sum(-1), 0.0, 1.0).astype(np.float32)
                rows[j] = encode_example(
                    _key(int(j)), corpus.split.train[j], full[ids[b, :n + 1]].numpy().astype(np.int32),
                    np.arange(n, dtype=np.int32), full[ix[b, :n]].numpy(), quantize_logprobs(topk_lp), tail,
                    tgt[b, :n].numpy(), wsm[b, :n].numpy(), vocab_size=tokA.vocab_size)
    header = {"model": "benchmarks/quality teacher (compact vocab)", "tokenizer": corpus.A.tokenizer.name,
              "tokenizer_hash": tokA.content_hash, "vocab_size": tokA.vocab_size, "top_k": k,
              "temperature": 1.0, "sample_tail": 0}
    w = StoreWriter(str(path), header, overwrite=True)
    w.write_shard(0, rows)
    w.finish({"examples": len(rows)})
    print(f"xtok store: {len(rows)} examples, top-{k} ({time.time() - t0:.0f}s) -> {path}", flush=True)


def prepare(corpus, teacher, teacher_dir: Path, args) -> dict:
    W = teacher_dir.parent / "W-tekken-spm.safetensors"
    if not W.exists():
        xtok_bin = Path(sys.executable).with_name("xtok")
        subprocess.run([str(xtok_bin), "build-projection", "-t", corpus.A.tokenizer.name if False else
                        "mistral-common:tekken_240911.json", "-s", "mistral-common:tokenizer.model.v1",
                        "-o", str(W), "-q"], check=True)
    store = teacher_dir / f"store-k{args.top_k}"
    build_store(corpus, teacher, store, args.top_k)
    notes = ["xtok students: W from `xtok build-projection` (tekken -> SentencePiece), teacher store written "
             "with xtok.store's writer (not `xtok extract`: the compact-vocab teacher is not a full-vocab HF "
             "checkpoint), batches from xtok.CrossTokenizerCollator, loss from "
             "xtok.MultiTeacherLossAggregator (normalize='per_component')."]
    return {"W": str(W), "store": str(store), "notes": notes}


def _compact_batch(batch: dict, lut: torch.Tensor) -> dict:
    ids = batch["input_ids"]
    cid = lut[ids]
    real = batch["attention_mask"].bool()
    assert (cid[real] >= 0).all(), "student token outside the compact vocabulary"
    cid = cid.clamp_min(0)
    labels = torch.where(batch["labels"] == -100, batch["labels"], cid)
    teachers = {}
    for name, tb in batch["teachers"].items():
        tid = lut[tb["target_ids"]]
        probs = tb["target_probs"]
        out = tid < 0
        moved = torch.where(out, probs, 0.0).sum(-1)
        tb = dict(tb, target_ids=tid.clamp_min(0), target_probs=torch.where(out, 0.0, probs),
                  tail_mass=tb["tail_mass"] + moved)
        teachers[name] = tb
    return {"input_ids": cid, "labels": labels, "attention_mask": batch["attention_mask"], "teachers": teachers}


def objective(paths: dict, corpus, with_chunk: bool, args, cache: dict):
    from xtok import CrossTokenizerCollator, MultiTeacherLossAggregator, TeacherSpec
    from xtok.losses import TeacherLoss

    if "collator" not in cache:
        cache["collator"] = CrossTokenizerCollator(
            corpus.B.tokenizer, [TeacherSpec(TEACHER_NAME, corpus.A.tokenizer, paths["store"], paths["W"])],
            max_length=4096, add_special_tokens=True)
        cache["lut"] = torch.as_tensor(corpus.B.compact_lut())
    col, lut = cache["collator"], cache["lut"]
    a = args.alpha
    agg = MultiTeacherLossAggregator({TEACHER_NAME: TeacherLoss(weight=a, chunk_weight=a if with_chunk else 0.0)},
                                     sft_weight=1 - a, normalize="per_component")

    def obj(model, idx):
        batch = _compact_batch(col([{"id": _key(int(i)), "text": corpus.split.train[i]} for i in idx]), lut)
        logits = logits_of(model, batch["input_ids"])
        loss, logs = agg(logits, batch)
        return loss, {k: float(v) for k, v in logs.items() if k.startswith(("sft", "kl/", "chunk/"))}
    return obj
