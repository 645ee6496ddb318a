"""Cross-tokenizer distillation losses (docs/losses.md has the maths, with the names used here).

Every loss reads the student only at the output positions that carry a target and processes those
rows in chunks, through one custom autograd Function (`engine`: from logits `[B,T,V]` or fused from
`(hidden [B,T,H], lm_head_weight [V,H])`, never a second full-size tensor).

Modules:
* `divergences`: the per-row maths: `partition_logprobs` / `partition_divergence` (the student's
  log-probs of the target ids plus one tail bucket against the teacher's projected probs `q` plus its
  tail mass `r`: forward KL, reverse KL or JSD(beta) over those K+1 cells; a true divergence whose
  minimiser is the teacher) and `binary_divergence` (chunk likelihoods);
* `engine`: the row plan and the chunked / fused autograd Function (`run_rows`);
* `items`: the collator's batch -> row items (KL targets, chunk tokens, SFT labels);
* `components`: `CrossTokenizerKLLoss`, `ChunkLikelihoodLoss`, `SFTLoss`;
* `aggregator`: `TeacherLoss`, `MultiTeacherLossAggregator` (all components of all teachers in a
  single pass over the rows).
No module or global state; everything is computed in fp32 (fp64 when given fp64) with autocast
disabled inside.
"""
from __future__ import annotations

from .aggregator import MultiTeacherLossAggregator, TeacherLoss
from .components import ChunkLikelihoodLoss, CrossTokenizerKLLoss, SFTLoss
from .divergences import (CHUNK_VARIANTS, KL_VARIANTS, REVERSE_EPS, binary_divergence, partition_divergence,
                          partition_logprobs)
from .engine import limit_vocab
from .items import IGNORE_INDEX

__all__ = ["CHUNK_VARIANTS", "IGNORE_INDEX", "KL_VARIANTS", "REVERSE_EPS", "ChunkLikelihoodLoss", "CrossTokenizerKLLoss",
           "MultiTeacherLossAggregator", "SFTLoss", "TeacherLoss", "binary_divergence", "partition_divergence",
           "partition_logprobs", "limit_vocab"]
