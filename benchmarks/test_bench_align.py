"""Aligner speed: the exact path vs an independent offset aligner, the DP path vs the pure-Python
reference DP, and the worst cases (unrelated or random inputs, where anchoring finds little and the
band does the work).

Run: `pytest benchmarks/test_bench_align.py --benchmark -q -s`. Numba runs single-threaded (one core);
times are CPU time of this process (`time.process_time`), median of several rounds (min and max
printed; asserts use the median), so a loaded machine inflates them less. References:
- exact path: the chunks the tokenizer libraries' own token offsets give (`xtok.testing.offsets`,
  pure Python, shares nothing with xtok's aligner), checked equal and timed on the same ids (the
  grouping from spans; the libraries' encoding with offsets is timed apart);
- DP path: the pure-Python reference DP (`xtok.testing.alignment.ref_gotoh`, with the same
  token-boundary tie-break as the aligner), O(n*m): at 2k/8k tokens a full run would take minutes to
  hours, so it is timed on its first R rows (each row costs the same m cells) and scaled by n/R; the
  line says so (`ref_rows`).
The corpus is ../shared/assets' tinyshakespeare when present, else Python source (`corpus=` says which).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from benchmarks.conftest import met, report, rounds

from xtok.alignment import align, align_arrays, byte_match, dp_match
from xtok.tokens import load_tokenizer


def _corpus_path():
    from xtok.testing.assets import ASSETS

    p = ASSETS / "corpora" / "tinyshakespeare.txt"
    return p if p.exists() else None


CORPUS = "tinyshakespeare" if _corpus_path() else "python-source (no ../shared/assets)"


def _corpus() -> str:
    p = _corpus_path()
    if p is not None:
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


def _ref_estimate(a: bytes, b: bytes, fa=None, fb=None, cells=150_000):
    """CPU seconds of the pure-Python reference DP on all of a x b, from its first rows."""
    from xtok.testing.alignment import ref_gotoh

    rows = min(len(a), max(2, cells // max(1, len(b))))
    t0 = time.process_time()
    ref_gotoh(a[:rows], b, fa=None if fa is None else fa[:rows + 1], fb=fb)  # (a prefix: its rows cost the same)
    return (time.process_time() - t0) * len(a) / rows, rows


@pytest.fixture(scope="module")
def toks():
    return load_tokenizer("mistral-common:tokenizer.model.v1"), load_tokenizer("mistral-common:tekken_240911.json")


def test_bench_exact_path(toks):
    from xtok.testing.offsets import compare_with_offsets, library_encode, offset_alignment

    spm, tek = toks
    text = _corpus()[:400_000]
    c0 = time.process_time()
    lt, ls = library_encode(spm, text), library_encode(tek, text)
    lib_encode_s = time.process_time() - c0
    assert lt is not None and ls is not None, "the libraries do not reproduce the benchmark text"
    (t_ids, t_spans), (s_ids, s_spans) = lt, ls
    assert np.array_equal(t_ids, spm.encode(text)) and np.array_equal(s_ids, tek.encode(text))
    tb, sb = spm.token_bytes, tek.token_bytes
    run = lambda: align_arrays(tb.data, tb.offsets, tb.is_special, sb.data, sb.offsets, sb.is_special,  # noqa: E731
                               t_ids, s_ids, spm.prefix_space, tek.prefix_space)
    run()
    assert run()[3][0] == "exact"
    x = rounds(run, 9)
    x_api = rounds(lambda: align(spm, tek, t_ids, s_ids), 9)
    ref = offset_alignment(t_spans, s_spans)
    problems = compare_with_offsets(align(spm, tek, t_ids, s_ids), ref, t_spans, s_spans)
    r = rounds(lambda: offset_alignment(t_spans, s_spans), 3)
    report(f"align exact path (mistral-spm vs tekken, {CORPUS} 400k chars)",
           teacher_tokens=len(t_ids), student_tokens=len(s_ids), **x.fields("cpu_s"),
           teacher_tokens_per_s=len(t_ids) / x.median, both_sides_tokens_per_s=(len(t_ids) + len(s_ids)) / x.median,
           api_teacher_tokens_per_s=len(t_ids) / x_api.median, ref_offset_aligner_cpu_s=r.median,
           ref_library_encode_with_offsets_cpu_s=lib_encode_s, speedup_vs_offset_aligner=r.median / x.median,
           chunks=len(ref[0]), equal_to_offset_aligner=not problems,
           target=f">=1M teacher tokens/s: {met(len(t_ids) / x.median > 1e6)}")
    assert not problems, problems[:3]
    assert len(t_ids) / x.median > 1e6


@pytest.mark.parametrize("n_tokens", [512, 2048, 8192])
def test_bench_dp_path_vs_reference(toks, n_tokens):
    from xtok.testing.alignment import ref_flags

    spm, tek = toks
    corpus = _corpus()
    ids = spm.encode(corpus[: n_tokens * 6])[:n_tokens]
    text = spm.decode(ids)
    t_ids = spm.encode(text)
    s_ids = tek.encode(_perturb(text))
    run = lambda: align(spm, tek, t_ids, s_ids)  # noqa: E731
    al = run()
    assert al.stats["path"] == "dp"
    x = rounds(run, 7)
    dt = x.median
    a = np.frombuffer(spm.token_bytes.concat(t_ids), np.uint8)
    b = np.frombuffer(tek.token_bytes.concat(s_ids), np.uint8)
    fa, fb = ref_flags(spm.token_bytes, t_ids, spm.prefix_space), ref_flags(tek.token_bytes, s_ids, tek.prefix_space)
    dt_match = rounds(lambda: byte_match(a, b, a_flags=fa, b_flags=fb), 7).median
    full = len(a) * len(b) <= 80_000_000
    dt_full = rounds(lambda: dp_match(a, b, a_flags=fa, b_flags=fb), 3).median if full else float("nan")
    ref, rows = _ref_estimate(a.tobytes(), b.tobytes(), fa, fb)
    report(f"align DP path {n_tokens} tokens (mistral-spm vs tekken on a template/case/CRLF-perturbed copy of "
           f"{CORPUS})",
           teacher_tokens=len(t_ids), student_tokens=len(s_ids), teacher_bytes=len(a), student_bytes=len(b),
           **x.fields("align_cpu_s"), byte_match_cpu_s=dt_match, tokens_per_s=len(t_ids) / dt, ref_cpu_s_est=ref, ref_rows=rows,
           speedup_vs_ref=ref / dt, numba_full_dp_s=dt_full, full_dp_speedup_vs_ref=ref / dt_full,
           one_to_one_share=al.stats["one_to_one_share"],
           matched_share=al.stats["matched_bytes"] / max(1, al.stats["teacher_bytes"]),
           **({"target": f">=100x the reference: {met(ref / dt >= 100)}"} if n_tokens == 2048 else {}))
    if n_tokens == 2048:
        assert ref / dt >= 100


def _unrelated_text(n: int) -> str:
    """Real text unrelated to _corpus(): Python standard-library source (modules _corpus never uses)."""
    import argparse, collections, difflib, email.message, tarfile, typing, zipfile  # noqa: E401
    import inspect

    mods = (argparse, typing, tarfile, zipfile, difflib, collections, email.message)
    src = "".join(inspect.getsource(m) for m in mods)
    assert len(src) >= n, len(src)
    return src[:n]


@pytest.mark.parametrize("case", ["unrelated-texts-300k", "random-bytes-100k", "random-bytes-vs-text-100k"])
def test_bench_worst_cases(toks, case):
    """Inputs that share (almost) nothing: few or no anchors, so the large remaining regions get the
    banded DP (half-width BAND_HALF; n x (2 * BAND_HALF + 1) bytes of back-pointers)."""
    from xtok.alignment import BAND_HALF

    spm, tek = toks
    rng = np.random.default_rng(0)
    if case == "unrelated-texts-300k":
        t_text, s_text = _corpus()[:300_000], _unrelated_text(300_000)
        t_ids, s_ids = spm.encode(t_text), tek.encode(s_text)
        run = lambda: align(spm, tek, t_ids, s_ids)  # noqa: E731
        al = run()
        assert al.stats["path"] == "dp"
        a = spm.token_bytes.concat(t_ids)
        b = tek.token_bytes.concat(s_ids)
        extra = dict(teacher_tokens=len(t_ids), student_tokens=len(s_ids), chunks=al.stats["chunks"],
                     matched_share=al.stats["matched_bytes"] / max(1, al.stats["teacher_bytes"]))
    else:
        a = rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()
        b = (rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes() if case == "random-bytes-100k"
             else _unrelated_text(100_000).encode()[:100_000])
        A, B = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
        run = lambda: byte_match(A, B)  # noqa: E731
        mt, _ = run()
        extra = dict(matched_share=float((mt >= 0).mean()))
    x = rounds(run, 3)
    dt = x.median
    ref, rows = _ref_estimate(a, b, cells=200_000)
    band_mb = len(a) * (2 * BAND_HALF + 1) / 1e6
    report(f"align worst case {case}" + (f" ({CORPUS} vs Python source)" if case.startswith("unrelated") else ""),
           teacher_bytes=len(a), student_bytes=len(b), **x.fields("cpu_s"),
           band_backpointers_mb_max=band_mb, ref_cpu_s_est=ref, ref_rows=rows, speedup_vs_ref=ref / dt, **extra)
    assert dt < 60, "worst case blew up"
