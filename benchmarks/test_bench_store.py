"""Teacher store benchmarks (run with `pytest benchmarks/test_bench_store.py --benchmark -s`).

1. Bytes per position and fidelity at equal k versus re-implemented reference encoders of the public
   anchors' layouts, on the outputs of two teachers:
   - stories260K (a real trained Llama, V = 512) on TinyStories text (needs ../shared/assets);
   - a random-init tiny Llama with the Tekken tokenizer (V = 131,072 > 65,536, so ids need more than 16
     bits), its output layer scaled x40 so that its distributions are LLM-like (mean top-1 p ~0.4,
     entropy ~2.7 nats, top-32 mass ~0.89), on tinyshakespeare (python source when assets are absent).
   Layouts (every one written the same way: one parquet row per example, zstd level 6 without
   dictionary, like the store's shards; "raw" = the bytes before compression):
   - xtok: the real store written by `extract` (payload columns only, so that all layouts hold the
     same per-position content; xtok's also carries the realised token's log-prob and the word-start
     mass, which the anchors lack; on-disk shard size with text, input ids and keys reported too);
   - NeMo-Aligner JSONL: per position k float32 logits, k ids and the float32 log-sum-exp, as JSON;
   - 0seba/logits (its dataset card): k logits as uint16 linear between per-position float32 min/max,
     k ids as 16 low bits + 2 high bits (uint16 when V <= 65,536: the same packing as xtok's, in the
     anchor's favour), float32 log-sum-exp; with 24 tail samples: 24 sampled ids (the very ids xtok
     drew, so that both hold the same ids) + their logits as uint16 with float32 min/max ("0seba")
     or without those logits ("0seba-ids", exactly xtok's content).
   Fidelity per position, float64, against the model's full softmax (dense reference):
   - KL_bucket = KL(exact || reconstructed) over the k + 1 buckets (top-k tokens + the tail as one
     bucket). xtok: top-k probabilities as the reader returns them, tail = stored tail_mass. Anchors:
     q_i = exp(logit_i - lse) from the stored values, tail = 1 - sum q_i (floored at 1e-12, then all
     renormalised). Sampled tail ids (either layout) estimate the tail's shape; they do not change the
     bucket masses, and a full-vocabulary KL of any of these layouts is infinite (unsampled tokens get
     0), so the bucket KL is the fidelity figure.
   - KL_cond = KL over the top-k only, both renormalised: the precision of the stored shape alone.
2. Extraction overhead (chunked top-k + store writing) versus the bare forward pass (HF forward with
   full logits) over the same batches, in CPU time (time.process_time, one thread), several repetitions.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.conftest import met, report
from xtok.testing.assets import ASSETS, MISTRAL_SPM, TEKKEN

TARGET_RATIO = 0.5   # issue 4: xtok <= half of the best anchor's bytes per position (equal k, equal content)


# ------------------------------------------------------------------------------------------
# teachers
# ------------------------------------------------------------------------------------------


def _texts_shakespeare(n_chars: int, chunk: int):
    p = ASSETS / "corpora" / "tinyshakespeare.txt"
    if p.exists():
        src = p.read_text(encoding="utf-8")[:n_chars]
    else:
        import inspect
        import json as _j

        src = (inspect.getsource(_j.decoder) * 4)[:n_chars]
    return [src[i: i + chunk] for i in range(0, len(src) - chunk + 1, chunk)]


def _teacher(name: str, tmp_path):
    """(model dir, tokenizer spec or None, texts, description)."""
    if name == "stories260K":
        m = ASSETS / "models" / "stories260K"
        c = ASSETS / "corpora" / "tinystories_sample.txt"
        if not (m.exists() and c.exists()):
            pytest.skip("stories260K / tinystories assets not present")
        texts = [t for t in c.read_text(encoding="utf-8").split("\n") if t.strip()]
        return m, None, texts, "stories260K (trained) / TinyStories"
    from transformers import LlamaConfig, LlamaForCausalLM

    from xtok.tokens import load_tokenizer

    V = load_tokenizer(TEKKEN).vocab_size
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    mdl = LlamaForCausalLM(cfg)
    with torch.no_grad():
        mdl.lm_head.weight.mul_(40.0)
    mdl.save_pretrained(tmp_path / "tekken-llama")
    return tmp_path / "tekken-llama", TEKKEN, _texts_shakespeare(6000, 300), "random Llama x40 / tinyshakespeare"


# ------------------------------------------------------------------------------------------
# layouts: byte counts with the same container and codec for all
# ------------------------------------------------------------------------------------------


def _parquet_bytes(rows: list[dict]) -> tuple[int, int]:
    """(raw, zstd) bytes of `rows` (dicts of bytes/str/int) written like a store shard: parquet, zstd 6,
    no dictionary, no statistics, ~2 MB row groups. raw = sum of the values' own sizes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    raw = 0
    for v in rows:
        for x in v.values():
            raw += len(x.encode("utf-8")) + 1 if isinstance(x, str) else (len(x) if isinstance(x, bytes) else 4)
    avg = max(1, table.nbytes // max(1, len(rows)))
    rg = int(max(1, min(len(rows), (1 << 21) // avg)))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", compression_level=6, row_group_size=rg, use_dictionary=False,
                   write_statistics=False)
    return raw, len(sink.getvalue())


_XTOK_PAYLOAD = ("n_positions", "position_runs", "topk_ids", "topk_codes", "n_kept", "tail_mass", "target_logprob",
                 "word_start_mass", "tail_ids", "tail_none")


def _xtok_rows(store) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for f in store._files:
        rows += pq.read_table(store.io.p(f), columns=list(_XTOK_PAYLOAD)).to_pylist()
    return rows


def _u16_minmax(x: np.ndarray):
    """0seba/logits quantisation: uint16 linear between the row's float32 min and max."""
    lo = x.min(1).astype(np.float32)
    hi = x.max(1).astype(np.float32)
    span = np.maximum(hi.astype(np.float64) - lo, 1e-30)
    q = np.rint((x - lo[:, None]) / span[:, None] * 65535).clip(0, 65535).astype("<u2")
    deq = q.astype(np.float64) / 65535 * span[:, None] + lo.astype(np.float64)[:, None]
    return q, lo, hi, deq


def _kl_bucket(p_top, p_tail, q_top, q_tail):
    p = np.concatenate([p_top, p_tail[:, None]], 1)
    q = np.concatenate([q_top, q_tail[:, None]], 1)
    t = np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))), 0.0)
    return t.sum(1)


def _kl_cond(p_top, q_top):
    a = p_top / p_top.sum(1, keepdims=True)
    b = q_top / q_top.sum(1, keepdims=True)
    t = np.where(a > 0, a * (np.log(np.maximum(a, 1e-300)) - np.log(np.maximum(b, 1e-300))), 0.0)
    return t.sum(1)


def _anchor_q(logits_stored, lse_stored):
    q = np.exp(logits_stored - lse_stored[:, None])
    tail = np.maximum(1.0 - q.sum(1), 1e-12)
    z = q.sum(1) + tail
    return q / z[:, None], tail / z


def _measure(store, model, V, k, m):
    """Per layout: raw and zstd bytes per position, KL_bucket and KL_cond per position."""
    from xtok.store import pack_ids

    kl = {n: ([], []) for n in ("xtok", "nemo", "0seba")}
    nemo_rows, seba_rows, seba_ids_rows = [], [], []
    n_pos, cover = 0, []
    for ex in store:
        with torch.no_grad():
            logits = model(torch.as_tensor(ex.input_ids, dtype=torch.long)[None]).logits[0, :, :V].double()
        logits = logits[torch.as_tensor(ex.positions, dtype=torch.long)]
        lse = torch.logsumexp(logits, -1)
        lp = (logits - lse[:, None])
        ids = torch.as_tensor(ex.topk_ids, dtype=torch.long)
        p_top = lp.gather(1, ids).exp()
        rest = lp.exp().scatter(1, ids, 0.0)
        p_tail = rest.sum(1).numpy()            # exact tail mass, summed directly (no 1 - sum cancellation)
        p_top = p_top.numpy()
        lg = logits.gather(1, ids).numpy()
        lse = lse.numpy()
        n_pos += lg.shape[0]
        cover.append(1 - p_tail)
        # xtok: what the reader returns
        q = np.exp(ex.topk_logprobs.astype(np.float64))
        kl["xtok"][0].append(_kl_bucket(p_top, p_tail, q, ex.tail_mass.astype(np.float64)))
        kl["xtok"][1].append(_kl_cond(p_top, q))
        # NeMo-Aligner JSONL
        f32, lse32 = lg.astype(np.float32), lse.astype(np.float32)
        nemo_rows.append({"line": json.dumps({"topk_logits": f32.tolist(), "topk_token_ids": ex.topk_ids.tolist(),
                                              "log_sum_exp": lse32.tolist()})})
        qn, tn = _anchor_q(f32.astype(np.float64), lse32.astype(np.float64))
        kl["nemo"][0].append(_kl_bucket(p_top, p_tail, qn, tn))
        kl["nemo"][1].append(_kl_cond(p_top, qn))
        # 0seba/logits
        qq, lo, hi, deq = _u16_minmax(lg)
        row = {"top_indices": pack_ids(ex.topk_ids, V), "top_logits_quantized": qq.tobytes(),
               "top_min": lo.astype("<f4").tobytes(), "top_max": hi.astype("<f4").tobytes(),
               "logsumexp": lse32.astype("<f4").tobytes()}
        qs, ts = _anchor_q(deq, lse32.astype(np.float64))
        kl["0seba"][0].append(_kl_bucket(p_top, p_tail, qs, ts))
        kl["0seba"][1].append(_kl_cond(p_top, qs))
        if m:
            tid = np.where(ex.tail_ids < 0, 0, ex.tail_ids).astype(np.int64)
            row_ids = dict(row, sampled_indices=pack_ids(tid, V))
            sl = logits.gather(1, torch.as_tensor(tid)).numpy()
            sq, slo, shi, _ = _u16_minmax(sl)
            seba_ids_rows.append(row_ids)
            seba_rows.append(dict(row_ids, sampled_logits_quantized=sq.tobytes(),
                                  sampled_min=slo.astype("<f4").tobytes(), sampled_max=shi.astype("<f4").tobytes()))
        else:
            seba_rows.append(row)
    out = {}
    xrows = _xtok_rows(store)
    out["xtok"] = _parquet_bytes(xrows)
    # the same content as the anchors hold: without the realised token's log-prob and the word-start mass
    out["xtok-same"] = _parquet_bytes([{c: v for c, v in r.items() if c not in ("target_logprob", "word_start_mass")}
                                       for r in xrows])
    if not m:
        out["nemo"] = _parquet_bytes(nemo_rows)
        out["0seba"] = _parquet_bytes(seba_rows)
    else:
        out["0seba"] = _parquet_bytes(seba_rows)
        out["0seba-ids"] = _parquet_bytes(seba_ids_rows)
    kls = {n: (np.concatenate(a), np.concatenate(b)) for n, (a, b) in kl.items()}
    disk = sum(os.path.getsize(store.io.p(f)) for f in store._files)
    return n_pos, out, kls, disk, float(np.concatenate(cover).mean())


# ------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher", ["stories260K", "tekken131k"])
def test_bytes_and_fidelity_vs_anchors(tmp_path, teacher):
    from transformers import AutoModelForCausalLM

    from xtok.extract import ExtractConfig, extract
    from xtok.store import TeacherStore
    from xtok.tokens import load_tokenizer

    mdir, tok_spec, texts, desc = _teacher(teacher, tmp_path)
    ds = tmp_path / "d.jsonl"
    ds.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    V = load_tokenizer(tok_spec or str(mdir)).vocab_size
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    lines, results = [], []
    for k in (8, 32):
        for m in (0, 24):
            out = tmp_path / f"s{k}-{m}"
            extract(ExtractConfig(model=str(mdir), tokenizer=tok_spec, dataset=str(ds), output=str(out), top_k=k,
                                  sample_tail=m, progress=False))
            st = TeacherStore(out)
            n_pos, sizes, kls, disk, cover = _measure(st, model, V, k, m)
            anchors = {n: v for n, v in sizes.items() if not n.startswith("xtok")}
            best = min(anchors, key=lambda n: anchors[n][1])
            ratio_z = sizes["xtok-same"][1] / anchors[best][1]
            ratio_raw = sizes["xtok-same"][0] / min(v[0] for v in anchors.values())
            fid_anchor = "nemo" if best == "nemo" else "0seba"
            res = dict(k=k, m=m, n_pos=n_pos, best=best, ratio_zstd=ratio_z, ratio_raw=ratio_raw,
                       ratio_zstd_all_columns=sizes["xtok"][1] / anchors[best][1],
                       ratio_zstd_vs_nemo=sizes["xtok"][1] / anchors["nemo"][1] if "nemo" in anchors else None,
                       kl_bucket_xtok=float(kls["xtok"][0].mean()), kl_bucket_best=float(kls[fid_anchor][0].mean()),
                       kl_cond_xtok=float(kls["xtok"][1].mean()), kl_cond_best=float(kls[fid_anchor][1].mean()))
            results.append(res)
            lines.append(f"k={k:<3} m={m:<3} top-k mass {cover:.3f}, {n_pos} positions; xtok on disk (with text, "
                         f"ids, keys) {disk / n_pos:.1f} B/pos")
            for name, (raw, z) in sizes.items():
                kn = "0seba" if name.startswith("0seba") else "xtok" if name.startswith("xtok") else name
                b, c = kls[kn]
                lines.append(f"    {name:<10} raw {raw / n_pos:7.1f} B/pos  zstd {z / n_pos:7.1f} B/pos   "
                             f"KL_bucket mean {b.mean():.2e} max {b.max():.2e}   KL_cond mean {c.mean():.2e} "
                             f"max {c.max():.2e}")
            lines.append(f"    xtok-same / best anchor ({best}): zstd {ratio_z:.2f}, raw {ratio_raw:.2f} "
                         f"(target <= {TARGET_RATIO}: {'met' if ratio_z <= TARGET_RATIO else 'MISSED'}); fidelity vs "
                         f"{fid_anchor}: KL_bucket x{res['kl_bucket_xtok'] / max(res['kl_bucket_best'], 1e-300):.3g}, "
                         f"KL_cond x{res['kl_cond_xtok'] / max(res['kl_cond_best'], 1e-300):.3g} "
                         f"({'met' if res['kl_bucket_xtok'] <= res['kl_bucket_best'] else 'MISSED'})")
            # the store's own documented bound holds regardless of the comparison
            assert kls["xtok"][0].max() < 2e-3
    print(f"\n[xtok-bench] store bytes and fidelity, {desc}, V={V}:\n" + "\n".join(lines), flush=True)
    for r in results:
        report(f"store_vs_anchors {teacher} k={r['k']} m={r['m']}",
               **{k: v for k, v in r.items() if k not in ("k", "m") and v is not None})
    # What holds (docs/formats.md, "Bytes per position"), asserted: xtok (all its columns) <= half of the
    # NeMo-Aligner layout, zstd against zstd; xtok's KL_bucket within its documented figures.
    # What does NOT hold, reported above and in docs/formats.md, not asserted: <= half of the 0seba/logits
    # layout (measured 0.51-0.86 at the same content), and "at equal or better fidelity" against either
    # anchor (their logits are float32 / uint16; xtok's log-probs are uint8, as the issue's <= 1 byte per
    # entry asks). The last assert guards the measured 0seba ratio against regressions only.
    for r in results:
        if r["ratio_zstd_vs_nemo"] is not None:
            assert r["ratio_zstd_vs_nemo"] <= TARGET_RATIO, r
        assert r["kl_bucket_xtok"] < 6e-5, r
        assert r["ratio_zstd"] <= 0.9, r


# ------------------------------------------------------------------------------------------
# extraction overhead
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden,layers,n_texts", [(256, 4, 48), (1024, 4, 12)], ids=["h256", "h1024"])
def test_extraction_overhead_vs_bare_forward(tmp_path, hidden, layers, n_texts):
    """CPU time (process_time, one thread) of the extraction loop versus a bare HF forward with full
    logits over the same length-sorted batches. The loop's CPU time = extract() on a fresh output minus
    extract() re-run on the finished store (a no-op that pays the same set-up: dataset, tokenizer,
    model loading, model hash, merge)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from xtok.extract import ExtractConfig, extract, length_batches
    from xtok.tokens import load_tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      tie_word_embeddings=False)
    mdl = LlamaForCausalLM(cfg).eval()
    mdl.save_pretrained(tmp_path / "m")
    tok = load_tokenizer(MISTRAL_SPM)
    texts = _texts_shakespeare(60000, 700)[:n_texts]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    budget = 4096
    ids = [np.concatenate([[tok.bos_id], tok.encode(t)]) for t in texts]
    lens = np.array([len(x) for x in ids])

    def bare():
        t0 = time.process_time()
        for b in length_batches(lens, budget):
            T = lens[b].max()
            x = np.zeros((len(b), T), np.int64)
            a = np.zeros((len(b), T), np.int64)
            for r, i in enumerate(b):
                x[r, : lens[i]] = ids[i]
                a[r, : lens[i]] = 1
            with torch.inference_mode():
                mdl(input_ids=torch.as_tensor(x), attention_mask=torch.as_tensor(a)).logits.float()
        return time.process_time() - t0

    def ext(out):
        c = ExtractConfig(model=str(tmp_path / "m"), tokenizer=MISTRAL_SPM, dataset=str(tmp_path / "d.jsonl"),
                          output=str(out), top_k=32, token_budget=budget, progress=False, shard_size=64)
        t0 = time.process_time()
        extract(c)
        return time.process_time() - t0

    bare(), ext(tmp_path / "warm")  # warm-up: first-call imports, caches, numba compilation
    reps = 3
    t_bare, t_ext, t_setup = [], [], []
    for rep in range(reps):  # interleaved, so that a load change on the machine hits all three alike
        t_bare.append(bare())
        t_ext.append(ext(tmp_path / f"s{rep}"))
        t_setup.append(ext(tmp_path / f"s{rep}"))   # no-op re-run: set-up + merge only
    loop = np.array(t_ext) - np.array(t_setup)
    over = loop / np.array(t_bare) - 1
    report(f"extract_overhead [CPU time, 1 thread, llama h{hidden} L{layers} V32k, {int(lens.sum())} tokens, {reps} reps]",
           bare_forward_cpu_s=float(np.median(t_bare)), extract_loop_cpu_s=float(np.median(loop)),
           setup_cpu_s=float(np.median(t_setup)), overhead_median=float(np.median(over)),
           overhead_min=float(over.min()), overhead_max=float(over.max()),
           tokens_per_cpu_s=float(lens.sum() / np.median(loop)),
           target=f"overhead <= 10 %: {met(float(np.median(over)) <= 0.10)}",
           asserted="<= 10 %" if hidden >= 1024 else "<= 50 % (regression guard; see below)")
    # The target is <= 10 %. With a 256-wide body the output matmul is small next to the
    # per-vocabulary-entry passes (top-k, exp, sums) that a bare forward does not do, and the CPU figure
    # is 13-30 % (docs/formats.md): guarded against regressions only. With a 1024-wide body (still far
    # narrower than real teachers, where the body hides those passes further) it is met: asserted.
    if hidden >= 1024:
        assert np.median(over) <= 0.10, f"overhead {np.median(over):.1%} (rerun on a quiet machine if loaded)"
    else:
        assert np.median(over) <= 0.5, over


# ------------------------------------------------------------------------------------------
# real pretrained teachers (issue 11): SmolLM2-135M and Gemma-3-270M (GGUF)
# ------------------------------------------------------------------------------------------

KL_FIDELITY = 1e-4   # issue 11: mean KL_bucket per position that does not change training


def _real_texts():
    sp = ASSETS / "corpora" / "tinyshakespeare.txt"
    qa = ASSETS / "corpora" / "gsm8k_test.jsonl"
    if not (sp.exists() and qa.exists()):
        pytest.skip("tinyshakespeare / gsm8k assets not present")
    src = sp.read_text(encoding="utf-8")[500_000:506_000]          # not the start the quality benchmark uses
    texts = [src[i: i + 300] for i in range(0, len(src), 300)]
    with open(qa, encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(1000))][-8:]
    return texts + [r["question"] + "\n" + r["answer"] for r in rows]


def _rows_at_k(top_ids, top_logits, lse, V, k):
    """NeMo JSONL and 0seba rows of one example from its dense top-K (K >= k) ids/logits."""
    from xtok.store import pack_ids

    ids, lg = top_ids[:, :k], top_logits[:, :k]
    f32, lse32 = lg.astype(np.float32), lse.astype(np.float32)
    nemo = {"line": json.dumps({"topk_logits": f32.tolist(), "topk_token_ids": ids.tolist(),
                                "log_sum_exp": lse32.tolist()})}
    qq, lo, hi, deq = _u16_minmax(lg)
    seba = {"top_indices": pack_ids(ids, V), "top_logits_quantized": qq.tobytes(),
            "top_min": lo.astype("<f4").tobytes(), "top_max": hi.astype("<f4").tobytes(),
            "logsumexp": lse32.astype("<f4").tobytes()}
    return nemo, seba, deq


@pytest.mark.parametrize("teacher", ["smollm2", "gemma3"])
def test_bytes_and_fidelity_real_teachers(tmp_path, teacher):
    """docs/formats.md, "Real teachers": the anchors table on SmolLM2-135M / Gemma-3-270M outputs, and
    the targets of issue 11: (a) at equal k, with xtok's mean KL_bucket <= 1e-4 nats, xtok-same <= 0.5x
    the best anchor's zstd bytes/position; (b) with --top-p, xtok's bytes against the anchors' at the
    smallest fixed k whose mean top-k mass reaches xtok's mean stored mass (equal mean stored mass)."""
    from benchmarks.quality.real_prepare import find_teacher
    from xtok.extract import ExtractConfig, extract, load_teacher
    from xtok.store import pack_ids, TeacherStore
    from xtok.tokens import load_tokenizer

    path, why = find_teacher(teacher)
    if path is None:
        pytest.skip(f"teacher {teacher}: {why}")
    texts = _real_texts()
    ds = tmp_path / "d.jsonl"
    ds.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = load_tokenizer(path)
    V = tok.vocab_size
    configs = [dict(k=8), dict(k=32), dict(k=8, m=24), dict(k=32, m=24), dict(k=64, p=0.9), dict(k=64, p=0.95)]
    stores = {}
    for c in configs:
        name = f"k{c['k']}" + (f"-m{c['m']}" if c.get("m") else "") + (f"-p{c['p']}" if c.get("p") else "")
        extract(ExtractConfig(model=path, dataset=str(ds), output=str(tmp_path / name), top_k=c["k"],
                              sample_tail=c.get("m", 0), top_p=c.get("p"), dtype="float32", device="cpu",
                              progress=False))
        stores[name] = (c, TeacherStore(tmp_path / name))
    model, _, _ = load_teacher(path, dtype="float32", device="cpu")
    KMAX = 64
    kl = {n: ([], []) for n in stores}
    kl_anchor = {}
    rows = {n: {"nemo": [], "0seba": [], "0seba-ids": []} for n in stores}
    dense_top, dense_lse, n_pos = [], [], 0
    first = next(iter(stores.values()))[1]
    for key in first.keys():
        ex0 = first[key]
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ex0.input_ids, dtype=torch.long)[None]).logits[0, :, :V].double()
        logits = logits[torch.as_tensor(ex0.positions, dtype=torch.long)]
        lse = torch.logsumexp(logits, -1)
        lp = logits - lse[:, None]
        tv, ti = logits.topk(KMAX, dim=-1)
        dense_top.append((ti.numpy(), tv.numpy()))
        dense_lse.append(lse.numpy())
        n_pos += logits.shape[0]
        for n, (c, st) in stores.items():
            ex = st[key]
            ids = torch.as_tensor(np.where(ex.topk_ids < 0, 0, ex.topk_ids), dtype=torch.long)
            kept = torch.as_tensor(ex.topk_ids >= 0)
            p_top = torch.where(kept, lp.gather(1, ids).exp(), 0.0)
            # exact tail, summed directly over the ids not kept (no 1 - sum cancellation); a dropped
            # entry points at the row's top-1 id, which is always kept
            p_tail = lp.exp().scatter(1, torch.where(kept, ids, ids[:, :1]), 0.0).sum(1).numpy()
            q = np.where(ex.topk_ids >= 0, np.exp(ex.topk_logprobs.astype(np.float64)), 0.0)
            kl[n][0].append(_kl_bucket(p_top.numpy(), p_tail, q, ex.tail_mass.astype(np.float64)))
            kl[n][1].append(_kl_cond(np.maximum(p_top.numpy(), 1e-300), np.maximum(q, 1e-300)))
            if c.get("p"):
                continue
            lg = logits.gather(1, ids).numpy()
            nemo, seba, deq = _rows_at_k(ex.topk_ids, lg, lse.numpy(), V, c["k"])
            if not c.get("m"):
                rows[n]["nemo"].append(nemo)
                rows[n]["0seba"].append(seba)
                qs, ts = _anchor_q(deq, lse.numpy().astype(np.float32).astype(np.float64))
                kl_anchor.setdefault(n, []).append(_kl_bucket(p_top.numpy(), p_tail, qs, ts))
            else:
                tid = np.where(ex.tail_ids < 0, 0, ex.tail_ids).astype(np.int64)
                ids_row = dict(seba, sampled_indices=pack_ids(tid, V))
                sl = logits.gather(1, torch.as_tensor(tid)).numpy()
                sq, slo, shi, _ = _u16_minmax(sl)
                rows[n]["0seba-ids"].append(ids_row)
                rows[n]["0seba"].append(dict(ids_row, sampled_logits_quantized=sq.tobytes(),
                                             sampled_min=slo.astype("<f4").tobytes(),
                                             sampled_max=shi.astype("<f4").tobytes()))
    # mean top-k mass of the dense distribution at every k <= KMAX (for equal-mass comparisons)
    top_mass = np.concatenate([np.cumsum(np.exp(tv - l[:, None]), 1) for (ti, tv), l in zip(dense_top, dense_lse)])
    mean_mass_at = top_mass.mean(0)          # [KMAX]: mean mass of the top-(j+1)
    lines, results = [], []
    for n, (c, st) in stores.items():
        xrows = _xtok_rows(st)
        xs = _parquet_bytes(xrows)
        xsame = _parquet_bytes([{cc: v for cc, v in r.items() if cc not in ("target_logprob", "word_start_mass")}
                                for r in xrows])
        b_kl = np.concatenate(kl[n][0])
        stored_mass = float(np.mean(np.concatenate([1 - st[k].tail_mass.astype(np.float64) for k in st.keys()])))
        if c.get("p"):
            k_eq = int(np.searchsorted(mean_mass_at, stored_mass) + 1)   # smallest fixed k reaching that mass
            k_eq = min(k_eq, KMAX)
            nemo_rows, seba_rows = [], []
            for (ti, tv), l in zip(dense_top, dense_lse):
                a, b, _ = _rows_at_k(ti, tv, l, V, k_eq)
                nemo_rows.append(a); seba_rows.append(b)
            anchors = {"nemo": _parquet_bytes(nemo_rows), "0seba": _parquet_bytes(seba_rows)}
            n_kept = np.concatenate([np.asarray((st[k].topk_ids >= 0).sum(1)) for k in st.keys()])
            extra = f"mean kept {n_kept.mean():.1f} of {c['k']}; equal-mass anchor k = {k_eq} (mean top-{k_eq} mass " \
                    f"{mean_mass_at[k_eq - 1]:.4f})"
        else:
            anchors = {a: _parquet_bytes(r) for a, r in rows[n].items() if r}
            k_eq, extra = c["k"], ""
        best = min(anchors, key=lambda a: anchors[a][1])
        ratio = xsame[1] / anchors[best][1]
        res = dict(store=n, k=c["k"], m=c.get("m", 0), top_p=c.get("p"), k_anchor=k_eq, n_pos=n_pos,
                   xtok_zstd=xs[1] / n_pos, xtok_same_zstd=xsame[1] / n_pos, xtok_same_raw=xsame[0] / n_pos,
                   best_anchor=best, best_anchor_zstd=anchors[best][1] / n_pos,
                   nemo_zstd=anchors["nemo"][1] / n_pos if "nemo" in anchors else None,
                   ratio_zstd=ratio, kl_bucket_mean=float(b_kl.mean()), kl_bucket_max=float(b_kl.max()),
                   kl_bucket_0seba=float(np.concatenate(kl_anchor[n]).mean()) if n in kl_anchor else None,
                   stored_mass=stored_mass,
                   met=bool(ratio <= TARGET_RATIO and b_kl.mean() <= KL_FIDELITY))
        results.append(res)
        lines.append(f"{n:<12} xtok {xs[1] / n_pos:6.1f} B/pos, xtok-same {xsame[1] / n_pos:6.1f} (raw "
                     f"{xsame[0] / n_pos:6.1f}); " + ", ".join(f"{a} {v[1] / n_pos:6.1f}" for a, v in anchors.items())
                     + f"; ratio to {best} {ratio:.2f}; KL_bucket mean {b_kl.mean():.1e} max {b_kl.max():.1e}; "
                     f"stored mass {stored_mass:.4f} {extra} -> target {'met' if res['met'] else 'MISSED'}")
        assert b_kl.mean() < KL_FIDELITY and b_kl.max() < 2e-3, res
    print(f"\n[xtok-bench] store bytes and fidelity, {teacher} ({Path(path).name}, V={V}), {n_pos} positions:\n"
          + "\n".join(lines), flush=True)
    md = []   # the rows of docs/formats.md's "Real teachers" table
    for r in results:
        setting = f"{r['k']}" + (f", top-p {r['top_p']}" if r["top_p"] else "") + (f", m = {r['m']}" if r["m"] else "")
        anchor = f"{r['best_anchor']} at k = {r['k_anchor']}" if r["top_p"] else r["best_anchor"]
        md.append(f"| {teacher} | {setting} | {r['stored_mass']:.3f} | {r['xtok_zstd']:.1f} | {r['xtok_same_zstd']:.1f} "
                  f"({r['xtok_same_raw']:.1f}) | {anchor}: {r['best_anchor_zstd']:.1f} | "
                  + (f"{r['nemo_zstd']:.1f}" if r["nemo_zstd"] else "") + f" | {r['ratio_zstd']:.2f} | "
                  f"{r['kl_bucket_mean']:.1e} | " + (f"{r['kl_bucket_0seba']:.1e}" if r["kl_bucket_0seba"] else "")
                  + f" | {'met' if r['met'] else 'missed'} |")
    print("\n".join(md), flush=True)
    out = os.environ.get("XTOK_BENCH_JSON")
    if out:   # collect the rows for docs/formats.md
        with open(out, "a") as f:
            f.write(json.dumps({"teacher": teacher, "file": Path(path).name, "V": V, "rows": results}) + "\n")
    for r in results:
        report(f"store_real_teacher {teacher} {r['store']}", **{k: v for k, v in r.items()
                                                              if isinstance(v, (int, float)) and v is not None})
