"""The teacher -> student vocab projection matrix W (runtime side).

`W` has shape `[V_teacher, V_student]`; a teacher next-token distribution `p` becomes the student-vocab
distribution `q = p @ W`. Rows sum to 1 (each teacher token's mass goes somewhere in the student
vocabulary), so projection preserves mass; rows of teacher tokens that map nowhere (unmapped special
tokens) are empty and their mass is dropped (`stats['special_unmapped']` lists them).

Besides W the file holds each teacher token's full student decomposition (teacher id -> student id
sequence, CSR arrays), which the chunk-level loss needs.

File format (safetensors, see docs/projection.md):
  tensors  indices int32 [2, nnz] (row, col; sorted by row then col), values float32 [nnz],
           shape int64 [2], decomp_offsets int64 [V_t + 1], decomp_ids int32 [total]
  metadata format='xtok-projection', format_version, teacher_name/teacher_hash/teacher_vocab,
           student_name/student_hash/student_vocab, method, options (JSON), stats (JSON)

This module never imports `projection_tools` (the one-time builders live there).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["ProjectionMatrix", "ProjectionError", "ProjectionWriteError", "FORMAT", "FORMAT_VERSION",
           "atomic_write", "check_writable"]

FORMAT = "xtok-projection"
FORMAT_VERSION = "1"

# tensor -> (dtype, rank) of format_version 1 (docs/projection.md)
_TENSOR_SPEC = {"indices": (np.int32, 2), "values": (np.float32, 1), "shape": (np.int64, 1),
                "decomp_offsets": (np.int64, 1), "decomp_ids": (np.int32, 1)}
_INT32_MAX = int(np.iinfo(np.int32).max)


class ProjectionError(ValueError):
    """A projection file that cannot be used as asked; the message names the file and the fix."""


class ProjectionWriteError(ProjectionError, OSError):
    """A projection file that cannot be written (missing or unwritable folder, disk full, ...): also an
    OSError, so `except OSError` keeps working; the message names the file and the fix."""


def _out_parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _check_parent(path: Path) -> Path:
    parent = _out_parent(path)
    if not parent.exists():
        raise ProjectionWriteError(f"{path}: output folder {parent} does not exist; create it first.")
    if not parent.is_dir():
        raise ProjectionWriteError(f"{path}: {parent} is not a folder; choose an output path inside a folder.")
    if path.is_dir():
        raise ProjectionWriteError(f"{path}: is a folder; give a file name such as {path / 'W.safetensors'}.")
    return parent


def _write_failed(path: Path, parent: Path, e: OSError) -> ProjectionWriteError:
    import errno

    why = e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some space (or raise the file-size limit), or write somewhere else (-o)"
    else:
        fix = "choose an output location (-o) in a folder you can write to"
    return ProjectionWriteError(f"{path}: cannot write the projection file in {parent} ({why}); nothing was "
                                f"written. Fix: {fix}.")


def _temp_beside(path: Path, suffix: str) -> tuple[Path, str]:
    """(parent, name of a new empty temporary file next to `path`); ProjectionWriteError if the folder
    is missing or does not accept a new file."""
    parent = _check_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=parent)
    except OSError as e:
        raise _write_failed(path, parent, e) from e
    os.close(fd)
    return parent, tmp


def check_writable(path: str | os.PathLike) -> Path:
    """Fail fast, before any long work: raise ProjectionWriteError unless a file can be created at `path`
    (its folder exists and accepts a new file; `path` is not a folder). Creates and removes a probe file."""
    path = Path(path)
    _, tmp = _temp_beside(path, ".probe")
    try:
        os.unlink(tmp)
    except OSError:
        pass
    return path


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    """Call `write_fn(tmp_path)` on a temp file next to `path`, fsync it, then rename it over `path`.
    Nothing is left behind if anything fails; OS errors (unwritable folder, disk full, file too large)
    become a ProjectionWriteError naming `path`."""
    path = Path(path)
    parent, tmp = _temp_beside(path, ".tmp")
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, ProjectionError):
            raise _write_failed(path, parent, e) from e
        raise
    return path


def _hash_of(x) -> str | None:
    if x is None:
        return None
    if isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x):
        return x  # already a content hash
    from .tokens import load_tokenizer

    return load_tokenizer(x).content_hash


try:  # numba is a hard dependency; the guard only keeps `import xtok.projection` cheap to reason about
    from numba import njit
except ImportError:  # pragma: no cover
    njit = None


def _project_kernel_py(ids, probs, indptr, indices, data, n_cols, max_row_nnz, K, pad_id, out_ids, out_p):
    P, k = ids.shape
    cap = max(1, max_row_nnz * k)
    buf_id = np.empty(cap, np.int64)
    buf_p = np.empty(cap, np.float64)
    seen_pos = np.full(n_cols, -1, np.int64)  # student id -> last position that used it
    seen_slot = np.empty(n_cols, np.int64)
    for p in range(P):
        m = 0
        for j in range(k):  # gather + merge duplicates in O(entries)
            t = ids[p, j]
            if t < 0:
                continue
            w = np.float64(probs[p, j])
            for e in range(indptr[t], indptr[t + 1]):
                sid = indices[e]
                v = data[e] * w
                if seen_pos[sid] == p:
                    buf_p[seen_slot[sid]] += v
                else:
                    seen_pos[sid] = p
                    seen_slot[sid] = m
                    buf_id[m] = sid
                    buf_p[m] = v
                    m += 1
        # shell sort by (prob desc, id asc): no allocation, fast for the few hundred entries here
        gap = 1
        while gap < m // 3:
            gap = 3 * gap + 1
        while gap >= 1:
            for a in range(gap, m):
                ci, cp = buf_id[a], buf_p[a]
                b = a
                while b >= gap and (buf_p[b - gap] < cp or (buf_p[b - gap] == cp and buf_id[b - gap] > ci)):
                    buf_id[b] = buf_id[b - gap]
                    buf_p[b] = buf_p[b - gap]
                    b -= gap
                buf_id[b] = ci
                buf_p[b] = cp
            gap //= 3
        oid, op = buf_id, buf_p
        for q in range(K):
            if q < m:
                out_ids[p, q] = oid[q]
                out_p[p, q] = op[q]
            else:
                out_ids[p, q] = pad_id
                out_p[p, q] = 0


_project_kernel = njit(cache=True, nogil=True)(_project_kernel_py) if njit is not None else _project_kernel_py


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
        self.device = device
        self._torch_cache: dict = {}
        self._max_row_nnz = int(np.diff(self.indptr).max()) if self.shape[0] else 0

    def __getstate__(self):  # picklable for DataLoader workers; torch views are rebuilt lazily
        d = dict(self.__dict__)
        d["_torch_cache"] = {}
        return d

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_coo(cls, rows, cols, values, shape, **kw) -> "ProjectionMatrix":
        """From COO triplets (any order; duplicates summed)."""
        rows = np.asarray(rows, np.int64)
        cols = np.asarray(cols, np.int64)
        values = np.asarray(values, np.float32)
        if rows.size and (rows.min() < 0 or rows.max() >= shape[0] or cols.min() < 0 or cols.max() >= shape[1]):
            raise ProjectionError(f"COO indices out of range for shape {tuple(shape)}")
        order = np.lexsort((cols, rows))
        rows, cols, values = rows[order], cols[order], values[order]
        if rows.size > 1:  # sum duplicates
            new = np.ones(rows.size, bool)
            new[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
            if not new.all():
                grp = np.cumsum(new) - 1
                values = np.bincount(grp, weights=values).astype(np.float32)
                rows, cols = rows[new], cols[new]
        indptr = np.zeros(shape[0] + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
        return cls(indptr, cols.astype(np.int32), values, shape, **kw)

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

    def decomposition_lengths(self) -> np.ndarray:
        return np.diff(self.decomp_offsets)

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
        """Numba kernel (releases the GIL): CSR row gather, duplicate merge, sort, pad."""
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
        probs2 = probs2.astype(np.float64, copy=False)  # one kernel specialisation (compiled once, cached)
        if ids2.size and int(ids2.max()) >= self.shape[0]:
            raise IndexError(f"teacher id {int(ids2.max())} out of range for a W with {self.shape[0]} rows")
        out_ids = np.empty((ids2.shape[0], K), np.int64)
        out_p = np.empty((ids2.shape[0], K), np.float64)
        _project_kernel(ids2, probs2, self.indptr, self.indices, self.data, self.shape[1], self._max_row_nnz, K,
                        int(pad_id), out_ids, out_p)
        out_p = out_p.astype(out_dtype, copy=False)
        out_ids, out_p = out_ids.reshape(*lead, K), out_p.reshape(*lead, K)
        if is_t:
            import torch

            return torch.from_numpy(out_ids), torch.from_numpy(out_p)
        return out_ids, out_p

    def _project_torch(self, topk_ids, topk_probs, K, pad_id):
        """Same result with torch ops on the inputs' (accelerator) device."""
        is_np = False
        import torch

        ids = torch.from_numpy(np.asarray(topk_ids)) if is_np else topk_ids
        probs = torch.from_numpy(np.asarray(topk_probs)) if is_np else topk_probs
        if ids.shape != probs.shape:
            raise ValueError(f"topk_ids {tuple(ids.shape)} and topk_probs {tuple(probs.shape)} differ in shape")
        lead, k = tuple(ids.shape[:-1]), int(ids.shape[-1]) if ids.dim() else 1
        K = self.default_k(k) if K is None else int(K)
        dev = ids.device
        ids2 = ids.reshape(-1, k).long()
        probs2 = probs.reshape(-1, k)
        if not probs2.is_floating_point():
            probs2 = probs2.float()
        P = ids2.shape[0]
        if ids2.numel() and int(ids2.max()) >= self.shape[0]:
            raise IndexError(f"teacher id {int(ids2.max())} out of range for a W with {self.shape[0]} rows")
        indptr, indices, data = self._torch_arrays(dev)
        valid = ids2 >= 0
        safe = ids2.clamp_min(0)
        start = indptr[safe]
        cnt = torch.where(valid, indptr[safe + 1] - start, torch.zeros_like(start))
        m = max(1, self._max_row_nnz)
        if m == 1:
            has = cnt > 0
            pos = start.clamp_max(max(indices.numel() - 1, 0))
            sid = torch.where(has, indices[pos] if indices.numel() else safe, torch.full_like(safe, -1))
            sp = torch.where(has, (data[pos] if indices.numel() else probs2.new_zeros(())).to(probs2.dtype) * probs2,
                             probs2.new_zeros(()))
        else:
            j = torch.arange(m, device=dev)
            has = j.view(1, 1, m) < cnt.unsqueeze(-1)  # [P, k, m]
            pos = (start.unsqueeze(-1) + j).clamp_max(max(indices.numel() - 1, 0))
            sid = torch.where(has, indices[pos], torch.full_like(pos, -1)).reshape(P, k * m)
            sp = torch.where(has, data[pos].to(probs2.dtype) * probs2.unsqueeze(-1),
                             probs2.new_zeros(())).reshape(P, k * m)
        # merge duplicate student ids per position: sort by id, segment-sum
        big = torch.iinfo(torch.int64).max
        key = torch.where(sid >= 0, sid, torch.full_like(sid, big))
        skey, order = torch.sort(key, dim=1)
        sprob = torch.gather(sp, 1, order)
        L = skey.shape[1]
        new = torch.ones_like(skey, dtype=torch.bool)
        if L > 1:
            new[:, 1:] = skey[:, 1:] != skey[:, :-1]
        grp = torch.cumsum(new.long(), dim=1) - 1
        merged_p = torch.zeros_like(sprob).scatter_add_(1, grp, sprob)
        merged_id = torch.full_like(skey, big).scatter_(1, grp, skey)
        real = merged_id != big
        merged_p = torch.where(real, merged_p, merged_p.new_full((), -1.0))  # pads sort last
        top_p, top_i = torch.sort(merged_p, dim=1, descending=True, stable=True)
        top_id = torch.gather(merged_id, 1, top_i)
        if K <= L:
            top_p, top_id = top_p[:, :K], top_id[:, :K]
        else:
            top_p = torch.cat([top_p, top_p.new_full((P, K - L), -1.0)], 1)
            top_id = torch.cat([top_id, top_id.new_full((P, K - L), big)], 1)
        pad = top_p < 0
        out_id = torch.where(pad, torch.full_like(top_id, pad_id), top_id).reshape(*lead, K)
        out_p = torch.where(pad, top_p.new_zeros(()), top_p).reshape(*lead, K)
        if is_np:
            return out_id.numpy(), out_p.numpy()
        return out_id, out_p

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
            meta[k] = v if isinstance(v, str) else json.dumps(v)
        data = st_save(tensors, metadata=meta)  # serialised here, written by Python I/O (real OSErrors)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu", teacher=None, student=None,
             check_hashes: bool = True) -> "ProjectionMatrix":
        """Load a W saved by `save` / `xtok build-projection`. `teacher`/`student` (Tokenizer, spec or
        content hash), when given and `check_hashes`, must be the tokenizers W was built for."""
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
        meta.pop("format", None)
        meta.pop("format_version", None)
        shape, decomp = _validate_tensors(path, t, meta)
        try:
            W = cls.from_coo(t["indices"][0], t["indices"][1], t["values"], shape, decomp_offsets=decomp[0],
                             decomp_ids=decomp[1], meta=meta, device=device)
        except ProjectionError as e:
            raise ProjectionError(f"{path}: {e}; rebuild the file.") from e
        if check_hashes:
            W.check_tokenizers(teacher, student, path=path)
        return W

    def __repr__(self):
        return (f"ProjectionMatrix({self.meta.get('teacher_name', '?')} -> {self.meta.get('student_name', '?')}, "
                f"shape={self.shape}, nnz={self.nnz})")


def _validate_tensors(path: Path, t: dict, meta: dict):
    """Check every tensor and the metadata of a loaded file against format_version 1 (dtype, rank,
    lengths, index ranges, offsets); parse `options`/`stats` in `meta` in place. Returns (shape, (decomp_offsets,
    decomp_ids) or (None, None)). Raises ProjectionError naming the file and the field."""
    fix = "the file is malformed; rebuild it with `xtok build-projection`"

    def bad(field, what):
        return ProjectionError(f"{path}: {field} {what}; {fix}.")

    missing = {"indices", "values", "shape"} - set(t)
    if missing:
        raise ProjectionError(f"{path}: missing tensors {sorted(missing)}; {fix}.")
    if ("decomp_offsets" in t) != ("decomp_ids" in t):
        have, lack = ("decomp_offsets", "decomp_ids") if "decomp_offsets" in t else ("decomp_ids", "decomp_offsets")
        raise bad(f"tensor {have!r}", f"is present without {lack!r} (the decompositions need both)")
    for name, (dtype, rank) in _TENSOR_SPEC.items():
        if name not in t:
            continue
        a = t[name]
        if a.dtype != dtype:
            raise bad(f"tensor {name!r}", f"has dtype {a.dtype}, expected {np.dtype(dtype).name}")
        if a.ndim != rank:
            raise bad(f"tensor {name!r}", f"has shape {list(a.shape)}, expected rank {rank}")
    for k in ("options", "stats"):
        if k in meta:
            try:
                meta[k] = json.loads(meta[k])
            except json.JSONDecodeError as e:
                raise bad(f"metadata {k!r}", f"is not JSON ({e})") from e
            if not isinstance(meta[k], dict):
                raise bad(f"metadata {k!r}", f"is a JSON {type(meta[k]).__name__}, expected an object")
    sh = t["shape"]
    if sh.shape != (2,):
        raise bad("tensor 'shape'", f"has {sh.size} entries, expected 2 (V_teacher, V_student)")
    V_t, V_s = int(sh[0]), int(sh[1])
    if not (1 <= V_t <= _INT32_MAX and 1 <= V_s <= _INT32_MAX):
        raise bad("tensor 'shape'", f"= {[V_t, V_s]}: vocabulary sizes must be in [1, {_INT32_MAX}]")
    for role, V in (("teacher", V_t), ("student", V_s)):
        mv = meta.get(f"{role}_vocab")
        if mv is not None and str(mv) != str(V):
            raise bad(f"metadata '{role}_vocab'", f"= {mv!r} disagrees with tensor 'shape' ({V})")
    idx, vals = t["indices"], t["values"]
    if idx.shape[0] != 2:
        raise bad("tensor 'indices'", f"has shape {list(idx.shape)}, expected [2, nnz] (rows, cols)")
    nnz = idx.shape[1]
    if vals.shape != (nnz,):
        raise bad("tensor 'values'", f"has {vals.size} entries but 'indices' has {nnz} (nnz)")
    if nnz:
        for r, (name, V) in enumerate((("row", V_t), ("column", V_s))):
            lo, hi = int(idx[r].min()), int(idx[r].max())
            if lo < 0 or hi >= V:
                raise bad("tensor 'indices'", f"holds {name} ids in [{lo}, {hi}], outside [0, {V}) set by 'shape'")
        fin = np.isfinite(vals)
        if not fin.all():
            raise bad("tensor 'values'", f"holds {int((~fin).sum())} non-finite weights (nan/inf)")
        if float(vals.min()) < 0:
            raise bad("tensor 'values'", f"holds negative weights (min {float(vals.min()):.4g})")
    if "decomp_offsets" not in t:
        return (V_t, V_s), (None, None)
    off, ids = t["decomp_offsets"], t["decomp_ids"]
    if off.shape != (V_t + 1,):
        raise bad("tensor 'decomp_offsets'", f"has {off.size} entries, expected V_teacher + 1 = {V_t + 1}")
    if off[0] != 0:
        raise bad("tensor 'decomp_offsets'", f"starts at {int(off[0])}, expected 0")
    if bool((np.diff(off) < 0).any()):
        i = int(np.nonzero(np.diff(off) < 0)[0][0])
        raise bad("tensor 'decomp_offsets'", f"decreases at teacher id {i} ({int(off[i])} -> {int(off[i + 1])}); "
                                             "offsets must be non-decreasing")
    if off[-1] != ids.size:
        raise bad("tensor 'decomp_offsets'", f"ends at {int(off[-1])} but 'decomp_ids' has {ids.size} entries")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V_s:
            raise bad("tensor 'decomp_ids'", f"holds student ids in [{lo}, {hi}], outside [0, {V_s}) set by 'shape'")
    return (V_t, V_s), (off, ids)


def torch_sparse_mm(csr, dense):
    """dense [N, V_t] @ W [V_t, V_s] with W sparse: computed as (W^T @ dense^T)^T."""
    return (csr.t().to_sparse_coo() @ dense.t().to(csr.dtype)).t()


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")
