"""The teacher -> student vocab projection matrix W at training time (the one-time builders live in
`projection_tools/`, which this package never imports).

Modules: `matrix` (`ProjectionMatrix`: load/save, hash checks, `project` / `project_flat`), `kernels`
(the CPU projection kernel: every projection on the host runs through it, the collator's included),
`device` (the same projection in torch, for inputs on an accelerator), `file` (the safetensors format:
atomic writes, validation on load).

File format (safetensors, see docs/projection.md):
  tensors  indices int32 [2, nnz] (row, col; sorted by row then col), values float32 [nnz],
           shape int64 [2], decomp_offsets int64 [V_t + 1], decomp_ids int32 [total]
  metadata format='xtok-projection', format_version, teacher_name/teacher_hash/teacher_vocab,
           student_name/student_hash/student_vocab, method, options (JSON), stats (JSON)
"""
from __future__ import annotations

from .device import project_torch, torch_sparse_mm
from .file import FORMAT, FORMAT_VERSION, ProjectionError, ProjectionWriteError, atomic_write, check_writable
from .kernels import SparseW, sparse_w
from .matrix import ProjectionMatrix

__all__ = ["ProjectionMatrix", "ProjectionError", "ProjectionWriteError", "FORMAT", "FORMAT_VERSION",
           "atomic_write", "check_writable", "SparseW", "sparse_w", "project_torch", "torch_sparse_mm"]
