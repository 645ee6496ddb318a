"""Teacher store benchmarks (run with `pytest benchmarks/test_bench_store.py --benchmark -s`).

1. Bytes per position and fidelity at equal k versus re-implemented reference encoders of the public
   anchors' layouts, on real teacher outputs (stories260K on TinyStories text when ../shared is present,
   else a seeded random tiny Llama on Python source):
   - NeMo-Aligner style JSONL: per position k float logits + k ids + the log-sum-exp, as JSON text;
   - 0seba/logits style binary: k float16 logits + k 18-bit ids + 24 sampled 18-bit ids (+ a float32
     log-sum-exp per position, needed to normalise; counted).
   Fidelity: mean/max KL(exact teacher || reconstruction) per position over the k+1 buckets (top-k +
   tail), from a dense float64 full-softmax reference. xtok's figure is the real on-disk store (zstd
   parquet, including input ids and the rendered text) written by `extract`.
2. Extraction overhead (chunked top-k + store writing) versus the bare forward pass (HF forward with
   full logits) over the same batches.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.conftest import report
from conftest import ASSETS, MISTRAL_SPM


def _kl_cond(top_exact, top_rec):
    """KL between the top-k distributions renormalised (independent of how the tail is kept)."""
    a = top_exact - np.logaddexp.reduce(top_exact, 1, keepdims=True)
    b = top_rec - np.logaddexp.reduce(top_rec, 1, keepdims=True)
    return (np.exp(a) * (a - b)).sum(1)


def _kl_buckets(top_exact, tail_exact, top_rec, tail_rec):
    p = np.concatenate([np.exp(top_exact), tail_exact[:, None]], 1)
    q = np.concatenate([np.exp(top_rec), tail_rec[:, None]], 1)
    return (p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))).sum(1)


def _teacher(tmp_path):
    """(model dir, tokenizer spec or None, texts, name)."""
    m = ASSETS / "models" / "stories260K"
    c = ASSETS / "corpora" / "tinystories_sample.txt"
    if m.exists() and c.exists():
        texts = [t for t in c.read_text(encoding="utf-8").split("\n") if t.strip()]
        return m, None, texts, "stories260K/tinystories"
    from transformers import LlamaConfig, LlamaForCausalLM
    import inspect, json as _j  # noqa: E401

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    mdl = LlamaForCausalLM(cfg)
    with torch.no_grad():
        mdl.lm_head.weight.mul_(60)
    mdl.save_pretrained(tmp_path / "rnd")
    src = inspect.getsource(_j.decoder)
    return tmp_path / "rnd", MISTRAL_SPM, [src[i: i + 600] for i in range(0, len(src), 600)], "random-llama-32k/python"


@pytest.mark.parametrize("k", [8, 32])
def test_bytes_per_position_vs_anchors(tmp_path, k):
    from transformers import AutoModelForCausalLM

    from xtok.extract import ExtractConfig, extract
    from xtok.store import TeacherStore, pack_ids
    from xtok.tokens import load_tokenizer

    mdir, tok_spec, texts, name = _teacher(tmp_path)
    ds = tmp_path / "d.jsonl"
    ds.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    extract(ExtractConfig(model=str(mdir), tokenizer=tok_spec, dataset=str(ds), output=str(tmp_path / "s"), top_k=k,
                          progress=False))
    st = TeacherStore(tmp_path / "s")
    tok = load_tokenizer(tok_spec or str(mdir))
    V = tok.vocab_size
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    n_pos, nemo_bytes, kl = 0, 0, {"xtok": [], "nemo": [], "0seba": [], "xtok_c": [], "0seba_c": []}
    for ex in st:
        with torch.no_grad():
            logits = model(torch.as_tensor(ex.input_ids, dtype=torch.long)[None]).logits[0, :, :V].double()
        logits = logits[torch.as_tensor(ex.positions, dtype=torch.long)]
        lse = torch.logsumexp(logits, -1).numpy()
        lp = torch.log_softmax(logits, -1).numpy()
        order = np.argsort(-lp, 1)[:, :k]
        top = np.take_along_axis(lp, order, 1)
        tail = 1 - np.exp(top).sum(1)
        top_logits = np.take_along_axis(logits.numpy(), order, 1)
        n_pos += len(ex.positions)
        # xtok: what the store gives back
        kl["xtok"].append(_kl_buckets(top, tail, ex.topk_logprobs.astype(np.float64), ex.tail_mass.astype(np.float64)))
        kl["xtok_c"].append(_kl_cond(top, ex.topk_logprobs.astype(np.float64)))
        # NeMo-Aligner style JSONL: float32 logits, ids, lse per position
        f32 = top_logits.astype(np.float32)
        lse32 = lse.astype(np.float32)
        line = json.dumps({"topk_logits": f32.tolist(), "topk_token_ids": order.tolist(), "log_sum_exp": lse32.tolist()})
        nemo_bytes += len(line) + 1
        rec = f32.astype(np.float64) - lse32.astype(np.float64)[:, None]
        kl["nemo"].append(_kl_buckets(top, tail, rec, np.maximum(1 - np.exp(rec).sum(1), 1e-6)))
        # 0seba/logits style: fp16 logits + 18-bit ids + 24 samples (+ fp32 lse)
        f16 = top_logits.astype(np.float16).astype(np.float64)
        rec = f16 - lse32.astype(np.float64)[:, None]
        kl["0seba"].append(_kl_buckets(top, tail, rec, np.maximum(1 - np.exp(rec).sum(1), 1e-6)))
        kl["0seba_c"].append(_kl_cond(top, rec))
    seba_bpp = 2 * k + len(pack_ids(np.zeros(k, np.int64), 200000)) + len(pack_ids(np.zeros(24, np.int64), 200000)) + 4
    disk = sum(os.path.getsize(tmp_path / "s" / f) for f in st._files)
    payload = (k - 1) + len(pack_ids(np.zeros(k, np.int64), V)) + 4 + 2 + 2
    kls = {n: np.concatenate(v) for n, v in kl.items()}
    report(f"store_bytes k={k} [{name}, V={V}, {n_pos} positions]",
           xtok_disk_B_per_pos=disk / n_pos, xtok_raw_payload_B_per_pos=float(payload),
           nemo_jsonl_B_per_pos=nemo_bytes / n_pos, seba_B_per_pos=float(seba_bpp),
           ratio_vs_best_anchor=disk / n_pos / min(seba_bpp, nemo_bytes / n_pos),
           kl_xtok_mean=float(kls["xtok"].mean()), kl_xtok_max=float(kls["xtok"].max()),
           kl_nemo_mean=float(kls["nemo"].mean()), kl_0seba_mean=float(kls["0seba"].mean()),
           kl_0seba_max=float(kls["0seba"].max()), klcond_xtok_mean=float(kls["xtok_c"].mean()),
           klcond_0seba_mean=float(kls["0seba_c"].mean()))
    assert kls["xtok"].mean() < 1e-3


def test_extraction_overhead_vs_bare_forward(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from xtok.extract import ExtractConfig, _batches, extract
    from xtok.tokens import load_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    mdl = LlamaForCausalLM(cfg).eval()
    mdl.save_pretrained(tmp_path / "m")
    tok = load_tokenizer(MISTRAL_SPM)
    p = ASSETS / "corpora" / "tinyshakespeare.txt"
    if p.exists():
        src = p.read_text(encoding="utf-8")[:60000]
    else:
        import inspect, json as _j  # noqa: E401
        src = inspect.getsource(_j.decoder) * 6
    texts = [src[i: i + 700] for i in range(0, len(src) - 700, 700)][:32]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    budget = 4096
    ids = [np.concatenate([[tok.bos_id], tok.encode(t)]) for t in texts]
    lens = np.array([len(x) for x in ids])
    # bare forward: HF forward with full logits over the same length-sorted batches
    t_bare = []
    for rep in range(2):
        t0 = time.perf_counter()
        for b in _batches(lens, budget):
            T = lens[b].max()
            x = np.zeros((len(b), T), np.int64)
            a = np.zeros((len(b), T), np.int64)
            for r, i in enumerate(b):
                x[r, : lens[i]] = ids[i]
                a[r, : lens[i]] = 1
            with torch.inference_mode():
                mdl(input_ids=torch.as_tensor(x), attention_mask=torch.as_tensor(a)).logits.float()
        t_bare.append(time.perf_counter() - t0)
    t_ext = []
    for rep in range(2):
        res = extract(ExtractConfig(model=str(tmp_path / "m"), tokenizer=MISTRAL_SPM, dataset=str(tmp_path / "d.jsonl"),
                                    output=str(tmp_path / f"s{rep}"), top_k=32, token_budget=budget, progress=False,
                                    shard_size=64))
        t_ext.append(res["stats"]["seconds"])
    bare, ext = min(t_bare), min(t_ext)
    report(f"extract_overhead [CPU {torch.get_num_threads()} threads, llama h256 L4 V32k, {int(lens.sum())} tokens]",
           bare_forward_s=bare, extract_s=ext, overhead=ext / bare - 1, tokens_per_s=float(lens.sum() / ext))
