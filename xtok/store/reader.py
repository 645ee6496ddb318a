"""Reading a teacher store: `TeacherStore`, random access by example key or index."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np

from .codec import FORMAT_VERSION, PACKED_COLUMNS, PackedExample, TeacherExample, code_probs, decode_example
from .fs import StoreFS
from .integrity import row_group_ranges, xxh3_hex
from .writer import DamagedShardError, StoreError, manifest_checksum

__all__ = ["TeacherStore", "DEFAULT_CACHE_BYTES"]

DEFAULT_CACHE_BYTES = 128 << 20  # decoded row groups kept per store (LRU by bytes)


class TeacherStore:
    """Random access to a teacher store: `store[key]` or `store[i]` -> TeacherExample, O(1): a key ->
    (shard, row) index built from the manifest, shards memory-mapped, one ~512 KiB row group decoded
    per miss. Iteration goes shard by shard. Safe to pickle (reopens lazily).

    Decoded row groups are kept in an LRU cache of at most `cache_bytes` (default 128 MiB: hundreds of
    row groups, so every example of a batch stays decoded however large the batch) and, when given, at
    most `cache_row_groups` of them. `packed()` reads only the columns the collator needs.

    Integrity: where the manifest records checksums (docs/formats.md, "Integrity"), a shard's size is
    checked when it is opened and each row group's xxh3 before it is decoded (`verify=False` skips
    the latter); every example read must carry the key the manifest says. A shard that fails any of
    this, or that pyarrow cannot read, raises `DamagedShardError` naming the shard file, the example
    key and the fix. Stores written before checksums existed are read unverified."""

    def __init__(self, path, cache_bytes: int = DEFAULT_CACHE_BYTES, cache_row_groups: int | None = None,
                 verify: bool = True):
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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{self.path}/manifest.json: not valid JSON ({e}); re-run the same `xtok extract` "
                             "command to rewrite it.") from None
        want = self.manifest.get("manifest_sha256") if isinstance(self.manifest, dict) else None
        if want is not None and want != manifest_checksum(self.manifest):
            raise StoreError(f"{self.path}/manifest.json: its content does not match its manifest_sha256 (edited or "
                             "damaged after it was written); re-run the same `xtok extract` command to rewrite it "
                             "(the shards are kept).")
        if not isinstance(self.manifest, dict) or self.manifest.get("format_version") != FORMAT_VERSION:
            got = self.manifest.get("format_version") if isinstance(self.manifest, dict) else None
            raise StoreError(f"{self.path}: store format {got} but this xtok reads "
                             f"{FORMAT_VERSION}; re-extract or use a matching xtok version.")
        try:
            self.top_k = int(self.manifest["top_k"])
            self.sample_tail = int(self.manifest.get("sample_tail") or 0)
            self.vocab_size = int(self.manifest["vocab_size"])
            shards = self.manifest["shards"]
            self._files = [s["file"] for s in shards]
            self._keys: list[str] = [k for s in shards for k in s["keys"]]
            counts = np.array([s["n"] for s in shards], dtype=np.int64)
            if any(len(s["keys"]) != s["n"] for s in shards):
                raise ValueError("a shard's 'n' differs from the number of its 'keys'")
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{self.path}/manifest.json: malformed ({type(e).__name__}: {e}); re-run the same "
                             "`xtok extract` command to rewrite it.") from None
        # checksums per shard (None: a store written before they existed; read unverified)
        self._sums = [{"bytes": int(s["bytes"]), "row_group_xxh3": list(s["row_group_xxh3"])}
                      if "bytes" in s and "row_group_xxh3" in s else None for s in shards]
        self._shard_start = np.concatenate([[0], np.cumsum(counts)])
        self._index = {k: i for i, k in enumerate(self._keys)}
        self.cache_bytes = int(cache_bytes)
        self.cache_row_groups = None if cache_row_groups is None else max(1, int(cache_row_groups))
        self.verify = bool(verify)
        self._table = None  # code_probs(), for packed()
        self._init_runtime()

    @property
    def checksummed(self) -> bool:
        """True when the manifest records checksums for every shard (reads are verified)."""
        return all(s is not None for s in self._sums)

    def _init_runtime(self):
        self._pf: dict[int, Any] = {}
        self._mm: dict[int, Any] = {}
        self._rg_start: dict[int, np.ndarray] = {}
        self._cols: dict[int, tuple[list[str], list[str]]] = {}
        self._verified: set = set()
        self._cache: OrderedDict = OrderedDict()
        self._cache_used = 0
        self._lock = threading.Lock()

    def __getstate__(self):
        d = dict(self.__dict__)
        for k in ("_pf", "_mm", "_rg_start", "_cols", "_verified", "_cache", "_cache_used", "_lock"):
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
        cols, r = self._row_group(i, full=True)
        return self._decoded(i, lambda: decode_example(cols, r, self.top_k, self.sample_tail, self.vocab_size))

    def get(self, key, default=None):
        return self[key] if key in self._index else default

    def __iter__(self) -> Iterator[TeacherExample]:
        for i in range(len(self)):
            yield self[i]

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
        cols, r = self._row_group(i, full=False)
        if self._table is None:
            self._table = code_probs()
        return self._decoded(i, lambda: PackedExample(cols, r, self.top_k, self.sample_tail, self.vocab_size,
                                                      self._table))

    # -- shards and row groups ---------------------------------------------------------------
    def _where(self, i: int) -> tuple[int, int]:
        """(shard, row in the shard) of global example i."""
        s = int(np.searchsorted(self._shard_start, i, side="right") - 1)
        return s, i - int(self._shard_start[s])

    def _damaged(self, s: int, why: str, key: str | None = None, group: int | None = None) -> DamagedShardError:
        f = self._files[s]
        what = (f"cannot read example {key!r}" + (f" (row group {group})" if group is not None else "") + ": "
                if key is not None else "")
        return DamagedShardError(
            f"{self.path}/{f}: {what}{why}. The shard is damaged: delete it and re-run the same `xtok extract` "
            f"command (it rewrites missing shards and keeps the others); `xtok inspect --verify {self.path}` "
            "checks every shard.", f, key)

    def _decoded(self, i: int, decode):
        """decode() of example i; a row that does not decode is a damaged shard, named."""
        try:
            return decode()
        except (ValueError, IndexError, TypeError, OverflowError, KeyError) as e:
            s, r = self._where(i)
            why = e if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise self._damaged(s, f"its row does not decode ({why})", self._keys[i]) from None

    def _parquet(self, s: int, key: str | None = None):
        """The opened shard s (parquet file over a memory map for local stores), its size checked against
        the manifest and its row counts against the manifest's."""
        pf = self._pf.get(s)
        if pf is not None:
            return pf
        f = self._files[s]
        sums = self._sums[s]
        try:
            size = self.io.size(f)
        except (OSError, FileNotFoundError) as e:
            raise self._damaged(s, f"the file is missing or unreadable ({getattr(e, 'strerror', None) or e})", key) from None
        if sums is not None and size != sums["bytes"]:
            raise self._damaged(s, f"it is {size} bytes but manifest.json records {sums['bytes']} (truncated or "
                                   "overwritten)", key)
        try:
            pf, mm = self.io.open_parquet_mapped(f)
            md = pf.metadata
            n_rows = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            names = pf.schema_arrow.names
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise self._damaged(s, f"pyarrow cannot read it ({type(e).__name__}: {e})", key) from None
        n = int(self._shard_start[s + 1] - self._shard_start[s])
        if sum(n_rows) != n:
            raise self._damaged(s, f"it holds {sum(n_rows)} rows but manifest.json says {n}", key)
        if sums is not None and len(sums["row_group_xxh3"]) != len(n_rows):
            raise self._damaged(s, f"it has {len(n_rows)} row groups but manifest.json records checksums for "
                                   f"{len(sums['row_group_xxh3'])}", key)
        self._rg_start[s] = np.concatenate([[0], np.cumsum(n_rows)]).astype(np.int64)
        self._cols[s] = ([c for c in PACKED_COLUMNS if c in names], list(names))
        self._mm[s] = mm
        self._pf[s] = pf
        return pf

    def _check_group(self, s: int, g: int, key: str):
        """The row group's stored bytes against the manifest's xxh3 (once per row group and process)."""
        sums = self._sums[s]
        if sums is None or not self.verify or (s, g) in self._verified:
            return
        a, b = row_group_ranges(self._pf[s].metadata, g)[0]
        try:
            data = self.io.read_range(self._files[s], a, b, self._mm[s])
        except Exception as e:  # noqa: BLE001
            raise self._damaged(s, f"its bytes {a}-{b} cannot be read ({type(e).__name__}: {e})", key, g) from None
        got, want = xxh3_hex(data), sums["row_group_xxh3"][g]
        if got != want:
            raise self._damaged(s, f"its bytes do not match the checksum recorded in manifest.json (row group {g}: "
                                   f"xxh3 {got} != {want})", key, g)
        self._verified.add((s, g))

    def _row_group(self, i: int, full: bool) -> tuple[dict, int]:
        """(columns of the row group holding global example i, i's row in it), via the LRU cache; `full`:
        every column (decode_example), else the collator's (PACKED_COLUMNS)."""
        s, r = self._where(i)
        key = self._keys[i]
        with self._lock:
            pf = self._parquet(s, key)
            starts = self._rg_start[s]
            g = int(np.searchsorted(starts, r, side="right") - 1)
            ent = self._cache.get((s, g))
            if ent is None or (full and not ent[2]):
                self._check_group(s, g, key)
                packed_cols, all_cols = self._cols[s]
                want = all_cols if full else packed_cols
                have = ent[0] if ent is not None else {}
                try:
                    t = pf.read_row_group(g, columns=[c for c in want if c not in have], use_threads=False)
                    cols = dict(have)
                    for n in t.column_names:
                        c = t.column(n)
                        cols[n] = c.chunk(0) if c.num_chunks == 1 else c.combine_chunks()
                except Exception as e:  # noqa: BLE001
                    raise self._damaged(s, f"pyarrow cannot read it ({type(e).__name__}: {e})", key, g) from None
                if ent is not None:
                    self._cache_used -= ent[1]
                    del self._cache[(s, g)]
                nbytes = int(t.get_total_buffer_size()) + (ent[1] if ent is not None else 0)
                self._cache[(s, g)] = ent = (cols, nbytes, full or len(want) == len(all_cols))
                self._cache_used += nbytes
                while len(self._cache) > 1 and (self._cache_used > self.cache_bytes or (
                        self.cache_row_groups is not None and len(self._cache) > self.cache_row_groups)):
                    _, old = self._cache.popitem(last=False)
                    self._cache_used -= old[1]
            else:
                self._cache.move_to_end((s, g))
            cols, row = ent[0], r - int(starts[g])
        try:
            stored = cols["key"][row].as_py()
        except (ValueError, IndexError) as e:
            raise self._damaged(s, f"its key column does not decode ({e})", key, g) from None
        if stored != key:
            raise self._damaged(s, f"row {r} holds example {stored!r} where manifest.json says {key!r}", key, g)
        return cols, row

    # -- files -------------------------------------------------------------------------------
    @property
    def shard_files(self) -> list[str]:
        """The shard files (relative to the store folder), in example order."""
        return list(self._files)

    def shard_bytes(self) -> list[int]:
        """Size on disk of every shard file, in `shard_files` order."""
        return [self.io.size(f) for f in self._files]

    def shard_of(self, i: int) -> int:
        """The shard (index into `shard_files`) holding global example i."""
        return self._where(int(i))[0]

    def shard_examples(self, s: int) -> range:
        """The global indices of the examples of shard s."""
        return range(int(self._shard_start[s]), int(self._shard_start[s + 1]))

    def verify_shard(self, s: int, rows: bool = True) -> list[str]:
        """Check shard s as far as the manifest allows: it opens with the recorded size and row counts,
        its whole-file sha256 and every row group's xxh3 equal the recorded ones, and (rows=True) every
        example decodes with the key the manifest gives. Returns what was checked; raises
        DamagedShardError naming the shard (and the example) otherwise. What `xtok inspect --verify`
        runs on every shard."""
        done = []
        with self._lock:
            self._parquet(s)
        rec = self.manifest["shards"][s]
        if "sha256" in rec:
            try:
                got = self.io.sha256(self._files[s])
            except OSError as e:
                raise self._damaged(s, f"it cannot be read ({getattr(e, 'strerror', None) or e})") from None
            if got != rec["sha256"]:
                raise self._damaged(s, f"its sha256 {got} differs from the {rec['sha256']} recorded in manifest.json")
            done.append("sha256")
        if self._sums[s] is not None:
            ex = self.shard_examples(s)
            for g in range(len(self._rg_start[s]) - 1):
                first = ex.start + int(self._rg_start[s][g])  # the row group's first example names it
                with self._lock:
                    self._verified.discard((s, g))
                    self._check_group(s, g, self._keys[first] if first < ex.stop else None)
            done.append("row group checksums")
        if rows:
            for i in self.shard_examples(s):
                self[i]
            done.append("every row decoded")
        return done

    def __repr__(self):
        return (f"TeacherStore({self.path!r}, examples={len(self)}, model={self.manifest.get('model')!r}, "
                f"top_k={self.top_k}, sample_tail={self.sample_tail})")
