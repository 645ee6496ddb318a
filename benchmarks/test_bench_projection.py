"""Projection benchmarks (run with `pytest benchmarks/test_bench_projection.py --benchmark -s`).

- full-vocab build for the largest pair available (Tekken 131k -> Qwen3 151k, else -> Llama-3 128k):
  wall time and peak RSS of a fresh process (target < 60 s, < 4 GB), vs a naive per-token Python
  builder (dict lookup + one student encode call per token) timed on a vocab slice and extrapolated;
- `ProjectionMatrix.project` throughput on a collator-sized batch (CPU time of this process);
- the "Real pairs" table of docs/projection.md, regenerated (`test_bench_real_pairs_table` prints it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks.conftest import report
from xtok.testing.assets import ASSETS, MISTRAL_SPM, TEKKEN

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from projection_tools.build import build_projection
from xtok.tokens import load_tokenizer
T, S = load_tokenizer(sys.argv[1]), load_tokenizer(sys.argv[2])
t1 = time.perf_counter()
W = build_projection(T, S, progress=False)
t2 = time.perf_counter()
W.save(sys.argv[3])
t3 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "build_s": t2 - t1, "save_s": t3 - t2, "total_s": t3 - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "stats": W.stats}))
"""


def _pairs():
    """(teacher, student) pairs >= 128k x >= 128k available here: Tekken -> Qwen3/Llama-3 (the first
    found), and the largest one, Gemma-3 262k -> Qwen3 151k."""
    tk = ASSETS / "tokenizers"
    out = []
    for name in ("qwen3", "llama3"):
        if (tk / name).exists():
            out.append((TEKKEN, str(tk / name)))
            break
    if (tk / "gemma3").exists() and (tk / "qwen3").exists():
        out.append((str(tk / "gemma3"), str(tk / "qwen3")))
    return out


_PAIRS = _pairs()


def naive_build(T, S, teacher_ids):
    """Per-token Python: dict of student bytes, one student encode call per non-exact token."""
    sb = S.token_bytes
    d = {}
    for i in range(S.vocab_size):
        if not sb.is_special[i]:
            d.setdefault(sb.get(i), i)
    rows = {}
    pre = (b" " if S.prefix_space else b"") + b"\n"
    for t in teacher_ids:
        b = T.token_bytes.get(t)
        if b in d:
            rows[t] = d[b]
            continue
        try:
            ids = [int(x) for x in S.encode("\n" + b.decode("utf-8"), parse_special=False)]
        except UnicodeDecodeError:
            continue
        acc, j = b"", 0
        while j < len(ids) and len(acc) < len(pre):
            acc += sb.get(ids[j])
            j += 1
        if j < len(ids):
            rows[t] = ids[j]
    return rows


@pytest.mark.parametrize("pair", _PAIRS or [None], ids=lambda p: "none" if p is None else
                         f"{os.path.basename(p[0])}->{os.path.basename(p[1])}")
def test_bench_full_vocab_build(tmp_path, pair):
    if pair is None:
        pytest.skip("no >=128k student tokenizer in ../shared/assets (qwen3/llama3)")
    out = tmp_path / "w.safetensors"
    # warm the numba cache once so the timed run measures the build, not compilation
    subprocess.run([sys.executable, "-c", _CHILD, TEKKEN, "mistral-common:tokenizer.model.v1", str(tmp_path / "x")],
                   check=True, capture_output=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _CHILD, pair[0], pair[1], str(out)], check=True, capture_output=True,
                         text=True)
    wall = time.perf_counter() - t0
    r = json.loads(res.stdout.strip().splitlines()[-1])
    st = r["stats"]

    from xtok.tokens import load_tokenizer

    T, S = load_tokenizer(pair[0]), load_tokenizer(pair[1])
    rng = np.random.default_rng(0)
    sl = rng.choice(np.nonzero(~T.token_bytes.is_special)[0], 3000, replace=False).tolist()
    t1 = time.perf_counter()
    naive_build(T, S, sl)
    naive_slice = time.perf_counter() - t1
    naive_full = naive_slice * st["teacher_text_tokens"] / len(sl)
    report("projection_build", teacher=os.path.basename(pair[0]), student=os.path.basename(pair[1]),
           V_t=st["teacher_vocab"], V_s=st["student_vocab"], process_wall_s=wall, load_s=r["load_s"],
           build_s=r["build_s"], save_s=r["save_s"], peak_rss_mb=r["peak_rss_mb"], exact_pct=st["exact_pct"],
           multi_pct=st["multi_token_pct"], nnz=st["nnz"], file_mb=out.stat().st_size / 2**20,
           naive_slice_tokens=len(sl), naive_slice_s=naive_slice, naive_full_est_s=naive_full,
           speedup_vs_naive=naive_full / r["build_s"])
    assert wall < 60 and r["peak_rss_mb"] < 4096


def _timed(fn, n):
    """(CPU s per call of this process, wall s per call) over n calls."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return (time.process_time() - c0) / n, (time.perf_counter() - w0) / n


def test_bench_project():
    from projection_tools.build import build_projection
    from projection_tools.cut import cut_arrays
    from xtok.projection import ProjectionMatrix

    W = build_projection(TEKKEN, MISTRAL_SPM, progress=False)
    rng = np.random.default_rng(0)
    P, k = 4096, 20
    ids = rng.integers(0, W.shape[0], size=(P, k))
    probs = rng.dirichlet(np.ones(k), size=P).astype(np.float32)
    W.project(ids, probs)  # kernel loaded from the Numba cache (or compiled) outside the timing
    n = 30
    cpu1, wall1 = _timed(lambda: W.project(ids, probs), n)
    # a multi-entry W (4 per row)
    V_t, V_s = W.shape
    r = np.repeat(np.arange(V_t), 4)
    c = rng.integers(0, V_s, r.size)
    v = rng.random(r.size).astype(np.float32)
    W4 = ProjectionMatrix.from_coo(*cut_arrays(r, c, v, V_t), (V_t, V_s))
    W4.project(ids, probs)
    cpu4, wall4 = _timed(lambda: W4.project(ids, probs), n)
    # naive reference: python dict accumulation per position, on 256 positions
    rows = {}
    rr, cc, vv = W.coo_arrays()
    for a, b, x in zip(rr.tolist(), cc.tolist(), vv.tolist()):
        rows.setdefault(a, []).append((b, x))

    def naive():
        for pid, pp in zip(ids[:256].tolist(), probs[:256].tolist()):
            acc = {}
            for t, p in zip(pid, pp):
                for s_, w in rows.get(t, ()):
                    acc[s_] = acc.get(s_, 0.0) + w * p
            sorted(acc.items(), key=lambda kv: -kv[1])

    cpu_naive = _timed(naive, 1)[0] * P / 256
    report("projection_project", P=P, k=k, cpu_ms_first_token=cpu1 * 1e3, wall_ms_first_token=wall1 * 1e3,
           cpu_ms_4_per_row=cpu4 * 1e3, wall_ms_4_per_row=wall4 * 1e3, naive_python_cpu_ms=cpu_naive * 1e3,
           speedup_vs_naive=cpu_naive / cpu1, load1=os.getloadavg()[0])


# docs/projection.md "Real pairs": (teacher label, teacher spec, student label, student spec); bare names
# are folders under ../shared/assets/tokenizers
REAL_PAIRS = [
    ("Mistral SPM v1", MISTRAL_SPM, "Tekken", TEKKEN),
    ("Tekken", TEKKEN, "Mistral SPM v1", MISTRAL_SPM),
    ("Tekken", TEKKEN, "Qwen3", "qwen3"),
    ("Tekken", TEKKEN, "Llama-3", "llama3"),
    ("Llama-3", "llama3", "Qwen3", "qwen3"),
    ("Qwen3", "qwen3", "Llama-3", "llama3"),
    ("Qwen3", "qwen3", "Llama-2 (HF)", "llama2"),
    ("GPT-2", "gpt2", "Llama-2 (HF)", "llama2"),
    ("Llama-3", "llama3", "Mistral (HF)", "mistral"),
    ("DeepSeek-V4", "deepseek-v4", "Qwen3", "qwen3"),
    ("Gemma-3", "gemma3", "Qwen3", "qwen3"),
    ("Qwen3", "qwen3", "Gemma-3", "gemma3"),
    ("Llama-3", "llama3", "BERT-MiniLM (uncased)", "bert-minilm"),
]
_BEYOND = ("prefix_a", "plain", "bytes_greedy", "unverified", "unk")


def _spec(name):
    return name if ":" in name else str(ASSETS / "tokenizers" / name)


def real_pairs_table(pairs=REAL_PAIRS, progress=print):
    """Build every available pair; return the markdown rows of docs/projection.md's "Real pairs" table."""
    from projection_tools.build import build_projection
    from xtok.tokens import load_tokenizer

    rows = ["| teacher → student | V_t × V_s | exact | multi-token | mean dec. len | tiers beyond "
            "`prefix_newline` | specials unmapped | build CPU (wall) |",
            "|---|---|---|---|---|---|---|---|"]
    warm = False
    for tl, ts, sl, ss in pairs:
        if any(":" not in x and not (ASSETS / "tokenizers" / x).exists() for x in (ts, ss)):
            progress(f"skipped {tl} -> {sl}: tokenizer not in {ASSETS}")
            continue
        T, S = load_tokenizer(_spec(ts)), load_tokenizer(_spec(ss))
        if not warm:  # the Numba kernels are loaded from their cache once, outside the timing
            build_projection(T, S, progress=False)
            warm = True
        c0, w0 = time.process_time(), time.perf_counter()
        W = build_projection(T, S, progress=False)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        st = W.stats
        beyond = ", ".join(f"{k} {st['tiers'][k]:,}" for k in _BEYOND if st["tiers"].get(k)) or "–"
        row = (f"| {tl} → {sl} | {st['teacher_vocab']:,} × {st['student_vocab']:,} | {st['exact_pct']:.2f}% | "
               f"{st['multi_token_pct']:.2f}% | {st['mean_decomposition_len']:.2f} | {beyond} | "
               f"{st['special_unmapped']:,} | {cpu:.1f} s ({wall:.1f} s) |")
        rows.append(row)
        progress(row)
    return rows


def test_bench_real_pairs_table():
    """Regenerates docs/projection.md's "Real pairs" table (paste the printed block)."""
    rows = real_pairs_table(progress=lambda r: print(r, flush=True))
    print("\n[xtok-bench] real_pairs_table (load1 %.1f):\n%s" % (os.getloadavg()[0], "\n".join(rows)), flush=True)
    assert len(rows) > 2 + 1  # at least the two mistral-common pairs (always available)
