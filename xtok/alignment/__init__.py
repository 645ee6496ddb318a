"""Token alignment between two tokenizations of (nearly) the same text, through their raw bytes.

`align(teacher, student, teacher_ids, student_ids) -> Alignment` (chunks of equal bytes + gaps) is the
entry point; `align_pair` adds what the collator needs (truncated sides, the run filter). Modules, in
data-flow order:

* `streams`: token byte offsets (the one definition, dummy-prefix spaces included), byte streams, the
  chunk pass over a byte matching (Numba);
* `dp`: the affine-gap DP with the token-boundary tie-break and its helpers (Numba);
* `match`: `byte_match` (trim, anchors, regions, band) and `dp_match` (the plain full DP);
* `api`: `Alignment`, `align`, `align_arrays`;
* `pair`: `align_pair`, `run_filter`.

See docs/alignment.md for the algorithm and its guarantees.
"""
from __future__ import annotations

from .api import Alignment, align, align_arrays, chunks_from_match, token_bytes_and_prefix
from .dp import (ANCHOR_K, BAND_HALF, CUT_ALL, CUT_BOUND, CUT_END, CUT_SPECIAL, FULL_DP_CELLS, GAP_EXTEND, GAP_OPEN,
                 LAST_FULL_DP_CELLS)
from .match import byte_match, cut_flags, dp_match
from .pair import MIN_RUN_BYTES, PairAlignment, align_pair, run_filter, token_byte_offsets

__all__ = ["Alignment", "align", "align_arrays", "align_pair", "PairAlignment", "run_filter", "token_byte_offsets",
           "byte_match", "chunks_from_match", "dp_match", "cut_flags", "token_bytes_and_prefix", "MIN_RUN_BYTES",
           "GAP_OPEN", "GAP_EXTEND", "ANCHOR_K", "FULL_DP_CELLS", "LAST_FULL_DP_CELLS", "BAND_HALF", "CUT_BOUND",
           "CUT_END", "CUT_SPECIAL", "CUT_ALL"]
