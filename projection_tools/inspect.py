"""Inspect a projection matrix: metadata and build stats, coverage, sample rows rendered as text.

    python -m projection_tools.inspect W.safetensors --teacher T --student S --rows 20
"""
from __future__ import annotations

import json
import sys

import click
import numpy as np


def coverage(W) -> dict:
    """Row/column coverage of W, computed from the arrays (independent of the stored stats)."""
    cnt = np.diff(W.indptr)
    rows, _, vals = W.coo_arrays()
    sums = np.bincount(rows, weights=vals.astype(np.float64), minlength=W.shape[0])
    nonempty = cnt > 0
    return {
        "rows": W.shape[0], "cols": W.shape[1], "nnz": W.nnz,
        "empty_rows": int((~nonempty).sum()),
        "rows_sum_to_1": int((np.abs(sums - 1) < 1e-5).sum()),
        "max_row_nnz": int(cnt.max()) if cnt.size else 0,
        "student_ids_reached": int(np.unique(W.indices).size),
        "student_coverage_pct": round(100.0 * np.unique(W.indices).size / max(W.shape[1], 1), 3),
        "mean_decomposition_len": round(float(np.diff(W.decomp_offsets).mean()) if W.shape[0] else 0.0, 4),
    }


def render_row(W, t: int, teacher=None, student=None) -> str:
    """One row as text: `teacher token -> student decomposition | W row`."""
    def tname(tok, i):
        if tok is None:
            return f"#{i}"
        i = int(i)
        if tok.token_bytes.is_special[i]:
            return tok.token_str(i)
        b = tok.token_bytes.get(i)
        try:
            return repr(b.decode("utf-8"))
        except UnicodeDecodeError:
            return repr(b)  # a byte fragment, shown as b'\xe6'


    ids, w = W.row(t)
    dec = W.decomposition(t)
    row = ", ".join(f"{tname(student, i)}:{x:.3g}" for i, x in zip(ids.tolist(), w.tolist())) or "(empty)"
    return f"{t:>7} {tname(teacher, t):<24} -> {' + '.join(tname(student, i) for i in dec.tolist()) or '(none)'}   W: {row}"


def inspect_matrix(W, teacher=None, student=None, *, rows: int = 10, seed: int = 0, tokens=()) -> str:
    meta = {k: v for k, v in W.meta.items() if k not in ("stats",)}
    out = ["== metadata", json.dumps(meta, indent=1, default=str), "== build stats",
           json.dumps(W.stats, indent=1), "== coverage", json.dumps(coverage(W), indent=1)]
    lens = np.diff(W.decomp_offsets)
    exact = np.nonzero(lens == 1)[0]
    multi = np.nonzero(lens > 1)[0]
    empty = np.nonzero(np.diff(W.indptr) == 0)[0]
    rng = np.random.default_rng(seed)
    for title, pool in (("exact / single-token rows", exact), ("multi-token rows", multi), ("empty rows", empty)):
        if pool.size == 0:
            continue
        pick = np.sort(rng.choice(pool, min(rows, pool.size), replace=False))
        out.append(f"== sample {title} ({pool.size:,} in all)")
        out.extend(render_row(W, int(t), teacher, student) for t in pick)
    if tokens:
        out.append("== requested rows")
        for t in tokens:
            out.append(render_row(W, int(t), teacher, student))
    return "\n".join(out)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("matrix", type=click.Path(dir_okay=False))
@click.option("--teacher", "-t", default=None, help="Teacher tokenizer, to render rows as text (and check hashes).")
@click.option("--student", "-s", default=None, help="Student tokenizer, to render rows as text (and check hashes).")
@click.option("--rows", "-n", type=click.IntRange(min=0), default=10, show_default=True,
              help="Sample rows to render per category (exact, multi-token, empty).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the row sample.")
@click.option("--token", "tokens", multiple=True, type=int, help="Also render these teacher ids (repeatable).")
@click.option("--no-check-hashes", is_flag=True, help="Do not require the tokenizers' hashes to match the file's.")
def cli(matrix, teacher, student, rows, seed, tokens, no_check_hashes):
    """Print MATRIX's metadata, build stats, coverage, and sample rows rendered as text."""
    from xtok.projection import ProjectionError, ProjectionMatrix
    from xtok.tokens import TokenizerLoadError, load_tokenizer

    try:
        T = load_tokenizer(teacher) if teacher else None
        S = load_tokenizer(student) if student else None
        W = ProjectionMatrix.load(matrix, teacher=T, student=S, check_hashes=not no_check_hashes)
        for t in tokens:
            if not 0 <= t < W.shape[0]:
                raise ValueError(f"--token {t}: out of range [0, {W.shape[0]})")
        click.echo(inspect_matrix(W, T, S, rows=rows, seed=seed, tokens=tokens))
    except (ProjectionError, TokenizerLoadError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e


def main(argv=None):
    return cli.main(args=argv, prog_name="python -m projection_tools.inspect")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
