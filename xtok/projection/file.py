"""Projection files: writing them atomically and validating what is read back.

`atomic_write` / `check_writable` (temp file beside the output + fsync + rename; clear errors for a
missing or unwritable folder or a full disk), the format constants and `validate_tensors`, the full
check of a loaded file against format_version 1 (see docs/projection.md)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["FORMAT", "FORMAT_VERSION", "CHECKSUM_KEY", "ProjectionError", "ProjectionWriteError", "atomic_write",
           "check_writable", "validate_tensors", "content_checksum", "check_content", "check_normalized",
           "NORMALIZE_TOL"]

FORMAT = "xtok-projection"
FORMAT_VERSION = "1"
CHECKSUM_KEY = "content_sha256"  # metadata: sha256 of the tensors and the other metadata (`content_checksum`)
NORMALIZE_TOL = 1e-4             # |row sum - 1| allowed for a non-empty row of a W whose options say normalize

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


def _new_file_mode() -> int:
    """The mode a new file gets from open(): 0o666 less the process umask."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    """Call `write_fn(tmp_path)` on a temp file next to `path`, fsync it, then rename it over `path`.
    Nothing is left behind if anything fails; OS errors (unwritable folder, disk full, file too large)
    become a ProjectionWriteError naming `path`. The file gets the mode of any new file (0o666 less the
    umask, like a store's files), not the 0o600 of a temporary file."""
    path = Path(path)
    parent, tmp = _temp_beside(path, ".tmp")
    try:
        write_fn(tmp)
        os.chmod(tmp, _new_file_mode())
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


def validate_tensors(path: Path, t: dict, meta: dict):
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


def content_checksum(tensors: dict, meta: dict) -> str:
    """sha256 of a projection file's content: every tensor (name, dtype, shape, little-endian bytes) and
    every metadata string but the checksum itself, in name order. Written by `save`, checked by `load`."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        h.update(f"tensor\0{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
        h.update(a.tobytes() if a.size == 0 or a.ndim == 0 else memoryview(a).cast("B"))
    for k in sorted(meta):
        if k != CHECKSUM_KEY:
            h.update(f"meta\0{k}\0{meta[k]}\0".encode())
    return h.hexdigest()


def check_content(path: Path, t: dict, meta: dict) -> bool:
    """Compare the file's recorded content checksum (metadata `content_sha256`) with its tensors and
    metadata as read (raw strings, before `validate_tensors` parses them); ProjectionError on a mismatch.
    False when the file records none (written before xtok recorded it): nothing to check."""
    want = meta.get(CHECKSUM_KEY)
    if want is None:
        return False
    got = content_checksum(t, meta)
    if got != want:
        raise ProjectionError(
            f"{path}: its content does not match the checksum recorded when it was written (metadata "
            f"{CHECKSUM_KEY} {want[:16]}…, content {got[:16]}…): weights or metadata were changed or corrupted "
            "after it was saved. Rebuild it with `xtok build-projection`; if you edited it on purpose, load it "
            "with ProjectionMatrix.load(path, verify=False) and save it again (`.save(path)` records a new "
            "checksum).")
    return True


def check_normalized(path: Path, indices: np.ndarray, values: np.ndarray, n_rows: int, meta: dict):
    """When the metadata's options say `normalize`, every non-empty row must sum to 1 (within
    NORMALIZE_TOL): ProjectionError naming the worst row otherwise."""
    opts = meta.get("options")
    if not (isinstance(opts, dict) and opts.get("normalize") is True) or indices.shape[1] == 0:
        return
    rows = indices[0].astype(np.int64)
    sums = np.bincount(rows, weights=values.astype(np.float64), minlength=n_rows)
    nonempty = np.bincount(rows, minlength=n_rows) > 0
    off = np.abs(sums - 1.0) > NORMALIZE_TOL
    off &= nonempty
    if off.any():
        worst = int(np.argmax(np.where(off, np.abs(sums - 1.0), -1.0)))
        raise ProjectionError(
            f"{path}: metadata options.normalize is true but {int(off.sum())} non-empty rows do not sum to 1 "
            f"(teacher id {worst} sums to {sums[worst]:.6g}): its weights were changed after it was built. "
            "Rebuild it with `xtok build-projection`; if the edit is intended, renormalise it "
            "(`python -m projection_tools.cut W -o W`) or set W.meta['options']['normalize'] = False and save it.")
