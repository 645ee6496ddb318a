"""The stats block of a projection file (`matrix_stats`) and its text rendering (`format_stats`)."""
from __future__ import annotations

import numpy as np

__all__ = ["matrix_stats", "format_stats"]


def matrix_stats(W, teacher, exact_mask: np.ndarray, tiers: dict, build_time_s: float | None = None) -> dict:
    """The stats block of a projection file, computed from W's arrays, the teacher's token flags, the
    rows counted as exact matches (`exact_mask`, bool [V_t]) and the per-tier row counts `tiers`."""
    t_tb = teacher.token_bytes
    V_t, V_s = W.shape
    special = np.asarray(t_tb.is_special, bool)
    text = ~special
    n_text = int(text.sum())
    dec_len = np.diff(W.decomp_offsets)
    row_nnz = np.diff(W.indptr)
    exact_n = int((exact_mask & text).sum())
    multi = int(((dec_len > 1) & text).sum())
    unm = np.nonzero(special & (row_nnz == 0))[0]
    reached = np.unique(W.indices).size
    return {
        "teacher_vocab": V_t, "student_vocab": V_s,
        "teacher_text_tokens": n_text, "teacher_special_tokens": int(special.sum()),
        "exact": exact_n, "exact_pct": round(100.0 * exact_n / max(n_text, 1), 3),
        "multi_token": multi, "multi_token_pct": round(100.0 * multi / max(n_text, 1), 3),
        "single_token_nonexact": int(((dec_len == 1) & text & ~exact_mask).sum()),
        "tiers": tiers,
        "special_mapped": int((special & (row_nnz > 0)).sum()),
        "special_unmapped": int(unm.size), "special_unmapped_names": [teacher.token_str(int(i)) for i in unm[:50]],
        "empty_rows": int((row_nnz == 0).sum()),
        "mean_decomposition_len": round(float(dec_len[text].mean()) if n_text else 0.0, 4),
        "max_decomposition_len": int(dec_len.max()) if V_t else 0,
        "student_coverage_pct": round(100.0 * reached / max(V_s, 1), 3),
        "nnz": W.nnz, **({} if build_time_s is None else {"build_time_s": round(build_time_s, 3)}),
    }


def format_stats(stats: dict) -> str:
    s = stats
    lines = [
        f"teacher vocab {s['teacher_vocab']:,}  student vocab {s['student_vocab']:,}",
        f"exact matches  {s['exact']:,} ({s['exact_pct']:.2f}% of {s['teacher_text_tokens']:,} text tokens)",
        f"multi-token    {s['multi_token']:,} ({s['multi_token_pct']:.2f}%), mean decomposition length "
        f"{s['mean_decomposition_len']:.3f}, max {s['max_decomposition_len']}",
        f"specials       {s['special_mapped']} mapped, {s['special_unmapped']} unmapped"
        + (f" (e.g. {', '.join(s['special_unmapped_names'][:8])})" if s['special_unmapped'] else ""),
        "tiers          " + ", ".join(f"{k}={v:,}" for k, v in s["tiers"].items()),
        f"nnz {s['nnz']:,}  empty rows {s['empty_rows']:,}  student coverage {s['student_coverage_pct']:.2f}%  "
        f"build time {s['build_time_s']:.2f}s",
    ]
    return "\n".join(lines)
