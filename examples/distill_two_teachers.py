"""Distil one student from two teachers with different tokenizers, using only xtok's public API.

    python examples/distill_two_teachers.py [--steps 30] [--workdir .cache/example] [--workers 2] [--rows N]

The flow (each step is what you would do at scale):
  1. `xtok extract`          run each teacher once over the dataset -> a teacher store (top-k log-probs)
  2. `xtok build-projection` once per (teacher tokenizer, student tokenizer) pair -> W
  3. `xtok.CrossTokenizerCollator` tokenises for the student, aligns, projects the stored targets,
     in DataLoader worker processes (--workers, default 2)
  4. `xtok.MultiTeacherLossAggregator` SFT + per-teacher KL (+ chunk likelihood) in one pass

Teachers: `stories260K` (a real, trained tiny Llama with its own 512-token SentencePiece vocabulary,
from ../shared/assets/models) and, as a second teacher with a different tokenizer family (GPT-2
byte-level BPE), a *randomly initialised* tiny Llama written to the work dir: it stands in for a
real second model so that the example runs offline; its targets are noise, so it gets a small
weight. Student: a tiny Llama on the Mistral SentencePiece 32k tokenizer. Runs on CPU in ~1 minute.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import xtok
from xtok import CrossTokenizerCollator, MultiTeacherLossAggregator, TeacherSpec
from xtok.losses import TeacherLoss

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
STUDENT_TOK = "mistral-common:tokenizer.model.v1"
XTOK = str(Path(sys.executable).with_name("xtok"))


def sh(*args):
    print("$ xtok", " ".join(args[1:]), flush=True)
    subprocess.run(list(args), check=True)


def tiny_llama(vocab: int, dim: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=1024, tie_word_embeddings=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workdir", default=str(REPO / ".cache" / "example"))
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes running the collator")
    ap.add_argument("--rows", type=int, default=None, help="use only the first N paragraphs (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    # -- a small text dataset with stable keys --------------------------------------------------------
    text = (ASSETS / "corpora" / "tinystories_sample.txt").read_text(encoding="utf-8")
    paras = [p.strip() for p in text.split("\n") if len(p.strip()) > 40][: args.rows]
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"ex{i}", "text": p}) + "\n" for i, p in enumerate(paras)))
    rows = [json.loads(line) for line in data.read_text().splitlines()]

    # -- the two teachers ----------------------------------------------------------------------------
    t1 = ASSETS / "models" / "stories260K"
    t2 = work / "gpt2-teacher"
    gpt2_tok = ASSETS / "tokenizers" / "gpt2"
    if not (t2 / "config.json").exists():
        tiny_llama(xtok.load_tokenizer(str(gpt2_tok)).vocab_size, 32, seed=0).save_pretrained(t2)

    # 1. extract each teacher once (a finished store has a manifest.json; skip it then)
    if not (work / "store-stories" / "manifest.json").exists():
        sh(XTOK, "extract", "-m", str(t1), "-d", str(data), "-o", str(work / "store-stories"), "-k", "16",
           "--device", "cpu", "-q")
    if not (work / "store-gpt2" / "manifest.json").exists():
        sh(XTOK, "extract", "-m", str(t2), "--tokenizer", str(gpt2_tok), "-d", str(data),
           "-o", str(work / "store-gpt2"), "-k", "16", "--device", "cpu", "-q")
    # 2. one projection per (teacher tokenizer, student tokenizer)
    for name, tok in (("stories", str(t1)), ("gpt2", str(gpt2_tok))):
        if not (work / f"W-{name}.safetensors").exists():
            sh(XTOK, "build-projection", "-t", tok, "-s", STUDENT_TOK, "-o", str(work / f"W-{name}.safetensors"), "-q")

    # 3. the collator: student tokenisation + alignment + projection, inside DataLoader workers
    teachers = [TeacherSpec("stories", str(t1), str(work / "store-stories"), str(work / "W-stories.safetensors")),
                TeacherSpec("gpt2", str(gpt2_tok), str(work / "store-gpt2"), str(work / "W-gpt2.safetensors"))]
    collator = CrossTokenizerCollator(STUDENT_TOK, teachers, max_length=512)
    loader = DataLoader(rows, batch_size=4, shuffle=True, collate_fn=collator, num_workers=args.workers,
                        persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(0))

    # 4. the loss: SFT + KL from both teachers (+ chunk likelihood from the real one)
    loss_fn = MultiTeacherLossAggregator({"stories": TeacherLoss(weight=1.0, chunk_weight=0.5),
                                          "gpt2": TeacherLoss(weight=0.1)}, sft_weight=0.5)
    student = tiny_llama(collator.student.vocab_size, 64, seed=1)
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3)
    step = 0
    while step < args.steps:
        for batch in loader:
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, logs = loss_fn(logits, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 5 == 0 or step == args.steps - 1:
                print(f"step {step:3d} loss {float(logs['loss']):.3f} sft {float(logs['sft']):.3f} "
                      f"kl/stories {float(logs['kl/stories']):.3f} chunk/stories {float(logs['chunk/stories']):.3f} "
                      f"kl/gpt2 {float(logs['kl/gpt2']):.5f}", flush=True)
            step += 1
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
