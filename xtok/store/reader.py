"""Reading a teacher store: `TeacherStore`, random access by example key or index."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np

from .codec import FORMAT_VERSION, PackedExample, TeacherExample, code_probs, decode_example
from .fs import StoreFS
from .writer import StoreError

__all__ = ["TeacherStore"]


class TeacherStore:
    """Random access to a teacher store: `store[key]` or `store[i]` -> TeacherExample, O(1): a key ->
    (shard, row) index built from the manifest, shards memory-mapped, one ~512 KiB row group decoded
    per miss (small LRU cache). Iteration goes shard by shard. Safe to pickle (reopens lazily)."""

    def __init__(self, path, cache_row_groups: int = 8):
        self.path = str(path)
        self.io = StoreFS(self.path)
        try:
            raw = self.io.read_bytes("manifest.json")
        except (FileNotFoundError, OSError) as e:
            hint = (" The extraction has not finished: run the same `xtok extract` command again (it resumes)."
                    if self.io.exists("parts") else " Point it at the --output folder of `xtok extract`.")
            raise StoreError(f"{self.path}: no manifest.json ({getattr(e, 'strerror', e)}).{hint}") from None
        try:
            self.manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.path}/manifest.json: not valid JSON ({e}); re-run `xtok extract` to rewrite it.")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{self.path}: store format {self.manifest.get('format_version')} but this xtok reads "
                             f"{FORMAT_VERSION}; re-extract or use a matching xtok version.")
        self.top_k = int(self.manifest["top_k"])
        self.sample_tail = int(self.manifest.get("sample_tail") or 0)
        self.vocab_size = int(self.manifest["vocab_size"])
        shards = self.manifest["shards"]
        self._files = [s["file"] for s in shards]
        self._keys: list[str] = [k for s in shards for k in s["keys"]]
        counts = np.array([s["n"] for s in shards], dtype=np.int64)
        self._shard_start = np.concatenate([[0], np.cumsum(counts)])
        self._index = {k: i for i, k in enumerate(self._keys)}
        self._cache_n = cache_row_groups
        self._table = None  # code_probs(), for packed()
        self._init_runtime()

    def _init_runtime(self):
        self._pf: dict[int, Any] = {}
        self._rg_start: dict[int, np.ndarray] = {}
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        d = dict(self.__dict__)
        for k in ("_pf", "_rg_start", "_cache", "_lock"):
            d.pop(k, None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._init_runtime()

    # -- access ------------------------------------------------------------------------------
    def __len__(self):
        return len(self._keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key):
        return key in self._index

    @property
    def temperature(self):
        return self.manifest.get("temperature")

    def index_of(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"example key {key!r} is not in the store {self.path}") from None

    def __getitem__(self, item) -> TeacherExample:
        if isinstance(item, (int, np.integer)):
            i = int(item)
            if i < 0:
                i += len(self)
            if not 0 <= i < len(self):
                raise IndexError(f"index {item} out of range for a store of {len(self)} examples")
        else:
            i = self.index_of(str(item))
        cols, r = self._row_group(i)
        return decode_example(cols, r, self.top_k, self.sample_tail, self.vocab_size)

    def get(self, key, default=None):
        return self[key] if key in self._index else default

    def __iter__(self) -> Iterator[TeacherExample]:
        for i in range(len(self)):
            yield self[i]

    def _parquet(self, s: int):
        pf = self._pf.get(s)
        if pf is None:
            try:
                pf = self.io.open_parquet(self._files[s])
            except (OSError, FileNotFoundError) as e:
                raise StoreError(f"{self.path}/{self._files[s]}: cannot open shard ({e}); the store is damaged, "
                                 "re-run `xtok extract` with the same options to rewrite missing shards.") from None
            md = pf.metadata
            self._rg_start[s] = np.concatenate([[0], np.cumsum([md.row_group(g).num_rows
                                                                for g in range(md.num_row_groups)])])
            self._pf[s] = pf
        return pf

    def _row_group(self, i: int) -> tuple[dict, int]:
        """(columns of the row group holding global example i, i's row in it), via the LRU cache."""
        s = int(np.searchsorted(self._shard_start, i, side="right") - 1)
        r = i - int(self._shard_start[s])
        with self._lock:
            pf = self._parquet(s)
            starts = self._rg_start[s]
            g = int(np.searchsorted(starts, r, side="right") - 1)
            cols = self._cache.get((s, g))
            if cols is None:
                t = pf.read_row_group(g)
                cols = {n: t.column(n).combine_chunks() for n in t.column_names}
                self._cache[(s, g)] = cols
                if len(self._cache) > self._cache_n:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end((s, g))
        return cols, r - int(starts[g])

    def packed(self, key) -> PackedExample | None:
        """Example `key` (or global index) with its top-k rows still packed (`PackedExample`: decode just
        the rows you need with `.decode_rows`), or None when the key is absent. What the collator reads."""
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not 0 <= i < len(self):
                return None
        else:
            i = self._index.get(str(key))
            if i is None:
                return None
        cols, r = self._row_group(i)
        if self._table is None:
            self._table = code_probs()
        return PackedExample(cols, r, self.top_k, self.sample_tail, self.vocab_size, self._table)

    # -- files -------------------------------------------------------------------------------
    @property
    def shard_files(self) -> list[str]:
        """The shard files (relative to the store folder), in example order."""
        return list(self._files)

    def shard_bytes(self) -> list[int]:
        """Size on disk of every shard file, in `shard_files` order."""
        return [self.io.size(f) for f in self._files]

    def __repr__(self):
        return (f"TeacherStore({self.path!r}, examples={len(self)}, model={self.manifest.get('model')!r}, "
                f"top_k={self.top_k}, sample_tail={self.sample_tail})")
