"""One-time projection-matrix tools, off the training import path (`xtok` never imports this package at
training time; only the `xtok build-projection` command does).

- `build`:   build W and the decompositions for a tokenizer pair (`build_projection`)
- `exact`:   re-apply the exact byte-match map to an (edited) matrix (`apply_exact`)
- `cut`:     sort-and-cut: top-k per row, minimum weight, renormalise (`cut`)
- `inspect`: stats, coverage and sample rows rendered as text (`inspect_matrix`)

Shared pieces: `lookup` (exact byte lookups over a vocabulary, Numba), `decompose` (mid-text student
decompositions of teacher tokens, the exact map, canonical student ids), `stats` (a file's stats block).

Each runs on its own: `python -m projection_tools.<name> --help`.
"""
