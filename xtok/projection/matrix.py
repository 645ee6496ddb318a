"""`ProjectionMatrix`: the teacher -> student vocab projection W at training time.

`W` has shape `[V_teacher, V_student]`; a teacher next-token distribution `p` becomes the student-vocab
distribution `q = p @ W`. Rows sum to 1 (each teacher token's mass goes somewhere in the student
vocabulary), so projection preserves mass; rows of teacher tokens that map nowhere (unmapped special
tokens) are empty and their mass is dropped (`stats['special_unmapped']` lists them). Besides W the
file holds each teacher token's full student decomposition (teacher id -> student id sequence).

Projection runs in the CPU kernel (`xtok.projection.kernels`) or, for inputs on an accelerator, in
torch (`xtok.projection.device`); both give the same result.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .device import project_torch, torch_sparse_mm
from .file import (CHECKSUM_KEY, FORMAT, FORMAT_VERSION, ProjectionError, atomic_write, check_content,
                   check_normalized, content_checksum, validate_tensors)
from .kernels import SparseW, project_rows_flat, sort_pad_rows, sparse_w

__all__ = ["ProjectionMatrix"]


def _hash_of(x) -> str | None:
    if x is None:
        return None
    if isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x):
        return x  # already a content hash
    from ..tokens import load_tokenizer

    return load_tokenizer(x).content_hash


class ProjectionMatrix:
    """Sparse W (CSR numpy arrays on the host; torch views on demand) + decompositions + metadata.

    Attributes: shape (V_t, V_s), indptr int64 [V_t+1], indices int32 [nnz], data float32 [nnz],
    decomp_offsets int64 [V_t+1], decomp_ids int32 [total], meta (dict: names, hashes, method,
    options, stats), device (for the torch views and torch `project`).
    """

    def __init__(self, indptr, indices, data, shape, decomp_offsets=None, decomp_ids=None,
                 meta: dict | None = None, device="cpu"):
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int64)
        self.indices = np.ascontiguousarray(indices, dtype=np.int32)
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.shape = (int(shape[0]), int(shape[1]))
        if self.indptr.shape != (self.shape[0] + 1,) or self.indptr[-1] != self.indices.size:
            raise ProjectionError("inconsistent CSR arrays (indptr does not match shape/nnz)")
        if decomp_offsets is None:
            decomp_offsets = np.zeros(self.shape[0] + 1, np.int64)
            decomp_ids = np.zeros(0, np.int32)
        self.decomp_offsets = np.ascontiguousarray(decomp_offsets, dtype=np.int64)
        self.decomp_ids = np.ascontiguousarray(decomp_ids, dtype=np.int32)
        do = self.decomp_offsets
        if (do.shape != (self.shape[0] + 1,) or do[0] != 0 or do[-1] != self.decomp_ids.size
                or bool((np.diff(do) < 0).any())):
            raise ProjectionError("inconsistent decomposition arrays (decomp_offsets must have V_t + 1 "
                                  "non-decreasing entries from 0 to len(decomp_ids))")
        self.meta = dict(meta or {})
        self.content_verified = False  # load() sets it: the file's content checksum was checked
        self.device = device
        self._torch_cache: dict = {}
        self._kernel_w: SparseW | None = None
        self._max_row_nnz = int(np.diff(self.indptr).max()) if self.shape[0] else 0

    def __getstate__(self):  # picklable for DataLoader workers; torch views are rebuilt lazily
        d = dict(self.__dict__)
        d["_torch_cache"] = {}
        d["_kernel_w"] = None
        return d

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_coo(cls, rows, cols, values, shape, **kw) -> "ProjectionMatrix":
        """From COO triplets (any order; duplicates summed in float64, then stored as float32)."""
        import scipy.sparse as sp

        rows = np.asarray(rows, np.int64)
        cols = np.asarray(cols, np.int64)
        values = np.asarray(values, np.float32)
        if rows.size and (rows.min() < 0 or rows.max() >= shape[0] or cols.min() < 0 or cols.max() >= shape[1]):
            raise ProjectionError(f"COO indices out of range for shape {tuple(shape)}")
        csr = sp.csr_matrix((values.astype(np.float64), (rows, cols)), shape=(int(shape[0]), int(shape[1])))
        csr.sum_duplicates()  # also sorts the columns of every row
        return cls(csr.indptr, csr.indices, csr.data.astype(np.float32), shape, **kw)

    def coo_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows int32, cols int32, values float32), sorted by row then col."""
        rows = np.repeat(np.arange(self.shape[0], dtype=np.int32), np.diff(self.indptr))
        return rows, self.indices, self.data

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    @property
    def stats(self) -> dict:
        return self.meta.get("stats", {})

    @property
    def max_row_nnz(self) -> int:
        return self._max_row_nnz

    def row(self, teacher_id: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.indptr[teacher_id], self.indptr[teacher_id + 1]
        return self.indices[s:e].astype(np.int64), self.data[s:e]

    def decomposition(self, teacher_id: int) -> np.ndarray:
        """The student token ids (int64) the student tokenizer gives for this teacher token's bytes
        (mid-text); empty for unmapped special tokens."""
        if not 0 <= teacher_id < self.shape[0]:
            raise IndexError(f"teacher id {teacher_id} out of range [0, {self.shape[0]})")
        return self.decomp_ids[self.decomp_offsets[teacher_id]: self.decomp_offsets[teacher_id + 1]].astype(np.int64)

    def decomposition_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets int64 [V_t+1], ids int32 [total]): teacher id t decomposes to ids[offsets[t]:offsets[t+1]]."""
        return self.decomp_offsets, self.decomp_ids

    # -- torch views ---------------------------------------------------------------------------
    def to(self, device) -> "ProjectionMatrix":
        self.device = device
        self._torch_cache = {}
        return self

    def torch_coo(self):
        """torch.sparse_coo_tensor [V_t, V_s] float32 on self.device (coalesced)."""
        import torch

        if "coo" not in self._torch_cache:
            rows, cols, vals = self.coo_arrays()
            idx = torch.from_numpy(np.stack([rows.astype(np.int64), cols.astype(np.int64)]))
            t = torch.sparse_coo_tensor(idx, torch.from_numpy(vals), self.shape, is_coalesced=True,
                                        check_invariants=False)
            self._torch_cache["coo"] = t.to(self.device)
        return self._torch_cache["coo"]

    def torch_csr(self):
        """torch.sparse_csr_tensor [V_t, V_s] float32 on self.device."""
        import torch

        if "csr" not in self._torch_cache:
            import warnings

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
                t = torch.sparse_csr_tensor(torch.from_numpy(self.indptr),
                                            torch.from_numpy(self.indices.astype(np.int64)),
                                            torch.from_numpy(self.data), self.shape, check_invariants=False)
            self._torch_cache["csr"] = t.to(self.device)
        return self._torch_cache["csr"]

    def _torch_arrays(self, device):
        import torch

        key = ("arr", str(device))
        if key not in self._torch_cache:
            self._torch_cache[key] = (torch.from_numpy(self.indptr).to(device),
                                      torch.from_numpy(self.indices.astype(np.int64)).to(device),
                                      torch.from_numpy(self.data).to(device))
        return self._torch_cache[key]

    # -- projection ----------------------------------------------------------------------------
    def default_k(self, k: int) -> int:
        """Output width of `project` for teacher top-k input: k * max row nnz (no truncation)."""
        return max(1, k * max(1, self._max_row_nnz))

    def project(self, topk_ids, topk_probs, K: int | None = None, *, pad_id: int = -1,
                drop_out_of_range: bool = False):
        """Teacher top-k (ids [..., k] int, probs [..., k] float) -> student sparse distribution.

        Returns (ids [..., K] int64, probs [..., K]) of the same kind as the input (numpy or torch;
        torch stays on the input's device). For every position, each teacher id's row of W is
        gathered and scaled by its prob, duplicate student ids are merged (probs summed), and the
        result is sorted by prob, descending; unused slots hold id `pad_id` (default -1) and prob 0.
        K defaults to `default_k(k)` = k * max row nnz, so nothing is ever truncated and the output
        mass equals the input mass (rows of W sum to 1). With a smaller K the K most probable student
        ids are kept. Teacher ids < 0 are treated as padding (contribute nothing). Teacher ids >= V_t
        (a model whose embedding is padded past its tokenizer's vocabulary) raise IndexError, or are
        dropped like padding with `drop_out_of_range=True`.
        """
        if drop_out_of_range:
            oob = topk_ids >= self.shape[0]
            if bool(oob.any()):
                topk_ids = topk_ids.masked_fill(oob, -1) if _is_torch(topk_ids) else np.where(oob, -1, topk_ids)
        if not _is_torch(topk_ids) or topk_ids.device.type == "cpu":
            return self._project_cpu(topk_ids, topk_probs, K, pad_id)
        return self._project_torch(topk_ids, topk_probs, K, pad_id)

    def _project_cpu(self, topk_ids, topk_probs, K, pad_id):
        """The Numba kernel (releases the GIL): `project_flat` accumulated in float64, then each row
        sorted and padded to K."""
        is_t = _is_torch(topk_ids)
        ids = topk_ids.numpy() if is_t else np.asarray(topk_ids)
        if is_t and topk_probs.dtype in (__import__("torch").float16, __import__("torch").bfloat16):
            topk_probs = topk_probs.float()
        probs = topk_probs.detach().numpy() if is_t else np.asarray(topk_probs)
        if ids.shape != probs.shape:
            raise ValueError(f"topk_ids {ids.shape} and topk_probs {probs.shape} differ in shape")
        k = ids.shape[-1] if ids.ndim else 1
        lead = ids.shape[:-1]
        K = self.default_k(k) if K is None else int(K)
        ids2 = np.ascontiguousarray(ids.reshape(-1, k), dtype=np.int64)
        probs2 = np.ascontiguousarray(probs.reshape(-1, k))
        out_dtype = probs2.dtype if probs2.dtype in (np.float32, np.float64) else np.dtype(np.float32)
        flat_ids, flat_p, offsets, _ = self._flat(ids2, probs2.astype(np.float64, copy=False), True, np.float64)
        out_ids = np.empty((ids2.shape[0], K), np.int32)
        out_p = np.empty((ids2.shape[0], K), np.float64)
        sort_pad_rows(flat_ids, flat_p, offsets, int(pad_id), out_ids, out_p)
        out_ids = out_ids.astype(np.int64).reshape(*lead, K)
        out_p = out_p.astype(out_dtype, copy=False).reshape(*lead, K)
        if is_t:
            import torch

            return torch.from_numpy(out_ids), torch.from_numpy(out_p)
        return out_ids, out_p

    def _project_torch(self, topk_ids, topk_probs, K, pad_id):
        indptr, indices, data = self._torch_arrays(topk_ids.device)
        return project_torch(indptr, indices, data, self.shape[0], self._max_row_nnz, topk_ids, topk_probs, K, pad_id)

    def project_flat(self, topk_ids, topk_probs, *, keep_zero: bool = False, dtype=np.float32):
        """Teacher rows (numpy ids [n, k] int, < 0 = none; probs [n, k]) -> flat CSR student rows:
        (ids int32 [nnz], probs [nnz] of `dtype`, offsets int64 [n+1], tail float32 [n] = max(0, 1 - row
        mass)). Row i is ids/probs[offsets[i]:offsets[i+1]], duplicates merged in order of first
        appearance, unsorted; entries with prob <= 0 are dropped unless keep_zero. The layout the
        collator pads into a batch; `project()` sorts and pads the same result."""
        ids = np.ascontiguousarray(topk_ids, dtype=np.int64)
        probs = np.ascontiguousarray(topk_probs, dtype=dtype)
        if ids.ndim != 2 or ids.shape != probs.shape:
            raise ValueError(f"project_flat(): ids {ids.shape} and probs {probs.shape} must be the same [n, k] shape")
        return self._flat(ids, probs, keep_zero, dtype)

    def _flat(self, ids, probs, keep_zero, dtype):
        if ids.size and int(ids.max()) >= self.shape[0]:
            raise IndexError(f"teacher id {int(ids.max())} out of range for a W with {self.shape[0]} rows")
        return project_rows_flat(self.kernel_w, ids, probs, bool(keep_zero), np.zeros(0, dtype))

    @property
    def kernel_w(self) -> SparseW:
        """W as the CPU kernels read it (`xtok.projection.kernels.SparseW`), built once."""
        if self._kernel_w is None:
            self._kernel_w = sparse_w(self.indptr, self.indices, self.data, self.shape)
        return self._kernel_w

    def project_dense(self, probs):
        """Reference/utility: dense teacher distributions [..., V_t] (torch) -> [..., V_s] via the CSR W."""
        csr = self.torch_csr()
        shp = probs.shape
        out = torch_sparse_mm(csr, probs.reshape(-1, shp[-1]))
        return out.reshape(*shp[:-1], self.shape[1])

    # -- hashes --------------------------------------------------------------------------------
    def check_tokenizers(self, teacher=None, student=None, *, path: str | os.PathLike | None = None):
        """Raise ProjectionError if the given tokenizers (Tokenizer, spec, or content hash) are not
        the ones this W was built for."""
        where = f"{path}: " if path else ""
        for role, given in (("teacher", teacher), ("student", student)):
            h = _hash_of(given)
            want = self.meta.get(f"{role}_hash")
            if h is not None and want and h != want:
                name = self.meta.get(f"{role}_name", "?")
                raise ProjectionError(
                    f"{where}built for {role} tokenizer {name!r} (content hash {want[:12]}…), but the given {role} "
                    f"tokenizer has hash {h[:12]}…. Rebuild it with `xtok build-projection --teacher ... --student ... "
                    f"-o ...` for these tokenizers, or pass check_hashes=False to load it anyway.")

    # -- io ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write a .safetensors file atomically (temp file + fsync + rename); a failure (e.g. disk full)
        raises ProjectionWriteError and leaves nothing behind."""
        from safetensors.numpy import save as st_save

        rows, cols, vals = self.coo_arrays()
        tensors = {
            "indices": np.ascontiguousarray(np.stack([rows, cols]).astype(np.int32)),
            "values": np.ascontiguousarray(vals, dtype=np.float32),
            "shape": np.asarray(self.shape, dtype=np.int64),
            "decomp_offsets": self.decomp_offsets,
            "decomp_ids": self.decomp_ids,
        }
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION}
        for k, v in self.meta.items():
            if k != CHECKSUM_KEY:
                meta[k] = v if isinstance(v, str) else json.dumps(v)
        meta[CHECKSUM_KEY] = content_checksum(tensors, meta)  # checked by load
        data = st_save(tensors, metadata=meta)  # serialised here, written by Python I/O (real OSErrors)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu", teacher=None, student=None,
             check_hashes: bool = True, verify: bool = True) -> "ProjectionMatrix":
        """Load a W saved by `save` / `xtok build-projection`. `teacher`/`student` (Tokenizer, spec or
        content hash), when given and `check_hashes`, must be the tokenizers W was built for. `verify`:
        the content checksum recorded at save time must match (files written before xtok recorded one
        are not checked: `W.content_verified` is False) and, when the options say `normalize`, every
        non-empty row must sum to 1; ProjectionError otherwise. verify=False loads an edited file as
        it is (save it again to record a new checksum)."""
        path = Path(path)
        if not path.is_file():
            raise ProjectionError(f"{path}: no such projection file. Build one with `xtok build-projection "
                                  f"--teacher T --student S -o {path}`.")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                meta = dict(f.metadata() or {})
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001  (safetensors raises several types on corrupt files)
            raise ProjectionError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e}). The file is "
                                  "corrupted or truncated; rebuild it with `xtok build-projection`.") from e
        if meta.get("format") != FORMAT:
            raise ProjectionError(f"{path}: a safetensors file but not an xtok projection (format="
                                  f"{meta.get('format')!r}); build one with `xtok build-projection`.")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ProjectionError(f"{path}: projection format version {meta.get('format_version')!r}, this xtok "
                                  f"reads {FORMAT_VERSION!r}; rebuild it with `xtok build-projection`.")
        raw_meta = dict(meta)  # as stored: what the checksum covers (validate_tensors parses options/stats)
        meta.pop("format", None)
        meta.pop("format_version", None)
        meta.pop(CHECKSUM_KEY, None)
        shape, decomp = validate_tensors(path, t, meta)  # a malformed file: the field that breaks the format
        verified = check_content(path, t, raw_meta) if verify else False  # a well-formed one changed since
        if verify:
            check_normalized(path, t["indices"], t["values"], shape[0], meta)
        try:
            W = cls.from_coo(t["indices"][0], t["indices"][1], t["values"], shape, decomp_offsets=decomp[0],
                             decomp_ids=decomp[1], meta=meta, device=device)
        except ProjectionError as e:
            raise ProjectionError(f"{path}: {e}; rebuild the file.") from e
        W.content_verified = verified
        if check_hashes:
            W.check_tokenizers(teacher, student, path=path)
        return W

    def __repr__(self):
        return (f"ProjectionMatrix({self.meta.get('teacher_name', '?')} -> {self.meta.get('student_name', '?')}, "
                f"shape={self.shape}, nnz={self.nnz})")


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")
