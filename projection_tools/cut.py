"""Sort-and-cut a projection matrix: keep the top-k entries of each row, drop entries below a minimum
weight, renormalise rows to sum to 1. Fully vectorised over the COO arrays (one lexsort).

    python -m projection_tools.cut --help
"""
from __future__ import annotations

import sys

import click
import numpy as np


def cut_arrays(rows, cols, vals, n_rows: int, *, top_k: int | None = None, min_weight: float = 0.0,
               normalize: bool = True):
    """COO (rows, cols, vals) -> cut COO, sorted by (row, col). Ties in weight keep the lower column.
    A row whose entries all fall below min_weight keeps its largest entry (no row is emptied by the cut)."""
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    vals = np.asarray(vals, np.float32)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (got {top_k})")
    if min_weight < 0:
        raise ValueError(f"min_weight must be >= 0 (got {min_weight})")
    order = np.lexsort((cols, -vals, rows))  # by row, weight descending, col
    rows, cols, vals = rows[order], cols[order], vals[order]
    if rows.size:
        starts = np.zeros(n_rows + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n_rows), out=starts[1:])
        rank = np.arange(rows.size) - starts[rows]
        keep = (vals >= min_weight) | (rank == 0)
        keep &= vals > 0
        if top_k is not None:
            keep &= rank < top_k
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
    if normalize and rows.size:
        sums = np.bincount(rows, weights=vals.astype(np.float64), minlength=n_rows)
        vals = (vals / sums[rows]).astype(np.float32)
    order = np.lexsort((cols, rows))
    return rows[order], cols[order], vals[order]


def cut(W, *, top_k: int | None = None, min_weight: float = 0.0, normalize: bool = True):
    """A new ProjectionMatrix: W cut to top_k per row / min_weight, rows renormalised."""
    from xtok.projection import ProjectionMatrix

    r, c, v = W.coo_arrays()
    r, c, v = cut_arrays(r, c, v, W.shape[0], top_k=top_k, min_weight=min_weight, normalize=normalize)
    meta = dict(W.meta)
    opts = dict(meta.get("options", {}))
    opts.update({"top_k": top_k, "min_weight": min_weight, "normalize": normalize})
    meta["options"] = opts
    W2 = ProjectionMatrix.from_coo(r, c, v, W.shape, decomp_offsets=W.decomp_offsets, decomp_ids=W.decomp_ids,
                                   meta=meta, device=W.device)
    stats = dict(meta.get("stats") or {})
    if stats:  # the stats that the cut can change (the rest need the tokenizers and are unchanged by it)
        stats["nnz"] = W2.nnz
        stats["empty_rows"] = int((np.diff(W2.indptr) == 0).sum())
        stats["student_coverage_pct"] = round(100.0 * np.unique(W2.indices).size / max(W.shape[1], 1), 3)
    W2.meta["stats"] = stats
    return W2


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("matrix", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Where to write the cut matrix (.safetensors); may equal MATRIX.")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Keep at most this many entries per row (largest weights). Default: all.")
@click.option("--min-weight", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Drop entries below this weight (a row always keeps its largest entry).")
@click.option("--normalize/--no-normalize", default=True, show_default=True,
              help="Renormalise every non-empty row to sum to 1 after the cut.")
def cli(matrix, output, top_k, min_weight, normalize):
    """Sort-and-cut a projection MATRIX: top-k per row, minimum weight, row renormalisation."""
    from xtok.projection import ProjectionError, ProjectionMatrix, check_writable

    try:
        check_writable(output)  # fail fast, before loading anything
        W = ProjectionMatrix.load(matrix, check_hashes=False)
        W2 = cut(W, top_k=top_k, min_weight=min_weight, normalize=normalize)
        W2.save(output)
    except (ProjectionError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"nnz {W.nnz} -> {W2.nnz}; wrote {output}")


def main(argv=None):
    return cli.main(args=argv, prog_name="python -m projection_tools.cut")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
