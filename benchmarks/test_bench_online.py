"""Training step with a live (online) teacher vs the same step reading the teacher's store.

One teacher (a tiny Llama over the Tekken 131k vocabulary, random weights: the cost, not the quality, is
measured), one student (SentencePiece 32k, dim 128, 4 layers), batches of 8 rows of ~256 student tokens,
top-k 32. The reference is the step reading an `xtok extract` store of the same teacher (collate + student
forward/backward + AdamW step); the online step adds the teacher's forward, top-k and projection on the
device (`fill_online_targets`). Reported: median wall seconds per step of each (5 steps after a warm-up,
in one process, interleaved), the ratio online / store, and the teacher's share of the online step.
No target is set by the issue; the figures go to docs/trainer.md. CPU here (2 cores); GPU figures when a
device is lent.
"""
from __future__ import annotations

import json
import statistics
import time

import pytest
import torch

from benchmarks.conftest import report
from xtok.testing.assets import ASSETS, MISTRAL_SPM, TEKKEN


def _llama(vocab, dim, layers, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=2048, tie_word_embeddings=True))


def _rows(n):
    p = ASSETS / "corpora" / "tinyshakespeare.txt"
    if p.exists():
        text = p.read_text(encoding="utf-8")
        return [{"id": f"r{i}", "text": text[i * 1100: i * 1100 + 1000]} for i in range(n)]
    from xtok.cli.demo import stdlib_docstrings

    return [{"id": f"r{i}", "text": t} for i, t in enumerate(stdlib_docstrings(n, min_chars=400, max_chars=1000))]


@pytest.mark.slow
def test_bench_online_vs_store_step(tmp_path):
    from click.testing import CliRunner

    from projection_tools.build import build_projection
    from xtok import CrossTokenizerCollator, MultiTeacherLossAggregator, TeacherSpec
    from xtok.cli import main
    from xtok.collate import fill_online_targets
    from xtok.losses import TeacherLoss
    from xtok.tokens import load_tokenizer

    torch.set_num_threads(2)
    rows = _rows(48)
    with open(tmp_path / "data.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    teacher = _llama(131072, 256, 4, seed=1).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    res = CliRunner().invoke(main, ["extract", "-m", str(tmp_path / "teacher"), "--tokenizer", TEKKEN, "-d",
                                    str(tmp_path / "data.jsonl"), "-o", str(tmp_path / "store"), "-k", "32",
                                    "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    build_projection(load_tokenizer(TEKKEN), load_tokenizer(MISTRAL_SPM), progress=False).save(tmp_path / "W.safetensors")
    W = str(tmp_path / "W.safetensors")
    store_col = CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("t", TEKKEN, str(tmp_path / "store"), W)], max_length=256)
    live_col = CrossTokenizerCollator(MISTRAL_SPM, [TeacherSpec("t", TEKKEN, projection=W, model=teacher, top_k=32)],
                                      max_length=256)
    agg = MultiTeacherLossAggregator({"t": TeacherLoss(weight=1.0, chunk_weight=0.2)}, sft_weight=0.5)
    students = {"store": _llama(32000, 128, 4, seed=2), "online": _llama(32000, 128, 4, seed=2)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in students.items()}
    times = {"store": [], "online": [], "teacher": []}

    def step(kind, batch_rows):
        t0 = time.perf_counter()
        col = store_col if kind == "store" else live_col
        batch = col(batch_rows)
        if kind == "online":
            t1 = time.perf_counter()
            fill_online_targets(batch, live_col.teachers, live_col.student)
            times["teacher"].append(time.perf_counter() - t1)
        m = students[kind]
        loss, _ = agg(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
        loss.backward()
        opts[kind].step()
        opts[kind].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for i in range(6):  # step 0 warms up (Numba, allocator); interleaved so load changes hit both alike
        batch_rows = rows[8 * i: 8 * i + 8]
        for kind in ("store", "online"):
            dt = step(kind, batch_rows)
            if i:
                times[kind].append(dt)
    if len(times["teacher"]) > 5:
        times["teacher"] = times["teacher"][1:]
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    report("online_vs_store_step", store_step_s=med["store"], online_step_s=med["online"],
           ratio_online_over_store=med["online"] / med["store"], teacher_s=med["teacher"],
           teacher_share_of_online=med["teacher"] / med["online"],
           store_range=f"{spread['store'][0]:.3f}-{spread['store'][1]:.3f}",
           online_range=f"{spread['online'][0]:.3f}-{spread['online'][1]:.3f}",
           device="cpu", threads=torch.get_num_threads())
    assert med["online"] > 0 and med["store"] > 0
