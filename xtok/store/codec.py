"""The packed example format of a teacher store: encode and decode, in one place.

One shard row per example (docs/formats.md has the byte layout and the error bounds):

    key, text (the rendered text the teacher read), n_tokens T, n_positions P,
    input_ids       packed ids [T] (`pack_ids`)
    position_runs   int32 [(start, end)] runs of the output positions [P]
    topk_ids        packed ids [P, k] (padding entries under top-p stored as 0)
    topk_codes      uint8 [P, k-1]: deltas along k of the monotone log-prob codes (the top-1 code is 0)
    n_kept          uint16 [P] (top-p only: entries kept per row; empty otherwise)
    tail_mass       float32 [P]: the exact teacher mass outside the kept top-k
    target_logprob  float16 [P]: log-prob of the realised next token
    word_start_mass float16 [P]
    tail_ids        packed ids [P, m] (sampled tail, optional); tail_none: bit mask of empty draws

Quantisation: top-k log-probs are stored relative to the top-1 entry, d_i = lp_0 - lp_i >= 0, as uint8
codes on a square-root grid c_i = round(sqrt(d_i) / QSTEP) (QSTEP = sqrt(D_MAX) / 254, D_MAX = 20 nats,
code 255 = beyond D_MAX). Decoding rescales the dequantised top-k probabilities to sum to exactly
1 - tail_mass. Ids are packed as uint16 (V <= 65,536), 16 low bits + 2 high bits four per byte
(V <= 262,144), or uint32 (`id_mode`).

Two decoders read this layout: `decode_example` (a whole example, log-probs, vectorised numpy: what
`TeacherStore[key]` returns) and `PackedExample.decode_rows` / the Numba kernel `decode_row_into`
(probabilities of the few rows a consumer needs, straight from the packed bytes: what the collator
uses). Both are here, next to `encode_example`.
"""
from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field

import numpy as np
from numba import njit

__all__ = ["FORMAT_VERSION", "D_MAX", "QSTEP", "ID_NONE", "TeacherExample", "PackedExample", "PackedRows",
           "quantize_logprobs", "dequantize_logprobs", "code_nats", "code_probs", "id_mode", "pack_ids",
           "unpack_ids", "positions_to_runs", "runs_to_positions", "encode_example", "decode_example",
           "shard_schema", "column_bytes", "decode_row_into", "decode_rows", "packed_size", "check_row",
           "PACKED_COLUMNS"]

FORMAT_VERSION = 1
D_MAX = 20.0                           # nats below the top-1 covered by the grid
QSTEP = float(np.sqrt(D_MAX) / 254.0)  # sqrt-grid step: d(c) = (c * QSTEP)^2, c in 0..254; 255 = beyond
ID_NONE = -1                           # id of a padding entry (top-p) or an empty tail draw


# ------------------------------------------------------------------------------------------
# Log-prob codes and ids
# ------------------------------------------------------------------------------------------


def quantize_logprobs(lp: np.ndarray) -> np.ndarray:
    """lp float [P, k] sorted descending along k -> uint8 codes [P, k] (codes[:, 0] == 0), monotone."""
    lp = np.asarray(lp, dtype=np.float64)
    d = np.maximum(lp[:, :1] - lp, 0.0)
    c = np.rint(np.sqrt(d) / QSTEP)
    c = np.where(np.isfinite(c), np.minimum(c, 255), 255)
    return c.astype(np.uint8)


def code_nats(codes) -> np.ndarray:
    """d(c) float64: how many nats below the top-1 log-prob code c stands for (the inverse of
    quantize_logprobs' grid; 255: beyond the grid, taken as D_MAX + 4)."""
    c = np.asarray(codes)
    return np.where(c >= 255, D_MAX + 4.0, (c.astype(np.float64) * QSTEP) ** 2)


def code_probs() -> np.ndarray:
    """float64 [256]: exp(-d(c)) for every code c (relative probability of a code vs the top-1)."""
    return np.exp(-code_nats(np.arange(256)))


def dequantize_logprobs(codes: np.ndarray, tail_mass: np.ndarray, n_kept: np.ndarray | None = None) -> np.ndarray:
    """codes uint8 [P, k] + exact tail mass [P] -> float32 log-probs [P, k] whose probabilities sum to
    exactly 1 - tail_mass (entries j >= n_kept are -inf)."""
    rel = -code_nats(codes)
    if n_kept is not None:
        j = np.arange(codes.shape[1])[None, :]
        rel = np.where(j < n_kept[:, None], rel, -np.inf)
    m = np.log(np.maximum(1.0 - np.asarray(tail_mass, np.float64), 1e-300))
    lse = np.log(np.exp(rel).sum(axis=1))
    return (rel + (m - lse)[:, None]).astype(np.float32)


def id_mode(vocab_size: int) -> int:
    """How `pack_ids` packs the ids of a vocabulary: 0 = uint16 (V <= 65536); 1 = 16 low bits (uint16)
    for all ids, then their 2 high bits, four per byte, lowest first (V <= 262144); 2 = uint32. Ids are
    little endian."""
    return 0 if vocab_size <= 1 << 16 else 1 if vocab_size <= 1 << 18 else 2


def pack_ids(ids: np.ndarray, vocab_size: int) -> bytes:
    """Pack non-negative ids < vocab_size (any shape, flattened) as `id_mode(vocab_size)` says. Padding
    ids (-1) must be mapped first."""
    a = np.ascontiguousarray(ids, dtype=np.int64).ravel()
    mode = id_mode(vocab_size)
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
    mode = id_mode(vocab_size)
    if mode == 0:
        return b[: 2 * n].view("<u2").astype(np.int32)
    if mode == 1:
        lo = b[: 2 * n].view("<u2").astype(np.int32)
        packed = b[2 * n:]
        hi = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=1).ravel()[:n].astype(np.int32)
        return lo | (hi << 16)
    return b[: 4 * n].view("<u4").astype(np.int32)


def positions_to_runs(positions: np.ndarray) -> np.ndarray:
    """Sorted positions -> int32 [(start, end)] runs of consecutive values."""
    p = np.asarray(positions, dtype=np.int64)
    if p.size == 0:
        return np.zeros((0, 2), np.int32)
    brk = np.nonzero(np.diff(p) != 1)[0]
    starts = np.concatenate([[p[0]], p[brk + 1]])
    ends = np.concatenate([p[brk] + 1, [p[-1] + 1]])
    return np.stack([starts, ends], axis=1).astype(np.int32)


def runs_to_positions(runs: np.ndarray) -> np.ndarray:
    """Inverse of positions_to_runs: int32 [P]."""
    if runs.size == 0:
        return np.zeros(0, np.int32)
    lens = runs[:, 1] - runs[:, 0]
    base = np.repeat(runs[:, 0] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return (base + np.arange(int(lens.sum()))).astype(np.int32)


# ------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------


def encode_example(key: str, text: str, input_ids, positions, topk_ids, topk_codes, tail_mass, target_logprob,
                   word_start_mass, vocab_size: int, tail_ids=None, n_kept=None) -> dict:
    """One shard row. topk_codes: uint8 [P, k] from quantize_logprobs (monotone along k)."""
    P, k = topk_codes.shape
    deltas = np.diff(topk_codes.astype(np.int16), axis=1).astype(np.uint8)  # [P, k-1], codes[:, 0] == 0
    tid = np.asarray(topk_ids, dtype=np.int64)
    return {
        "key": key, "text": text,
        "n_tokens": int(len(input_ids)), "n_positions": int(P),
        "input_ids": pack_ids(input_ids, vocab_size),
        "position_runs": positions_to_runs(positions).astype("<i4").tobytes(),
        "topk_ids": pack_ids(np.where(tid < 0, 0, tid), vocab_size),
        "topk_codes": deltas.tobytes(),
        "n_kept": b"" if n_kept is None else np.asarray(n_kept, np.uint16).astype("<u2").tobytes(),
        "tail_mass": np.asarray(tail_mass, "<f4").tobytes(),
        "target_logprob": np.asarray(target_logprob, "<f2").tobytes(),
        "word_start_mass": np.asarray(word_start_mass, "<f2").tobytes(),
        "tail_ids": b"" if tail_ids is None else pack_ids(np.where(np.asarray(tail_ids) < 0, 0, tail_ids), vocab_size),
        "tail_none": b"" if tail_ids is None else np.packbits(np.asarray(tail_ids) < 0).tobytes(),
    }


_SCHEMA = None


def shard_schema():
    """The pyarrow schema of a shard (one row per example, the fields of `encode_example`)."""
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
# Decoding
# ------------------------------------------------------------------------------------------


@dataclass
class TeacherExample:
    """One stored example, fully decoded (`TeacherStore[key]`)."""

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


def column_bytes(cols: dict, name: str, i: int) -> np.ndarray:
    """The stored bytes of binary column `name` for row i of a row group's columns (pyarrow arrays):
    a read-only uint8 view into the column's buffer (no copy)."""
    arr = cols[name]
    bufs = arr.buffers()
    off = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
    data = bufs[2]
    if data is None or off[i + 1] == off[i]:
        return _NO_BYTES
    return np.frombuffer(data, dtype=np.uint8, count=int(off[i + 1] - off[i]), offset=int(off[i]))


def packed_size(n: int, vocab_size: int) -> int:
    """Bytes `pack_ids` makes of n ids of a vocabulary of vocab_size."""
    mode = id_mode(vocab_size)
    return 2 * n if mode == 0 else 2 * n + (n + 3) // 4 if mode == 1 else 4 * n


# columns the collator's PackedExample reads (TeacherStore.packed); decode_example also reads text and
# word_start_mass
PACKED_COLUMNS = ("key", "n_tokens", "n_positions", "input_ids", "position_runs", "topk_ids", "topk_codes", "n_kept",
                  "tail_mass", "target_logprob", "tail_ids", "tail_none")


def check_row(cols: dict, i: int, k: int, m: int, vocab_size: int) -> tuple[int, int]:
    """(T, P) of row i after checking that every column it has holds the bytes T, P, k, m and the id
    packing call for (ValueError naming the column otherwise), so neither decoder reads past a buffer
    or returns a short array from a damaged row."""
    T = int(cols["n_tokens"][i].as_py())
    P = int(cols["n_positions"][i].as_py())
    if T < 0 or P < 0 or P > max(T, 1):
        raise ValueError(f"n_tokens={T}, n_positions={P} are not possible")
    want = {"input_ids": (packed_size(T, vocab_size),), "topk_ids": (packed_size(P * k, vocab_size),),
            "topk_codes": (P * max(k - 1, 0),), "n_kept": (0, 2 * P), "tail_mass": (4 * P,),
            "target_logprob": (2 * P,), "word_start_mass": (2 * P,),
            "tail_ids": (0, packed_size(P * m, vocab_size)), "tail_none": (0, (P * m + 7) // 8)}
    for name, sizes in want.items():
        if name in cols:
            got = column_bytes(cols, name, i).size
            if got not in sizes:
                raise ValueError(f"column {name!r} holds {got} bytes, expected {' or '.join(map(str, sizes))} "
                                 f"(n_tokens={T}, n_positions={P}, k={k}, m={m})")
    if "tail_ids" in cols and (column_bytes(cols, "tail_ids", i).size == 0) != (column_bytes(cols, "tail_none", i).size == 0):
        raise ValueError("columns 'tail_ids' and 'tail_none' disagree (one is empty)")
    runs = column_bytes(cols, "position_runs", i)
    if runs.size % 8:
        raise ValueError(f"column 'position_runs' holds {runs.size} bytes, not a multiple of 8")
    r = runs.view("<i4").reshape(-1, 2)
    if r.size and ((r[:, 1] < r[:, 0]).any() or int((r[:, 1] - r[:, 0]).sum()) != P or r.min() < 0):
        raise ValueError(f"column 'position_runs' does not describe n_positions={P} positions")
    return T, P


# The packed top-k rows of one example, as the Numba decoder reads them (one small struct instead of
# ten positional arguments).
PackedRows = namedtuple("PackedRows", "ids_buf id_mode deltas k n_kept tail tail_buf tail_none m table")
PackedRows.__doc__ = """ids_buf uint8: packed top-k ids of all P*k entries; id_mode: `id_mode(V)`; deltas
uint8 [P*(k-1)]: deltas of the monotone codes; k; n_kept int64 [P] or empty (all k kept); tail float32
[P]: exact tail mass; tail_buf/tail_none: packed sampled tail ids (P*m) and the big-endian bit mask of
empty draws; m (0: none); table float64 [256]: `code_probs()`."""


class PackedExample:
    """One stored example with its top-k rows still packed: input_ids, positions, tail_mass and
    target_logprob are decoded (small); `decode_rows(rows)` decodes just the wanted top-k rows (+ sampled
    tail) to probabilities, and `rows` (a `PackedRows`) hands the packed bytes to Numba kernels.

    cols: a row group's columns (pyarrow arrays), i: the example's row in them; k, m, vocab_size from
    the store's manifest; table: `code_probs()` (shared, computed once per reader)."""

    def __init__(self, cols: dict, i: int, k: int, m: int, vocab_size: int, table: np.ndarray):
        def raw(name):
            return column_bytes(cols, name, i)

        T, P = check_row(cols, i, k, m, vocab_size)
        self.key = cols["key"][i].as_py()
        self.input_ids = unpack_ids(raw("input_ids"), T, vocab_size)
        self.positions = runs_to_positions(raw("position_runs").view("<i4").reshape(-1, 2))
        self.tail_mass = raw("tail_mass").view("<f4").astype(np.float32)
        self.target_logprob = raw("target_logprob").view("<f2").astype(np.float32)
        deltas = raw("topk_codes")
        nk = raw("n_kept")
        n_kept = nk.view("<u2").astype(np.int64) if nk.size else np.zeros(0, np.int64)
        tail_buf, tail_none = raw("tail_ids"), raw("tail_none")
        if not tail_buf.size:
            m = 0
        if not m:  # no sampled tail ids: the kernels get none (read-only, as the shard views)
            tail_buf = tail_none = _NO_BYTES
        self.rows = PackedRows(raw("topk_ids"), id_mode(vocab_size), deltas, k, n_kept, self.tail_mass, tail_buf,
                               tail_none, m, table)

    @property
    def width(self) -> int:
        """Entries per decoded row: k top-k ids + m sampled tail ids."""
        return self.rows.k + self.rows.m

    def decode_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [n, k+m] (-1 = none), probs float32 [n, k+m]) of store rows `rows`."""
        return decode_rows(np.ascontiguousarray(rows, dtype=np.int64), self.rows)


def decode_example(cols: dict, i: int, k: int, m: int, vocab_size: int) -> TeacherExample:
    """Row i of a row group's columns as a fully decoded TeacherExample (log-probs in float32)."""
    def raw(name):
        return column_bytes(cols, name, i)

    T, P = check_row(cols, i, k, m, vocab_size)
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
        ids[np.arange(k)[None, :] >= n_kept[:, None]] = ID_NONE
    tail_ids = None
    tr = raw("tail_ids")
    if len(tr):
        tail_ids = unpack_ids(tr, P * m, vocab_size).reshape(P, m)
        none = np.unpackbits(np.frombuffer(raw("tail_none"), np.uint8))[: P * m].reshape(P, m).astype(bool)
        tail_ids[none] = ID_NONE
    return TeacherExample(
        key=cols["key"][i].as_py(), text=cols["text"][i].as_py(),
        input_ids=unpack_ids(raw("input_ids"), T, vocab_size), positions=runs_to_positions(runs),
        topk_ids=ids, topk_logprobs=dequantize_logprobs(codes, tail, n_kept), tail_mass=tail,
        target_logprob=np.frombuffer(raw("target_logprob"), dtype="<f2").astype(np.float32),
        word_start_mass=np.frombuffer(raw("word_start_mass"), dtype="<f2").astype(np.float32),
        tail_ids=tail_ids, topk_codes=codes)


# ------------------------------------------------------------------------------------------
# Numba row decoder
# ------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _unpack_id(buf, mode, e, n_all):
    """Id e of the n_all ids that `pack_ids` packed into buf (mode: `id_mode`)."""
    if mode == 0:
        return np.int64(buf[2 * e]) | (np.int64(buf[2 * e + 1]) << 8)
    if mode == 1:
        return (np.int64(buf[2 * e]) | (np.int64(buf[2 * e + 1]) << 8)
                | (((np.int64(buf[2 * n_all + (e >> 2)]) >> (2 * (e & 3))) & 3) << 16))
    return (np.int64(buf[4 * e]) | (np.int64(buf[4 * e + 1]) << 8)
            | (np.int64(buf[4 * e + 2]) << 16) | (np.int64(buf[4 * e + 3]) << 24))


@njit(cache=True, nogil=True)
def decode_row_into(src, r, codes, out_ids, out_p):
    """Decode store row r of `src` (PackedRows) into out_ids int32 [k+m] (-1 = none) / out_p float32
    [k+m]. codes: int64 scratch [>= k].
    p_j = max(1 - r, 1e-300) * table[c_j] / sum_{valid i} table[c_i] (what `decode_example` gives,
    without its log round trip), and tail / m for each sampled tail id."""
    k, m, table = src.k, src.m, src.table
    P = src.tail.shape[0]
    nk = np.int64(src.n_kept[r]) if src.n_kept.shape[0] > 0 else np.int64(k)
    c = np.int64(0)
    z = 0.0
    for j in range(k):
        if j > 0:
            c = (c + np.int64(src.deltas[r * (k - 1) + j - 1])) & 255
        codes[j] = c
        if j < nk:
            z += table[c]
    mass = 1.0 - np.float64(src.tail[r])
    if mass < 1e-300:
        mass = 1e-300
    scale = mass / z if z > 0 else 0.0
    for j in range(k):
        if j >= nk:
            out_ids[j] = -1
            out_p[j] = 0.0
        else:
            out_ids[j] = _unpack_id(src.ids_buf, src.id_mode, r * k + j, P * k)
            out_p[j] = scale * table[codes[j]]
    for j in range(m):
        e = r * m + j
        if (src.tail_none[e >> 3] >> (7 - (e & 7))) & 1:
            out_ids[k + j] = -1
            out_p[k + j] = 0.0
        else:
            out_ids[k + j] = _unpack_id(src.tail_buf, src.id_mode, e, P * m)
            out_p[k + j] = np.float32(src.tail[r]) / np.float32(m)


@njit(cache=True, nogil=True)
def decode_rows(rows, src):
    """`decode_row_into` for store rows `rows` of `src` -> ids int32 [n, k+m], probs float32 [n, k+m]."""
    n = rows.shape[0]
    w = src.k + src.m
    out_ids = np.empty((n, w), np.int32)
    out_p = np.empty((n, w), np.float32)
    codes = np.empty(max(src.k, 1), np.int64)
    for i in range(n):
        decode_row_into(src, rows[i], codes, out_ids[i], out_p[i])
    return out_ids, out_p
