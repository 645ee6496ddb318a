"""The teacher store: what `xtok extract` writes and the collator reads.

Layout of a store at PATH (a local folder or any fsspec URL):

    PATH/manifest.json                     merged manifest (written last; its presence = store complete)
    PATH/parts/r{rank}of{N}.json           one per writer rank: header + complete flag (+ shard files and counts
                                           when complete); written when the writer opens and when it finishes
    PATH/shards/r{rank}of{N}-{j:05d}.parquet   zstd parquet, one row per example; its schema metadata holds the
                                           writer's header and the shard's record (rank, world, j, n, skip counts)

Every shard is written to a temporary name and renamed into place (atomic): that rename is the whole
commit (O(shard) bytes). A shard file that exists is complete and says with which settings it was made,
so a resumed writer adopts exactly the shards of its own settings and refuses others. The merge reads
the example keys from the shards' `key` columns.

Per example (see docs/formats.md for the byte layout and the error bounds):

    key, text (the rendered text the teacher read), input_ids int32 [T], positions int32 [P],
    topk_ids int32 [P, k] (-1 = padding under top-p), topk_logprobs float32 [P, k],
    tail_mass float32 [P], target_logprob float32 [P], word_start_mass float32 [P],
    tail_ids int32 [P, m] (optional; each stands for tail_mass / m).

Quantisation: top-k log-probs are stored relative to the top-1 entry, d_i = lp_0 - lp_i >= 0, as
uint8 codes on a square-root grid c_i = round(sqrt(d_i) / h) (h = sqrt(D_MAX) / 254, D_MAX = 20 nats,
code 255 = beyond D_MAX), delta-coded along k (codes are monotone). The top-1 code is always 0 and
is not stored. The exact tail mass r = 1 - sum_i p_i (from the full-vocab log-sum-exp) is stored as
float32, and decoding rescales the dequantised top-k probabilities to sum to exactly 1 - r, so
`tail_mass == 1 - sum(exp(topk_logprobs))` holds for what the reader returns.
Ids are packed as 16 low bits + 2 high bits (2.25 bytes per id) for vocabularies <= 262,144,
as uint16 for <= 65,536, and as uint32 above.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = [
    "FORMAT_VERSION", "TeacherExample", "TeacherStore", "StoreWriter", "StoreError", "example_key",
    "quantize_logprobs", "dequantize_logprobs", "pack_ids", "unpack_ids", "encode_example", "merge_manifests",
    "D_MAX", "QSTEP",
]

FORMAT_VERSION = 1
D_MAX = 20.0                      # nats below the top-1 covered by the grid
QSTEP = float(np.sqrt(D_MAX) / 254.0)  # sqrt-grid step: d(c) = (c * QSTEP)^2, c in 0..254; 255 = beyond
_ID_NONE = -1


class StoreError(ValueError):
    """A store that cannot be read or written; the message names the path and the fix."""


# ------------------------------------------------------------------------------------------
# Example keys
# ------------------------------------------------------------------------------------------


def example_key(row: Mapping, key_column: str | None = None) -> str:
    """The key of a dataset row: str(row[key_column]) when given, else the `id` or `key` column
    when present and not None, else sha256 (hex) of the row's content: the `messages` list (or
    `text` string, or {"user", "assistant"} columns) serialised as JSON with sorted keys and
    ensure_ascii=False (a `text` string is hashed as its UTF-8 bytes)."""
    if key_column is not None:
        if key_column not in row or row[key_column] is None:
            raise KeyError(f"key column {key_column!r} missing in row")
        return str(row[key_column])
    for c in ("id", "key"):
        if c in row and row[c] is not None:
            return str(row[c])
    if row.get("messages") is not None:
        content: Any = row["messages"]
    elif row.get("text") is not None:
        content = row["text"]
    else:
        content = {c: row.get(c) for c in ("user", "assistant") if c in row}
    return content_key(content_json(content))


def content_json(content: Any, default=None) -> str:
    """The text a row's content is hashed as (example_key; `xtok extract`'s dataset fingerprint): a
    string as itself, else JSON with sorted keys and ensure_ascii=False. `default` as in json.dumps
    (None: a value JSON cannot hold raises TypeError)."""
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, sort_keys=True,
                                                               default=default)


def content_key(blob: str) -> str:
    """The key of a row keyed by its content: sha256 (hex) of the UTF-8 of its `content_json`."""
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------


def _id_mode(vocab_size: int) -> int:
    """How `pack_ids` packs the ids of a vocabulary: 0 = uint16 (V <= 65536); 1 = 16 low bits (uint16)
    for all ids, then their 2 high bits, four per byte, lowest first (V <= 262144); 2 = uint32. Ids are
    little endian."""
    return 0 if vocab_size <= 1 << 16 else 1 if vocab_size <= 1 << 18 else 2


def pack_ids(ids: np.ndarray, vocab_size: int) -> bytes:
    """Pack non-negative ids < vocab_size (any shape, flattened): uint16 for V <= 65536; 16 low bits +
    2 high bits (4 per byte) for V <= 262144; uint32 above (`_id_mode`). Padding ids (-1) must be mapped
    first."""
    a = np.ascontiguousarray(ids, dtype=np.int64).ravel()
    mode = _id_mode(vocab_size)
    if mode == 0:
        return a.astype("<u2").tobytes()
    if mode == 1:
        lo = (a & 0xFFFF).astype("<u2")
        hi = (a >> 16).astype(np.uint8)
        pad = (-hi.size) % 4
        if pad:
            hi = np.concatenate([hi, np.zeros(pad, np.uint8)])
        h4 = hi.reshape(-1, 4)
        packed = (h4[:, 0] | (h4[:, 1] << 2) | (h4[:, 2] << 4) | (h4[:, 3] << 6)).astype(np.uint8)
        return lo.tobytes() + packed.tobytes()
    return a.astype("<u4").tobytes()


def unpack_ids(buf, n: int, vocab_size: int) -> np.ndarray:
    """Inverse of pack_ids: int32 [n]."""
    b = np.frombuffer(buf, dtype=np.uint8)
    mode = _id_mode(vocab_size)
    if mode == 0:
        return b[: 2 * n].view("<u2").astype(np.int32)
    if mode == 1:
        lo = b[: 2 * n].view("<u2").astype(np.int32)
        packed = b[2 * n:]
        hi = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=1).ravel()[:n].astype(np.int32)
        return lo | (hi << 16)
    return b[: 4 * n].view("<u4").astype(np.int32)


def quantize_logprobs(lp: np.ndarray) -> np.ndarray:
    """lp float [P, k] sorted descending along k -> uint8 codes [P, k] (codes[:, 0] == 0), monotone."""
    lp = np.asarray(lp, dtype=np.float64)
    d = np.maximum(lp[:, :1] - lp, 0.0)
    c = np.rint(np.sqrt(d) / QSTEP)
    c = np.where(np.isfinite(c), np.minimum(c, 255), 255)
    return c.astype(np.uint8)


def _code_nats(codes) -> np.ndarray:
    """d(c) float64: how many nats below the top-1 log-prob code c stands for (the inverse of
    quantize_logprobs' grid; 255: beyond the grid, taken as D_MAX + 4)."""
    c = np.asarray(codes)
    return np.where(c >= 255, D_MAX + 4.0, (c.astype(np.float64) * QSTEP) ** 2)


def dequantize_logprobs(codes: np.ndarray, tail_mass: np.ndarray, n_kept: np.ndarray | None = None) -> np.ndarray:
    """codes uint8 [P, k] + exact tail mass [P] -> float32 log-probs [P, k] whose probabilities sum to
    exactly 1 - tail_mass (entries j >= n_kept are -inf)."""
    rel = -_code_nats(codes)
    if n_kept is not None:
        j = np.arange(codes.shape[1])[None, :]
        rel = np.where(j < n_kept[:, None], rel, -np.inf)
    m = np.log(np.maximum(1.0 - np.asarray(tail_mass, np.float64), 1e-300))
    lse = np.log(np.exp(rel).sum(axis=1))
    return (rel + (m - lse)[:, None]).astype(np.float32)


def _runs(positions: np.ndarray) -> np.ndarray:
    """Sorted positions -> int32 [(start, end)] runs of consecutive values."""
    p = np.asarray(positions, dtype=np.int64)
    if p.size == 0:
        return np.zeros((0, 2), np.int32)
    brk = np.nonzero(np.diff(p) != 1)[0]
    starts = np.concatenate([[p[0]], p[brk + 1]])
    ends = np.concatenate([p[brk] + 1, [p[-1] + 1]])
    return np.stack([starts, ends], axis=1).astype(np.int32)


def _from_runs(runs: np.ndarray) -> np.ndarray:
    if runs.size == 0:
        return np.zeros(0, np.int32)
    lens = runs[:, 1] - runs[:, 0]
    base = np.repeat(runs[:, 0] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return (base + np.arange(int(lens.sum()))).astype(np.int32)


def encode_example(key: str, text: str, input_ids, positions, topk_ids, topk_codes, tail_mass, target_logprob,
                   word_start_mass, vocab_size: int, tail_ids=None, n_kept=None) -> dict:
    """One shard row. topk_codes: uint8 [P, k] from quantize_logprobs (monotone along k)."""
    P, k = topk_codes.shape
    deltas = np.diff(topk_codes.astype(np.int16), axis=1).astype(np.uint8)  # [P, k-1], codes[:, 0] == 0
    tid = np.asarray(topk_ids, dtype=np.int64)
    row = {
        "key": key, "text": text,
        "n_tokens": int(len(input_ids)), "n_positions": int(P),
        "input_ids": pack_ids(input_ids, vocab_size),
        "position_runs": _runs(positions).astype("<i4").tobytes(),
        "topk_ids": pack_ids(np.where(tid < 0, 0, tid), vocab_size),
        "topk_codes": deltas.tobytes(),
        "n_kept": b"" if n_kept is None else np.asarray(n_kept, np.uint16).astype("<u2").tobytes(),
        "tail_mass": np.asarray(tail_mass, "<f4").tobytes(),
        "target_logprob": np.asarray(target_logprob, "<f2").tobytes(),
        "word_start_mass": np.asarray(word_start_mass, "<f2").tobytes(),
        "tail_ids": b"" if tail_ids is None else pack_ids(np.where(np.asarray(tail_ids) < 0, 0, tail_ids), vocab_size),
        "tail_none": b"" if tail_ids is None else np.packbits(np.asarray(tail_ids) < 0).tobytes(),
    }
    return row


_SCHEMA = None


def _schema():
    global _SCHEMA
    if _SCHEMA is None:
        import pyarrow as pa

        b = pa.binary()
        _SCHEMA = pa.schema([("key", pa.string()), ("text", pa.string()), ("n_tokens", pa.int32()),
                             ("n_positions", pa.int32()), ("input_ids", b), ("position_runs", b), ("topk_ids", b),
                             ("topk_codes", b), ("n_kept", b), ("tail_mass", b), ("target_logprob", b),
                             ("word_start_mass", b), ("tail_ids", b), ("tail_none", b)])
    return _SCHEMA


# ------------------------------------------------------------------------------------------
# Decoded example
# ------------------------------------------------------------------------------------------


@dataclass
class TeacherExample:
    key: str
    text: str
    input_ids: np.ndarray        # int32 [T]
    positions: np.ndarray        # int32 [P] output positions (distribution of input_ids[p + 1])
    topk_ids: np.ndarray         # int32 [P, k]   (-1 = padding under top-p)
    topk_logprobs: np.ndarray    # float32 [P, k] (-inf at padding)
    tail_mass: np.ndarray        # float32 [P]
    target_logprob: np.ndarray   # float32 [P]
    word_start_mass: np.ndarray  # float32 [P]
    tail_ids: np.ndarray | None = None  # int32 [P, m]
    topk_codes: np.ndarray | None = field(default=None, repr=False)  # uint8 [P, k] raw codes

    def to_tensors(self, device=None) -> dict:
        import torch

        out = {n: torch.as_tensor(getattr(self, n), device=device) for n in
               ("input_ids", "positions", "topk_ids", "topk_logprobs", "tail_mass", "target_logprob", "word_start_mass")}
        if self.tail_ids is not None:
            out["tail_ids"] = torch.as_tensor(self.tail_ids, device=device)
        return out


_NO_BYTES = np.zeros(0, np.uint8)
_NO_BYTES.setflags(write=False)  # read-only like the views of the shard buffers


def _raw_bytes(cols: dict, name: str, i: int) -> np.ndarray:
    """The stored bytes of binary column `name` for row i of a row group's columns (pyarrow arrays, as
    `TeacherStore.raw_row` gives them): a read-only uint8 view into the column's buffer (no copy)."""
    arr = cols[name]
    bufs = arr.buffers()
    off = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
    data = bufs[2]
    if data is None or off[i + 1] == off[i]:
        return _NO_BYTES
    return np.frombuffer(data, dtype=np.uint8, count=int(off[i + 1] - off[i]), offset=int(off[i]))


def _decode_row(cols: dict, i: int, k: int, m: int, vocab_size: int) -> TeacherExample:
    def raw(name):
        return _raw_bytes(cols, name, i)

    T = int(cols["n_tokens"][i].as_py())
    P = int(cols["n_positions"][i].as_py())
    runs = np.frombuffer(raw("position_runs"), dtype="<i4").reshape(-1, 2)
    tail = np.frombuffer(raw("tail_mass"), dtype="<f4").astype(np.float32)
    deltas = np.frombuffer(raw("topk_codes"), dtype=np.uint8).reshape(P, max(k - 1, 0))
    codes = np.zeros((P, k), np.uint8)
    if k > 1:
        np.cumsum(deltas, axis=1, dtype=np.uint8, out=codes[:, 1:])
    nk_raw = raw("n_kept")
    n_kept = np.frombuffer(nk_raw, dtype="<u2").astype(np.int64) if len(nk_raw) else None
    ids = unpack_ids(raw("topk_ids"), P * k, vocab_size).reshape(P, k)
    if n_kept is not None:
        ids[np.arange(k)[None, :] >= n_kept[:, None]] = _ID_NONE
    tail_ids = None
    tr = raw("tail_ids")
    if len(tr):
        tail_ids = unpack_ids(tr, P * m, vocab_size).reshape(P, m)
        none = np.unpackbits(np.frombuffer(raw("tail_none"), np.uint8))[: P * m].reshape(P, m).astype(bool)
        tail_ids[none] = _ID_NONE
    return TeacherExample(
        key=cols["key"][i].as_py(), text=cols["text"][i].as_py(),
        input_ids=unpack_ids(raw("input_ids"), T, vocab_size), positions=_from_runs(runs),
        topk_ids=ids, topk_logprobs=dequantize_logprobs(codes, tail, n_kept), tail_mass=tail,
        target_logprob=np.frombuffer(raw("target_logprob"), dtype="<f2").astype(np.float32),
        word_start_mass=np.frombuffer(raw("word_start_mass"), dtype="<f2").astype(np.float32),
        tail_ids=tail_ids, topk_codes=codes)


# ------------------------------------------------------------------------------------------
# Filesystem helpers (local paths or fsspec URLs)
# ------------------------------------------------------------------------------------------


def _fs(path: str):
    path = str(path)
    if "://" not in path:
        return None, os.path.abspath(os.path.expanduser(path))
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return fs, root


def _join(*a):
    return "/".join(s.rstrip("/") for s in a)


class _IO:
    def __init__(self, path):
        self.url = str(path)
        self.fs, self.root = _fs(path)

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
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.fs is None:
            return pq.ParquetFile(pa.memory_map(self.p(rel), "r"))
        return pq.ParquetFile(self.fs.open(self.p(rel), "rb"))


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------


class StoreWriter:
    """Writes the shards of one rank. `header`: manifest fields shared by all ranks (format, model,
    tokenizer hash, options, dataset fingerprint...).

    Each shard is self-describing: its parquet schema metadata holds the writer's header and the shard's
    own record (rank, world, j, n, skip counts), and it is committed by one atomic rename. Committing a
    shard writes nothing else (O(shard) bytes; no growing per-rank file). The part file
    parts/r{rank}of{N}.json is written when the writer opens (header, complete = false) and by
    `finish()` (complete, shard list with counts); `merge_manifests` reads the example keys from the
    shards' `key` columns. Resuming: `committed()` names the shards present whose header equals this
    writer's; a shard of other settings is refused (or wiped with overwrite=True) like a part or
    manifest of other settings.

    A failed run leaves no half-made store: when the constructor fails after making the folder, or
    the caller calls `abort()`, the folder goes if this writer created it, world == 1 and no shard
    is committed."""

    def __init__(self, path, header: dict, rank: int = 0, world: int = 1, overwrite: bool = False):
        self.io = _IO(path)
        self.rank, self.world = int(rank), int(world)
        try:  # normalised through JSON: what is compared on resume is what was stored
            self.header = json.loads(json.dumps(dict(header, format_version=FORMAT_VERSION, world=self.world)))
        except (TypeError, ValueError) as e:
            raise StoreError(f"{self.io.url}: the store header is not JSON-serialisable ({e}).") from None
        self.tag = f"r{self.rank:03d}of{self.world:03d}"
        self.part_rel = f"parts/{self.tag}.json"
        self._shards: dict[int, dict] = {}
        try:
            self._created = not self.io.exists()
        except Exception:  # noqa: BLE001 - then makedirs reports the problem
            self._created = False
        try:
            self._open(overwrite)
        except BaseException:
            self.abort()
            raise

    def _open(self, overwrite: bool):
        self.io.makedirs()
        self.io.makedirs("shards")
        self.io.makedirs("parts")
        self._check_compatible(overwrite)
        for d in ("shards", "parts"):  # this rank's leftover temporary files (a kill during a write)
            for name in self.io.listdir(d):
                if ".tmp-" in name and name.startswith(self.tag):
                    self.io.remove(f"{d}/{name}")
        for name in self.io.listdir("shards"):
            j = self._own_index(name)
            if j is not None:
                meta = self._shard_meta[name] if name in self._shard_meta else _shard_meta(self.io, f"shards/{name}")[1]
                self._shards[j] = {"file": f"shards/{name}", "n": int(meta["n"]), "skipped": meta.get("skipped") or {}}
        self._write_part(complete=False)

    def abort(self):
        """After a failed run: remove the store folder when this writer created it, it is the only
        rank (world == 1) and nothing is committed; otherwise leave everything (an earlier store,
        other ranks' work, committed shards to resume from)."""
        if self._created and self.world == 1 and not self._shards:
            self.io.remove_root()

    # -- settings check ----------------------------------------------------------------------
    def _own_index(self, name: str) -> int | None:
        if not name.startswith(self.tag + "-") or ".tmp-" in name or not name.endswith(".parquet"):
            return None
        j = name[len(self.tag) + 1: -len(".parquet")]
        return int(j) if j.isdigit() else None

    def _diff(self, h: dict) -> list[str]:
        return sorted(k for k in set(h) | set(self.header) if h.get(k) != self.header.get(k)
                      and k not in ("created", "xtok_version"))

    def _check_compatible(self, overwrite: bool):
        """Compare this writer's header with everything already at the path: the manifest, every part,
        and the headers recorded in the shards (all of this rank's, one per other rank tag)."""
        self._shard_meta: dict[str, dict] = {}
        found: list[tuple[str, dict]] = []

        def read(rel):  # an unreadable manifest/part counts as other settings under overwrite
            try:
                return _read_json(self.io, rel)
            except StoreError:
                if overwrite:
                    return {"header": {"damaged": True}, "damaged": True}
                raise

        if self.io.exists("manifest.json"):
            # the manifest is the shared header plus the merged fields (see merge_manifests)
            man = read("manifest.json")
            found.append(("manifest.json", {k: v for k, v in man.items() if k not in _MERGED_FIELDS}))
        for name in self.io.listdir("parts"):
            if name.endswith(".json") and ".tmp-" not in name:
                found.append((f"parts/{name}", read(f"parts/{name}").get("header", {})))
        seen_tags = set()
        for name in self.io.listdir("shards"):
            if ".tmp-" in name or not name.endswith(".parquet"):
                continue
            tag = name.split("-", 1)[0]
            own = self._own_index(name) is not None
            if not own and tag in seen_tags:
                continue
            seen_tags.add(tag)
            h, meta = _shard_meta(self.io, f"shards/{name}", damaged_ok=overwrite)
            if own and meta is not None:
                self._shard_meta[name] = meta
            found.append((f"shards/{name}", h))
        for where, h in found:
            diff = self._diff(h)
            if not diff:
                continue
            if overwrite:
                self._wipe()
                self._shard_meta = {}
                return
            what = ("format_version (written by an older xtok that records no settings in its shards)"
                    if not h else ", ".join(diff))
            raise StoreError(
                f"{self.io.url}: a store made with different settings is already there ({where} differs in: "
                f"{what}). Use a new --output, or --overwrite to replace it.")

    def _wipe(self):
        for d in ("shards", "parts"):
            for name in self.io.listdir(d):
                self.io.remove(f"{d}/{name}")
        if self.io.exists("manifest.json"):
            self.io.remove("manifest.json")

    def shard_rel(self, j: int) -> str:
        return f"shards/{self.tag}-{j:05d}.parquet"

    def committed(self) -> set[int]:
        return set(self._shards)

    def write_shard(self, j: int, rows: list[dict], skipped: dict | None = None):
        """Commit shard j: one parquet file written to a temporary name and renamed into place. Nothing
        else is written (the shard carries its header, count and skip counts)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        j = int(j)
        rec = {"rank": self.rank, "world": self.world, "j": j, "n": len(rows), "skipped": dict(skipped or {})}
        table = pa.Table.from_pylist(rows, schema=_schema()).replace_schema_metadata(
            {_META_HEADER: json.dumps(self.header, sort_keys=True), _META_SHARD: json.dumps(rec, sort_keys=True)})
        avg = max(1, table.nbytes // max(1, len(rows)))
        # ~512 KiB row groups: a random read decodes ~one 2k-token example (k=64), not four (2 MB groups:
        # 2.5 ms vs 0.9 ms CPU per cold read), for ~1 % more bytes
        rg = int(max(1, min(len(rows), (1 << 19) // avg)))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", compression_level=6, row_group_size=rg,
                       use_dictionary=False, write_statistics=False)
        rel = self.shard_rel(j)
        self.io.write_atomic(rel, sink.getvalue().to_pybytes())
        self._shards[j] = {"file": rel, "n": len(rows), "skipped": rec["skipped"]}

    def _write_part(self, complete: bool, stats: dict | None = None):
        part = {"rank": self.rank, "world": self.world, "complete": bool(complete), "header": self.header}
        if complete:
            part["stats"] = stats or {}
            part["shards"] = {f"{j:05d}": {"file": s["file"], "n": s["n"]} for j, s in sorted(self._shards.items())}
            part["skipped"] = {f"{j:05d}": s["skipped"] for j, s in sorted(self._shards.items()) if s["skipped"]}
        self.io.write_atomic(self.part_rel, _json_bytes(part))

    def finish(self, stats: dict | None = None) -> dict | None:
        """Mark this rank complete (its part lists its shards and counts); merge all parts into
        manifest.json when every rank is complete. Returns the merged manifest, or None while other
        ranks are still running."""
        self._write_part(complete=True, stats=stats)
        return merge_manifests(self.io.url, require_complete=True, quiet=True)


# manifest.json = the rank parts' shared header + these fields, written by merge_manifests
_MERGED_FIELDS = ("n_examples", "skipped", "stats", "shards")
_META_HEADER = "xtok.header"   # parquet schema metadata of every shard: the writer's header (JSON)
_META_SHARD = "xtok.shard"     # ... and the shard's record {rank, world, j, n, skipped} (JSON)


def _read_json(io: _IO, rel: str) -> dict:
    try:
        return json.loads(io.read_bytes(rel))
    except (OSError, ValueError) as e:
        raise StoreError(f"{io.url}/{rel}: unreadable ({e}); delete it and re-run the same `xtok extract` "
                         "command, or use --overwrite.") from None


def _shard_meta(io: _IO, rel: str, damaged_ok: bool = False) -> tuple[dict, dict | None]:
    """(header, shard record) from a shard's parquet footer; ({}, None) when it records none (older xtok)."""
    try:
        md = io.open_parquet(rel).schema_arrow.metadata or {}
        h = md.get(_META_HEADER.encode())
        s = md.get(_META_SHARD.encode())
        return (json.loads(h), json.loads(s)) if h is not None and s is not None else ({}, None)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        if damaged_ok:
            return {"damaged": True}, None
        raise StoreError(f"{io.url}/{rel}: cannot read this shard ({e}); delete it and re-run the same "
                         "`xtok extract` command (it redoes missing shards), or use --overwrite.") from None


def merge_manifests(path, require_complete: bool = True, quiet: bool = False) -> dict | None:
    """Merge the rank parts of the store at `path` into manifest.json (atomic). The example keys of each
    shard are read from its `key` column (the parts hold only files and counts). Returns the manifest;
    with quiet=True returns None instead of raising while some rank is missing or incomplete."""
    io = _IO(path)
    parts = [_read_json(io, f"parts/{n}") for n in io.listdir("parts") if n.endswith(".json") and ".tmp-" not in n]
    if not parts:
        raise StoreError(f"{io.url}: no parts/*.json; not a teacher store written by `xtok extract`.")
    world = parts[0]["world"]
    ranks = {p["rank"] for p in parts if p["world"] == world}
    done = {p["rank"] for p in parts if p["world"] == world and p.get("complete")}
    if require_complete and (len(done) < world):
        if quiet:
            return None
        missing = sorted(set(range(world)) - done)
        raise StoreError(f"{io.url}: ranks {missing} of {world} have not finished (present: {sorted(ranks)}). "
                         "Run the same `xtok extract` command for them (it resumes).")
    shards, skipped, stats = [], {}, {}
    for p in sorted(parts, key=lambda p: p["rank"]):
        for j, s in sorted(p.get("shards", {}).items()):
            keys = s.get("keys")
            if keys is None:
                try:
                    keys = io.open_parquet(s["file"]).read(columns=["key"]).column("key").to_pylist()
                except Exception as e:  # noqa: BLE001
                    raise StoreError(f"{io.url}/{s['file']}: cannot read the shard's keys ({e}); delete it and "
                                     "re-run the same `xtok extract` command.") from None
            if len(keys) != s["n"]:
                raise StoreError(f"{io.url}/{s['file']}: {len(keys)} rows but its part says {s['n']}; delete the "
                                 "shard and re-run the same `xtok extract` command.")
            shards.append({"file": s["file"], "n": s["n"], "keys": keys})
        for sk in p.get("skipped", {}).values():
            for k, v in sk.items():
                skipped[k] = skipped.get(k, 0) + v
        for k, v in (p.get("stats") or {}).items():
            if isinstance(v, (int, float)):
                stats[k] = stats.get(k, 0) + v
    man = dict(parts[0]["header"])
    man.update({"world": world, "n_examples": sum(s["n"] for s in shards), "skipped": skipped, "stats": stats,
                "shards": shards})
    io.write_atomic("manifest.json", _json_bytes(man))
    return man


# ------------------------------------------------------------------------------------------
# Reader
# ------------------------------------------------------------------------------------------


class TeacherStore:
    """Random access to a teacher store: `store[key]` or `store[i]` -> TeacherExample, O(1): a key ->
    (shard, row) index built from the manifest, shards memory-mapped, one ~512 KiB row group decoded
    per miss (small LRU cache). Iteration goes shard by shard. Safe to pickle (reopens lazily)."""

    def __init__(self, path, cache_row_groups: int = 8):
        self.path = str(path)
        self.io = _IO(self.path)
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
        return _decode_row(cols, r, self.top_k, self.sample_tail, self.vocab_size)

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

    def raw_row(self, key) -> tuple[dict, int] | None:
        """The stored, still-encoded columns of example `key` (or global index): `(cols, i)` where
        `cols[name]` is the pyarrow array of that column for the example's row group and `i` the
        example's row in it (the layout of docs/formats.md). None when the key is absent. For readers
        that decode only part of an example (the collator decodes just the rows it needs)."""
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not 0 <= i < len(self):
                return None
        else:
            i = self._index.get(str(key))
            if i is None:
                return None
        return self._row_group(i)

    def __repr__(self):
        return (f"TeacherStore({self.path!r}, examples={len(self)}, model={self.manifest.get('model')!r}, "
                f"top_k={self.top_k}, sample_tail={self.sample_tail})")
