"""Exact byte matches between two vocabularies, and re-applying them to an (edited) projection matrix.

A teacher token whose bytes equal a student token's bytes maps to that student token with weight 1.
The lookup hashes every token's bytes (FNV-1a 64, Numba), sorts the student hashes and binary-searches
each teacher hash, verifying the bytes: O((V_t + V_s) log V_s), no V_t x V_s work.

When the student vocabulary holds the same bytes under several ids (SentencePiece's `<0x20>` byte
piece and `▁` are both b" "), the id the student tokenizer itself produces for those bytes mid-text
wins (`canonical_student_mask`).

    python -m projection_tools.exact --help
"""
from __future__ import annotations

import sys

import click
import numpy as np

from .decompose import exact_map

def apply_exact(W, teacher, student):
    """Copy of W whose exact-match rows are replaced by one-hot rows at the matching student id
    (and whose decompositions for those rows become that single id). Returns (W', n_rows_changed).

    W'.stats are recomputed from W''s arrays (nnz, exact, multi-token, specials, coverage, ...); the
    per-row build tiers are not stored, so `tiers` becomes {exact, special, kept, unmapped} (kept = rows
    taken over from W as they were) and the build's breakdown moves to `tiers_at_build`."""
    from xtok.projection import ProjectionMatrix

    from .stats import matrix_stats

    V_t, V_s = W.shape
    if (V_t, V_s) != (teacher.vocab_size, student.vocab_size):
        raise ValueError(f"matrix shape {W.shape} does not match the tokenizers ({teacher.vocab_size}, "
                         f"{student.vocab_size}); pass the teacher/student it was built for.")
    ex = exact_map(teacher, student)
    hit = ex >= 0
    rows, cols, vals = W.coo_arrays()
    old_hit_row = hit[rows]
    # rows already exactly one-hot at the right id are unchanged
    cnt = np.diff(W.indptr)
    at = np.minimum(W.indptr[:-1], max(W.nnz - 1, 0))
    first = W.indices[at] if W.nnz else np.full(V_t, -1)
    first_val = W.data[at] if W.nnz else np.zeros(V_t)
    unchanged = (cnt == 1) & (first == ex) & (first_val == 1.0)
    n_changed = int((hit & ~unchanged).sum())
    keep = ~old_hit_row
    hr = np.nonzero(hit)[0]
    new_rows = np.concatenate([rows[keep].astype(np.int64), hr])
    new_cols = np.concatenate([cols[keep].astype(np.int64), ex[hr]])
    new_vals = np.concatenate([vals[keep], np.ones(hr.size, np.float32)])
    # decompositions: exact rows -> [ex]
    dl = np.diff(W.decomp_offsets)
    new_len = np.where(hit, 1, dl)
    offs = np.zeros(V_t + 1, np.int64)
    np.cumsum(new_len, out=offs[1:])
    row_of = np.repeat(np.arange(V_t), new_len)
    src = W.decomp_offsets[row_of] + (np.arange(int(offs[-1])) - offs[row_of])
    old = W.decomp_ids[np.clip(src, 0, max(W.decomp_ids.size - 1, 0))] if W.decomp_ids.size else np.zeros(src.size, np.int32)
    ids = np.where(hit[row_of], ex[row_of], old).astype(np.int32)
    meta = dict(W.meta)
    opts = dict(meta.get("options", {}))
    opts["exact_reapplied"] = True
    meta["options"] = opts
    W2 = ProjectionMatrix.from_coo(new_rows, new_cols, new_vals, W.shape, decomp_offsets=offs, decomp_ids=ids,
                                   meta=meta, device=W.device)
    old = dict(W.meta.get("stats") or {})
    special = np.asarray(teacher.token_bytes.is_special, bool)
    nonempty = np.diff(W2.indptr) > 0
    tiers = {"exact": int(hit.sum()), "special": int((special & nonempty).sum()),
             "kept": int((~special & ~hit & nonempty).sum()), "unmapped": int((~nonempty).sum())}
    stats = matrix_stats(W2, teacher, hit, {k: v for k, v in tiers.items() if v}, old.get("build_time_s"))
    stats["exact_rows_changed"] = n_changed
    if "tiers" in old:
        stats["tiers_at_build"] = old.get("tiers_at_build", old["tiers"])
    W2.meta["stats"] = stats
    return W2, n_changed


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("matrix", type=click.Path(dir_okay=False))
@click.option("--teacher", "-t", required=True, help="Teacher tokenizer (folder, file, mistral-common:<file>, hub id).")
@click.option("--student", "-s", required=True, help="Student tokenizer (same forms as --teacher).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Where to write the corrected matrix (.safetensors); may equal MATRIX.")
@click.option("--no-check-hashes", is_flag=True, help="Load MATRIX even if its tokenizer hashes differ.")
def cli(matrix, teacher, student, output, no_check_hashes):
    """Re-apply the exact byte-match map to MATRIX (e.g. after editing or learning W): every
    teacher token whose bytes equal a student token's becomes a one-hot row at that token."""
    from xtok.projection import ProjectionError, ProjectionMatrix, check_writable
    from xtok.tokens import TokenizerLoadError, load_tokenizer

    try:
        check_writable(output)  # fail fast, before loading anything
        T, S = load_tokenizer(teacher), load_tokenizer(student)
        W = ProjectionMatrix.load(matrix, teacher=T, student=S, check_hashes=not no_check_hashes)
        W2, n = apply_exact(W, T, S)
        W2.save(output)
    except (ProjectionError, TokenizerLoadError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"exact rows re-applied: {n} changed; wrote {output} (nnz={W2.nnz})")


def main(argv=None):
    return cli.main(args=argv, prog_name="python -m projection_tools.exact")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
