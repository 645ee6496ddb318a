"""Store folders on the local disk or any fsspec URL (`StoreFS`): the file operations the store's
writer and reader need, with atomic writes."""
from __future__ import annotations

import os
import uuid

__all__ = ["StoreFS"]


def _resolve(path: str):
    path = str(path)
    if "://" not in path:
        return None, os.path.abspath(os.path.expanduser(path))
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return fs, root


def _join(*a):
    return "/".join(s.rstrip("/") for s in a)


class StoreFS:
    """A store folder on the local disk or any fsspec URL: paths relative to its root, atomic writes
    (temporary name + rename), parquet files memory-mapped locally."""

    def __init__(self, path):
        self.url = str(path)
        self.fs, self.root = _resolve(path)

    def p(self, *rel):
        return _join(self.root, *rel)

    def exists(self, rel=""):
        p = self.p(rel) if rel else self.root
        return os.path.exists(p) if self.fs is None else self.fs.exists(p)

    def makedirs(self, rel=""):
        if self.fs is None:
            os.makedirs(self.p(rel) if rel else self.root, exist_ok=True)
        else:
            self.fs.makedirs(self.p(rel) if rel else self.root, exist_ok=True)

    def listdir(self, rel):
        if not self.exists(rel):
            return []
        if self.fs is None:
            return sorted(os.listdir(self.p(rel)))
        return sorted(x.rstrip("/").rsplit("/", 1)[-1] for x in self.fs.ls(self.p(rel), detail=False))

    def read_bytes(self, rel) -> bytes:
        if self.fs is None:
            with open(self.p(rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.p(rel))

    def write_atomic(self, rel, data: bytes):
        """Write to a unique temporary name next to the target, then rename over it."""
        dst = self.p(rel)
        tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
        if self.fs is None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
        else:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, dst)

    def size(self, rel) -> int:
        """Size in bytes of the file at `rel`."""
        return os.path.getsize(self.p(rel)) if self.fs is None else int(self.fs.size(self.p(rel)))

    def remove(self, rel):
        if self.fs is None:
            os.remove(self.p(rel))
        else:
            self.fs.rm(self.p(rel))

    def remove_root(self):
        """Remove the whole folder and everything in it (best effort: errors are ignored)."""
        import shutil

        try:
            if self.fs is None:
                shutil.rmtree(self.root, ignore_errors=True)
            elif self.fs.exists(self.root):
                self.fs.rm(self.root, recursive=True)
        except Exception:  # noqa: BLE001 - the error that led here is what matters
            pass

    def open_parquet(self, rel):
        return self.open_parquet_mapped(rel)[0]

    def open_parquet_mapped(self, rel):
        """(pyarrow ParquetFile, the memory map under it or None for an fsspec URL). Local files are
        memory-mapped and read without pre-buffering (nothing to prefetch from a map)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.fs is None:
            mm = pa.memory_map(self.p(rel), "r")
            return pq.ParquetFile(mm, pre_buffer=False), mm
        return pq.ParquetFile(self.fs.open(self.p(rel), "rb")), None

    def read_range(self, rel, start: int, end: int, mm=None):
        """Bytes [start, end) of the file at `rel` (a zero-copy view when `mm`, its memory map, is given)."""
        if mm is not None:  # seek + read_buffer is zero-copy on a memory map (read_at copies); not thread-safe
            mm.seek(start)
            return memoryview(mm.read_buffer(end - start))
        if self.fs is None:
            with open(self.p(rel), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        return self.fs.read_block(self.p(rel), start, end - start)

    def sha256(self, rel, block: int = 1 << 24) -> str:
        """sha256 hex digest of the whole file at `rel`, read in blocks."""
        import hashlib

        h = hashlib.sha256()
        with (open(self.p(rel), "rb") if self.fs is None else self.fs.open(self.p(rel), "rb")) as f:
            while True:
                b = f.read(block)
                if not b:
                    break
                h.update(b)
        return h.hexdigest()
