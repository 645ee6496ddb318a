"""Aligner speed: exact path tokens/s, and the DP path vs the pure-Python reference DP.

Run: `pytest benchmarks/test_bench_align.py --benchmark -q -s`. Numba runs single-threaded (one core).
The pure-Python reference (tests/test_align.py::ref_gotoh) is O(n*m); at 2k/8k tokens a full run
would take minutes to hours, so it is timed on its first R rows (each row costs the same m cells)
and scaled by n/R; the line says so (`ref_rows`).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from benchmarks.conftest import report

from xtok.align import align, align_arrays, byte_match, dp_match
from xtok.tokens import load_tokenizer


def _corpus() -> str:
    from conftest import ASSETS  # tests/conftest.py (benchmarks/conftest.py puts tests/ on sys.path)

    p = ASSETS / "corpora" / "tinyshakespeare.txt"
    if p.exists():
        return p.read_text(encoding="utf-8")
    import inspect, json, textwrap  # noqa: E401
    return (inspect.getsource(json.decoder) + inspect.getsource(textwrap) + inspect.getsource(inspect)) * 3


def _perturb(text: str, seed: int = 0) -> str:
    """Template-like and normalisation-like differences: tags between lines, case, CRLF."""
    rng = np.random.default_rng(seed)
    lines = text.split("\n")
    out = []
    for ln in lines:
        r = rng.random()
        if r < 0.1:
            out.append("<|turn|>user\n" + ln)
        elif r < 0.2:
            out.append(ln.upper())
        else:
            out.append(ln)
    return "\r\n".join(out)


def _best(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.fixture(scope="module")
def toks():
    return load_tokenizer("mistral-common:tokenizer.model.v1"), load_tokenizer("mistral-common:tekken_240911.json")


def test_bench_exact_path(toks):
    spm, tek = toks
    text = _corpus()[:400_000]
    t_ids, s_ids = spm.encode(text), tek.encode(text)
    tb, sb = spm.token_bytes, tek.token_bytes
    run = lambda: align_arrays(tb.data, tb.offsets, tb.is_special, sb.data, sb.offsets, sb.is_special,  # noqa: E731
                               t_ids, s_ids, spm.prefix_space, tek.prefix_space)
    run()
    assert run()[3][0] == "exact"
    dt = _best(run, 7)
    dt_api = _best(lambda: align(spm, tek, t_ids, s_ids), 7)
    report("align exact path (mistral-spm vs tekken, tinyshakespeare 400k chars)",
           teacher_tokens=len(t_ids), student_tokens=len(s_ids), seconds=dt,
           teacher_tokens_per_s=len(t_ids) / dt, both_sides_tokens_per_s=(len(t_ids) + len(s_ids)) / dt,
           api_teacher_tokens_per_s=len(t_ids) / dt_api, target=">=1M teacher tokens/s")
    assert len(t_ids) / dt > 1e6


@pytest.mark.parametrize("n_tokens", [512, 2048, 8192])
def test_bench_dp_path_vs_reference(toks, n_tokens):
    from test_align import ref_gotoh  # tests/ is on sys.path (benchmarks/conftest.py)

    spm, tek = toks
    corpus = _corpus()
    ids = spm.encode(corpus[: n_tokens * 6])[:n_tokens]
    text = spm.decode(ids)
    t_ids = spm.encode(text)
    s_ids = tek.encode(_perturb(text))
    run = lambda: align(spm, tek, t_ids, s_ids)  # noqa: E731
    al = run()
    assert al.stats["path"] == "dp"
    dt = _best(run, 5)
    a = np.frombuffer(spm.token_bytes.concat(t_ids), np.uint8)
    b = np.frombuffer(tek.token_bytes.concat(s_ids), np.uint8)
    dt_match = _best(lambda: byte_match(a, b), 5)
    full = len(a) * len(b) <= 80_000_000
    dt_full = _best(lambda: dp_match(a, b), 2) if full else float("nan")
    rows = min(len(a), max(10, 150_000 // max(1, len(b))))
    t0 = time.perf_counter()
    ref_gotoh(a[:rows].tobytes(), b.tobytes())
    ref = (time.perf_counter() - t0) * len(a) / rows
    report(f"align DP path {n_tokens} tokens (mistral-spm vs tekken on a template/case/CRLF-perturbed copy)",
           teacher_tokens=len(t_ids), student_tokens=len(s_ids), teacher_bytes=len(a), student_bytes=len(b),
           align_s=dt, tokens_per_s=len(t_ids) / dt, ref_s_est=ref, ref_rows=rows,
           speedup_vs_ref=ref / dt, numba_full_dp_s=dt_full, full_dp_speedup_vs_ref=ref / dt_full,
           one_to_one_share=al.stats["one_to_one_share"],
           matched_share=al.stats["matched_bytes"] / max(1, al.stats["teacher_bytes"]))
    if n_tokens == 2048:
        assert ref / dt >= 100
