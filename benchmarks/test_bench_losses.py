"""Cross-tokenizer KL loss: fused (hidden + lm_head, chunked custom autograd) vs chunked (from logits)
vs naive (full fp32 log_softmax over [N, V]) at V = 32k / 128k, N = 8k positions: time of one
forward + backward and peak memory, ratios printed. Runs only with `pytest benchmarks/ --benchmark -s`.

Memory method (CPU, no allocator statistics in torch): every measurement runs in a fresh process
(a new process image: nothing of the pytest process's memory counts, see benchmarks/memory.py) that
builds its inputs, resets its RSS high-water mark to its current RSS (VmHWM via /proc/self/clear_refs),
runs forward + backward, and reports the high-water mark minus that RSS: the peak extra memory of the
loss computation on top of the inputs (hidden, W, targets; for the logits paths the logits themselves
are produced inside the measured region, as a model would). The figure is the same alone and inside a
full benchmark run (`ru_maxrss`, used before, carries the parent's peak into the child). Large tensors are mmap-backed by glibc,
so RSS follows live tensor bytes closely. Time: wall seconds and process CPU seconds (user + sys) of the
same region; on a shared machine the CPU seconds are the steadier figure. When the naive run would not fit in XTOK_BENCH_MAX_GB
(default 8 GiB; the machine is shared), it is measured at N/2 and N/4 positions and extrapolated
linearly to N (its memory is linear in N: all [N, V] tensors); the line then says `extrapolated`.
`XTOK_BENCH_MAX_GB=16` measures every path directly at V = 128k, N = 8k (the naive run peaks at
~12 GiB, the chunked one at ~8 GiB; run that alone on a 24 GiB machine). docs/losses.md has the figures.

`test_bench_kl_noncontiguous_logits`: the chunked path from a strided view (`logits[:, :-1]`) against
the same logits made contiguous, CPU seconds of forward + backward (a chunk must read only its rows;
`x.reshape(-1, V)` used to copy the whole view once per chunk, in forward and backward).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import pytest

H = 64    # hidden size: small, the loss is the subject, not the matmul
K = 32    # projected target ids per position
N = 8192  # positions (B=4 x T=2048), all with a target


def _inputs(V, n, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    B = 4
    T = n // B
    h = (torch.randn(B, T, H, generator=g) / H ** 0.5).requires_grad_(True)
    W = (torch.randn(V, H, generator=g)).requires_grad_(True)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(64)])  # reuse 64 id sets
    ids = ids[torch.randint(0, 64, (B * T,), generator=g)].view(B, T, K)
    p = torch.rand(B, T, K, generator=g) + 0.01
    r = torch.rand(B, T, generator=g) * 0.3
    p = p / p.sum(-1, keepdim=True) * (1 - r)[..., None]
    tb = {"positions": torch.arange(T).repeat(B, 1), "mask": torch.ones(B, T, dtype=torch.bool), "target_ids": ids,
          "target_probs": p, "tail_mass": r, "present": torch.ones(B, dtype=torch.bool)}
    return h, W, tb


def _naive(h, W, tb):
    """Full-vocab fp32 log_softmax, sparse targets + tail bucket (forward KL), mean over positions."""
    import torch

    logits = (h @ W.t()).float()
    lp = torch.log_softmax(logits, dim=-1)
    ls = lp.gather(-1, tb["target_ids"])
    q, r = tb["target_probs"], tb["tail_mass"]
    log_u = torch.log1p(-ls.exp().sum(-1).clamp(max=1 - 1e-7))
    d = torch.xlogy(q, q).sum(-1) - (q * ls).sum(-1) + torch.xlogy(r, r) - r * log_u
    return d.mean()


def _child(method, V, n):
    import torch

    torch.set_num_threads(int(os.environ.get("XTOK_BENCH_THREADS", "2")))
    from xtok.losses import CrossTokenizerKLLoss

    from benchmarks import memory

    h, W, tb = _inputs(V, n)
    loss_fn = CrossTokenizerKLLoss("forward")
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    before = memory.reset_peak()
    t0 = time.perf_counter()
    if method == "fused":
        loss = loss_fn((h, W), tb)
    elif method == "chunked":
        loss = loss_fn(h @ W.t(), tb)
    else:
        loss = _naive(h, W, tb)
    loss.backward()
    dt = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    peak = memory.peak_mib()
    gsum = float(W.grad.double().abs().sum())
    print(json.dumps({"method": method, "V": V, "n": n, "time_s": dt, "cpu_s": cpu, "peak_mib": peak - before,
                      "inputs_rss_mib": before, "memory_method": memory.METHOD, "loss": loss.item(),
                      "gW_abs_sum": gsum}))


def _measure(method, V, n):
    out = subprocess.run([sys.executable, __file__, method, str(V), str(n)], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n  run: {res}", flush=True)
    return res


@pytest.mark.parametrize("V", [32768, 131072])
def test_bench_kl_fused_vs_chunked_vs_naive(V):
    from benchmarks.conftest import met, report

    max_gib = float(os.environ.get("XTOK_BENCH_MAX_GB", "8"))
    naive_est_gib = 4 * N * V * 4 / 2 ** 30  # ~4 live fp32 [N, V] tensors at the peak
    fused = _measure("fused", V, N)
    chunked = _measure("chunked", V, N) if 2.5 * N * V * 4 / 2 ** 30 <= max_gib else None
    if naive_est_gib <= max_gib:
        naive, how = _measure("naive", V, N), "measured"
    else:
        a, b = _measure("naive", V, N // 4), _measure("naive", V, N // 2)
        slope = (b["peak_mib"] - a["peak_mib"]) / (N // 4)
        # time: 2x the N/2 run (linear in N); memory: the line through N/4 and N/2, at N
        naive = {"time_s": b["time_s"] * 2, "cpu_s": b["cpu_s"] * 2, "peak_mib": b["peak_mib"] + slope * (N // 2),
                 "loss": b["loss"],
                 "at_n": N // 2, "loss_at_n": b}
        how = f"extrapolated from N={N // 4} ({a['peak_mib']:.0f} MiB), N={N // 2} ({b['peak_mib']:.0f} MiB)"
        fused_half = _measure("fused", V, N // 2)
        if chunked is None:
            ch = _measure("chunked", V, N // 2)
            chunked = {"time_s": ch["time_s"], "cpu_s": ch["cpu_s"], "peak_mib": ch["peak_mib"], "loss": ch["loss"], "vs": b}
        naive["rel_loss_diff"] = abs(fused_half["loss"] - b["loss"]) / abs(b["loss"])
        naive["rel_gW_diff"] = abs(fused_half["gW_abs_sum"] - b["gW_abs_sum"]) / b["gW_abs_sum"]
    if "rel_loss_diff" not in naive:
        naive["rel_loss_diff"] = abs(fused["loss"] - naive["loss"]) / abs(naive["loss"])
        naive["rel_gW_diff"] = abs(fused["gW_abs_sum"] - naive["gW_abs_sum"]) / naive["gW_abs_sum"]
    fields = dict(V=V, N=N, fused_s=fused["time_s"], fused_peak_mib=fused["peak_mib"],
                  naive_s=naive["time_s"], naive_peak_mib=naive["peak_mib"],
                  mem_ratio_fused_over_naive=fused["peak_mib"] / naive["peak_mib"],
                  time_ratio_fused_over_naive=fused["time_s"] / naive["time_s"],
                  fused_cpu_s=fused["cpu_s"], naive_cpu_s=naive["cpu_s"],
                  cpu_ratio_fused_over_naive=fused["cpu_s"] / naive["cpu_s"],
                  rel_loss_diff=naive["rel_loss_diff"], rel_gradW_abs_sum_diff=naive["rel_gW_diff"], naive=how)
    if chunked is not None:
        ref = chunked.get("vs", naive)  # chunked at N/2 is compared with naive at N/2
        fields.update(chunked_at_n=N // 2 if "vs" in chunked else N, chunked_s=chunked["time_s"],
                      chunked_peak_mib=chunked["peak_mib"],
                      mem_ratio_chunked_over_naive=chunked["peak_mib"] / ref["peak_mib"],
                      time_ratio_chunked_over_naive=chunked["time_s"] / ref["time_s"],
                      cpu_ratio_chunked_over_naive=chunked["cpu_s"] / ref["cpu_s"],
                      rel_loss_diff_chunked=abs(chunked["loss"] - ref["loss"]) / abs(ref["loss"]))
    else:
        fields.update(chunked="skipped (logits + their grad exceed XTOK_BENCH_MAX_GB)")
    from benchmarks import memory

    fields.update(memory=fused.get("memory_method", "?"), pytest_process_peak_mib=memory.peak_mib(),
                  target=f"fused peak <= naive / 4: {met(fused['peak_mib'] <= naive['peak_mib'] / 4)}")
    report("losses.kl_fused_chunked_naive", **fields)
    assert fused["peak_mib"] <= naive["peak_mib"] / 4
    assert naive["rel_loss_diff"] < 1e-4


def test_bench_kl_noncontiguous_logits():
    import numpy as np
    import torch

    from benchmarks.conftest import met, report
    from xtok.losses import CrossTokenizerKLLoss

    torch.set_num_threads(int(os.environ.get("XTOK_BENCH_THREADS", "2")))
    V, B, T = 32768, 4, 1024  # 8 chunks of 512 rows
    g = torch.Generator().manual_seed(0)
    base = torch.randn(B, T + 1, V, generator=g)
    _, _, tb = _inputs(V, B * T)
    loss_fn = CrossTokenizerKLLoss("forward")
    runs = {"contiguous": [], "sliced": []}
    for kind in ("contiguous", "sliced") * 3:  # interleaved, median of three each
        if kind == "contiguous":
            x = base[:, :-1].contiguous().requires_grad_(True)
        else:  # a strided view of a leaf, as logits[:, :-1] of a model's output
            x = base.clone().requires_grad_(True)[:, :-1]
        c0 = time.process_time()
        loss = loss_fn(x, tb)
        c1 = time.process_time()
        (gx,) = torch.autograd.grad(loss, x)
        c2 = time.process_time()
        runs[kind].append({"cpu_s": c2 - c0, "fwd_cpu_s": c1 - c0, "bwd_cpu_s": c2 - c1, "loss": loss.item(),
                           "g": float(gx.double().abs().sum())})
        del x, gx, loss

    def med(kind):
        rs = runs[kind]
        out = {k: float(np.median([r[k] for r in rs])) for k in ("cpu_s", "fwd_cpu_s", "bwd_cpu_s")}
        out.update(loss=rs[0]["loss"], g=rs[0]["g"], cpu_min=min(r["cpu_s"] for r in rs),
                   cpu_max=max(r["cpu_s"] for r in rs), same=all(r["loss"] == rs[0]["loss"] and r["g"] == rs[0]["g"]
                                                                 for r in rs))
        return out

    c, s = med("contiguous"), med("sliced")
    report("losses.kl_noncontiguous_logits", V=V, rows=B * T, contiguous_cpu_s_median=c["cpu_s"],
           contiguous_cpu_s_min=c["cpu_min"], contiguous_cpu_s_max=c["cpu_max"], sliced_cpu_s_median=s["cpu_s"],
           sliced_cpu_s_min=s["cpu_min"], sliced_cpu_s_max=s["cpu_max"], sliced_fwd_cpu_s=s["fwd_cpu_s"],
           sliced_bwd_cpu_s=s["bwd_cpu_s"], contiguous_fwd_cpu_s=c["fwd_cpu_s"], contiguous_bwd_cpu_s=c["bwd_cpu_s"],
           cpu_ratio_sliced_over_contiguous=s["cpu_s"] / c["cpu_s"],
           target=f"sliced <= 1.5 x contiguous: {met(s['cpu_s'] <= 1.5 * c['cpu_s'])}")
    assert c["same"] and s["same"]
    assert s["loss"] == c["loss"] and s["g"] == c["g"]
    assert s["cpu_s"] <= 1.5 * c["cpu_s"]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `benchmarks` importable
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
