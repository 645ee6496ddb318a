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

__all__ = ["FORMAT", "FORMAT_VERSION", "ProjectionError", "ProjectionWriteError", "atomic_write", "check_writable",
           "validate_tensors"]

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
