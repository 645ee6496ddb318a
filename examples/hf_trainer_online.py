"""Distil a student with the Hugging Face Trainer from a stored teacher and a live (online) teacher, each
on another tokenizer than the student, using only xtok's public API.

    python examples/hf_trainer_online.py [--steps 20] [--workdir .cache/example-hf] [--workers 1]
    torchrun --nproc-per-node 2 examples/hf_trainer_online.py --steps 20   # DDP (gloo on CPU, nccl on GPUs)

The flow:
  1. `xtok build-projection` once per (teacher tokenizer, student tokenizer) pair -> W
  2. `xtok extract` runs the *stored* teacher once over the dataset -> a teacher store
  3. the *online* teacher is a model object: `TeacherSpec(name, tokenizer, projection=W, model=teacher)`;
     the collator renders and aligns for it in the DataLoader workers, and `DistillationTrainer` runs it
     on the training device at every step (no store)
  4. `xtok.DistillationTrainer` (a `transformers.Trainer`) trains the student with
     `MultiTeacherLossAggregator`: SFT + each teacher's KL (+ chunk likelihood)

Teachers: online, `stories260K` (a real trained tiny Llama with its own 512-token SentencePiece, from
../shared/assets/models) when it is there, else a randomly initialised tiny Llama on mistral-common's
SentencePiece v3 vocabulary standing in for it; stored, a randomly initialised tiny Llama on the Tekken
131k byte-level vocabulary (a stand-in for a real model, so the example runs offline; small weight).
Student: a tiny Llama on the Mistral SentencePiece 32k tokenizer. ~1 minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

from xtok import CrossTokenizerCollator, DistillationTrainer, MultiTeacherLossAggregator, TeacherSpec
from xtok.losses import TeacherLoss

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("XTOK_ASSETS", REPO.parent / "shared" / "assets"))
STUDENT_TOK = "mistral-common:tokenizer.model.v1"
STORED_TOK = "mistral-common:tekken_240911.json"
STANDIN_TOK = "mistral-common:mistral_instruct_tokenizer_240323.model.v3"
XTOK = [sys.executable, "-c", "from xtok.cli import main; main()"]


def tiny_llama(vocab: int, dim: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=1024, tie_word_embeddings=True))


def texts(n: int) -> list[str]:
    p = ASSETS / "corpora" / "tinystories_sample.txt"
    if p.exists():
        stories = [s.strip() for s in p.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
        return [stories[i % len(stories)] for i in range(n)]
    from xtok.cli.demo import stdlib_docstrings

    return stdlib_docstrings(n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--workdir", default=str(REPO / ".cache" / "example-hf"))
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (tokenising + aligning)")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    rank = int(os.environ.get("RANK", 0))
    work.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"ex{i}", "text": t} for i, t in enumerate(texts(args.rows))]

    stories = ASSETS / "models" / "stories260K"
    online_tok = str(stories) if stories.is_dir() else STANDIN_TOK
    if rank == 0:  # one-time artefacts (projections, the stored teacher's store); other ranks wait below
        data = work / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        for name, tok in (("online", online_tok), ("stored", STORED_TOK)):
            if not (work / f"W_{name}.safetensors").exists():
                subprocess.run(XTOK + ["build-projection", "--teacher", tok, "--student", STUDENT_TOK, "-o",
                                       str(work / f"W_{name}.safetensors")], check=True)
        if not (work / "stored_teacher").exists():
            tiny_llama(131072, 32, seed=1).save_pretrained(work / "stored_teacher")
        subprocess.run(XTOK + ["extract", "-m", str(work / "stored_teacher"), "--tokenizer", STORED_TOK, "-d",
                               str(data), "-o", str(work / "store"), "-k", "16", "--device", "cpu", "--quiet"],
                       check=True)
        (work / "ready").write_text("ok")
    else:
        import time

        while not (work / "ready").exists():
            time.sleep(1)

    teacher = (AutoModelForCausalLM.from_pretrained(stories) if stories.is_dir()
               else tiny_llama(32768, 32, seed=2))
    collator = CrossTokenizerCollator(STUDENT_TOK, [
        TeacherSpec("online", online_tok, projection=str(work / "W_online.safetensors"), model=teacher, top_k=16),
        TeacherSpec("stored", STORED_TOK, str(work / "store"), str(work / "W_stored.safetensors")),
    ], max_length=256)
    aggregator = MultiTeacherLossAggregator({"online": TeacherLoss(weight=1.0, chunk_weight=0.2),
                                             "stored": TeacherLoss(weight=0.1)}, sft_weight=0.5)
    student = tiny_llama(32000, 64, seed=0)
    targs = TrainingArguments(output_dir=str(work / "run"), max_steps=args.steps, per_device_train_batch_size=4,
                              gradient_accumulation_steps=2, learning_rate=3e-3, lr_scheduler_type="cosine",
                              warmup_steps=2, logging_steps=max(1, args.steps // 4), save_strategy="no",
                              report_to=[], dataloader_num_workers=args.workers, use_cpu=not torch.cuda.is_available(),
                              ddp_backend="gloo" if "WORLD_SIZE" in os.environ and not torch.cuda.is_available() else None,
                              disable_tqdm=True)
    trainer = DistillationTrainer(model=student, args=targs, train_dataset=rows, data_collator=collator,
                                  aggregator=aggregator)
    trainer.train()
    if trainer.is_world_process_zero():
        for h in trainer.state.log_history:
            if "loss" in h:
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()}, flush=True)


if __name__ == "__main__":
    main()
