"""`CrossTokenizerCollator`: dataset rows -> ready training tensors, inside DataLoader workers.

Per batch the collator tokenises every row with the student tokenizer (plain text, or chat
messages rendered with a template, assistant-only labels), and for every teacher:

1. fetches the teacher's stored example (`xtok extract` output) by the row's example key;
2. aligns the teacher's stored token ids with the student's ids (`xtok.align`: chunks of equal bytes;
   when one byte stream is a prefix of the other, e.g. truncation, the exact merge of the common
   prefix, without a DP);
3. keeps only chunks inside *runs* of at least `min_run_bytes` matched bytes (a run: consecutive
   chunks with no byte between them on either side, so the teacher-minus-student byte offset is
   constant and the text since the run's start is equal on both sides); an isolated common token
   that the DP found inside text that differs is no target (`short_run_chunks` counts them);
4. for every kept chunk `(t_start, t_end, s_start, s_end)` with `t_start >= 1`, `s_start >= 1`,
   the student token `s_start` trained (label != -100) and the teacher output position `t_start - 1`
   stored: projects the teacher's stored top-k (plus sampled tail ids, each of weight
   `tail_mass / m`, when the store has them) through W into a sparse student distribution, the target
   of student output position `s_start - 1`; `tail_mass` = teacher mass the target does not hold;
5. sums the teacher's `target_logprob` over each kept chunk's teacher tokens (positions `t_start-1 ..
   t_end-2`) -> `chunk_teacher_logprob`, with the chunk's student span `(s_start, s_end)`; a chunk
   whose teacher positions are not all stored, or whose student tokens are not all trained, is dropped.

Teachers lacking an example, or whose stored text does not match the student's (kept chunks cover
less than `min_coverage` of the student's trained text tokens within the aligned range), get
`present = False` and all-masked targets, and a counter in `batch["stats"]`; never an exception.

Output layout: see docs/architecture.md "collate -> losses" and docs/collator.md.

Worker safety: `TeacherSpec` and the collator pickle as paths + small config; stores, projections
and tokenizers are opened lazily in each process; Numba kernels are compiled once per process
(`cache=True`, so workers load them from the on-disk cache); torch/numba are imported lazily.
All per-example work is vectorised numpy or a Numba kernel (the top-k rows of an `xtok extract`
store are decoded by a kernel straight from the packed shard bytes); Python loops run over the
batch and the teachers only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .tokens import Tokenizer, load_tokenizer

__all__ = ["TeacherSpec", "CrossTokenizerCollator", "TeacherTargets", "StudentExample", "example_key",
           "CollatorError", "run_filter", "MIN_RUN_BYTES"]

IGNORE_INDEX = -100
MIN_RUN_BYTES = 16  # default TeacherSpec.min_run_bytes


class CollatorError(ValueError):
    """A teacher set-up the collator refuses (store/tokenizer mismatch, unverifiable store); the message
    names the store and the fix."""


# ------------------------------------------------------------------------------------------
# Numba kernels (compiled lazily, once per process, cached on disk)
# ------------------------------------------------------------------------------------------


def _decode_row_into_py(r, ids_buf, id_mode, deltas, k, n_kept, tail, tail_buf, tail_none, m, table, codes,
                        out_ids, out_p):
    """Decode store row r straight from an `xtok extract` shard's packed bytes (docs/formats.md) into
    out_ids int32 [k+m] (-1 = none) / out_p float32 [k+m].

    ids_buf uint8: packed top-k ids of all P*k entries (`xtok.store.pack_ids`); id_mode: `xtok.store._id_mode`
    (0: uint16, 1: 16 low bits + 2 high bits four per byte after them, 2: uint32). deltas uint8 [P*(k-1)]:
    deltas of the monotone log-prob codes (code 0 = top-1). n_kept: [P] or empty (all k kept). tail
    float32 [P]: exact tail mass r. tail_buf/tail_none: packed sampled tail ids (P*m) and the big-endian
    bit mask of empty draws (m = 0: none). table float64 [256]: exp(-d(code)) (`xtok.store._code_nats`).
    codes: int64 scratch [>= k].
    p_j = max(1 - r, 1e-300) * table[c_j] / sum_{valid i} table[c_i] (what `TeacherStore` decodes,
    without its log round trip), and r / m for each sampled tail id."""
    P = tail.shape[0]
    nk = np.int64(n_kept[r]) if n_kept.shape[0] > 0 else np.int64(k)
    c = np.int64(0)
    z = 0.0
    for j in range(k):
        if j > 0:
            c = (c + np.int64(deltas[r * (k - 1) + j - 1])) & 255
        codes[j] = c
        if j < nk:
            z += table[c]
    mass = 1.0 - np.float64(tail[r])
    if mass < 1e-300:
        mass = 1e-300
    scale = mass / z if z > 0 else 0.0
    for j in range(k):
        if j >= nk:
            out_ids[j] = -1
            out_p[j] = 0.0
        else:
            out_ids[j] = _unpack_id(ids_buf, id_mode, r * k + j, P * k)
            out_p[j] = scale * table[codes[j]]
    for j in range(m):
        e = r * m + j
        if (tail_none[e >> 3] >> (7 - (e & 7))) & 1:
            out_ids[k + j] = -1
            out_p[k + j] = 0.0
        else:
            out_ids[k + j] = _unpack_id(tail_buf, id_mode, e, P * m)
            out_p[k + j] = np.float32(tail[r]) / np.float32(m)


def _unpack_id_py(buf, id_mode, e, n_all):
    """Id e of the n_all ids that `xtok.store.pack_ids` packed into buf (id_mode: `xtok.store._id_mode`)."""
    if id_mode == 0:
        return np.int64(buf[2 * e]) | (np.int64(buf[2 * e + 1]) << 8)
    if id_mode == 1:
        return (np.int64(buf[2 * e]) | (np.int64(buf[2 * e + 1]) << 8)
                | (((np.int64(buf[2 * n_all + (e >> 2)]) >> (2 * (e & 3))) & 3) << 16))
    return (np.int64(buf[4 * e]) | (np.int64(buf[4 * e + 1]) << 8)
            | (np.int64(buf[4 * e + 2]) << 16) | (np.int64(buf[4 * e + 3]) << 24))


def _decode_rows_py(rows, ids_buf, id_mode, deltas, k, n_kept, tail, tail_buf, tail_none, m, table):
    """`_decode_row_into` for store rows `rows` -> ids int32 [n, k+m], probs float32 [n, k+m]."""
    n = rows.shape[0]
    out_ids = np.empty((n, k + m), np.int32)
    out_p = np.empty((n, k + m), np.float32)
    codes = np.empty(max(k, 1), np.int64)
    for i in range(n):
        _decode_row_into(rows[i], ids_buf, id_mode, deltas, k, n_kept, tail, tail_buf, tail_none, m, table, codes,
                         out_ids[i], out_p[i])
    return out_ids, out_p


def _project_row_py(onehot, cv, indptr, cols, vals, ids, probs, row, mark, out_ids, out_p, pos):
    """Project one teacher row (ids int [w], < 0 = none; probs float32 [w]) into out_ids/out_p from
    index pos; returns (new pos, row mass). onehot: W given as cv float32 [V_t, 2] = (student id or -1,
    weight) per teacher id (at most one entry per row, side by side: one cache line per teacher id);
    else as CSR (indptr, cols, vals). Duplicate student ids are merged, in order of first appearance
    (deterministic): mark int64 [V_s] = (row << 32) | index in the row of student id c, valid only
    when its high half is this row's number `row` (no reset pass between rows)."""
    base = pos
    tot = 0.0
    for j in range(ids.shape[0]):
        t = ids[j]
        p = probs[j]
        if t < 0 or not p > 0:
            continue
        if onehot:
            c = np.int64(cv[t, 0])
            if c < 0:
                continue
            q = p * cv[t, 1]
            pos = _merge(c, q, row, base, pos, mark, out_ids, out_p)
            tot += q
        else:
            for z in range(indptr[t], indptr[t + 1]):
                q = p * vals[z]
                pos = _merge(cols[z], q, row, base, pos, mark, out_ids, out_p)
                tot += q
    return pos, tot


def _merge_py(c, q, row, base, pos, mark, out_ids, out_p):
    """Add weight q for student id c to the row being written at out_ids/out_p[base:pos] (see
    `_project_row`): onto c's entry when the row has one, else as a new entry at pos. Returns the new pos."""
    v = mark[c]
    if (v >> 32) == row:
        out_p[base + (v & 0xFFFFFFFF)] += q
        return pos
    mark[c] = (np.int64(row) << 32) | (pos - base)
    out_ids[pos] = c
    out_p[pos] = q
    return pos + 1


def _grow_py(out_ids, out_p, pos, need):
    """Larger copies of the output buffers (the first pos entries kept): capacity max(2 * old, need)."""
    cap = max(2 * out_ids.shape[0], need)
    a = np.empty(cap, np.int32)
    a[:pos] = out_ids[:pos]
    b = np.empty(cap, np.float32)
    b[:pos] = out_p[:pos]
    return a, b


def _row_bound_py(onehot, indptr, ids):
    """Upper bound on the projected entries of one row."""
    if onehot:
        return ids.shape[0]
    ub = 0
    for j in range(ids.shape[0]):
        t = ids[j]
        if t >= 0:
            ub += indptr[t + 1] - indptr[t]
    return ub


def _project_rows_py(onehot, cv, indptr, cols, vals, n_student, ids, probs):
    """Project teacher rows (ids int32 [n, w], probs float32 [n, w]) through W (see `_project_row`).

    Returns a flat CSR result (ids int32, probs float32, offsets int64 [n+1]) and the per-row tail
    `max(0, 1 - sum of the row's probs)` (float32 [n])."""
    n = ids.shape[0]
    cap = max(16, n * ids.shape[1])  # grown by _grow when a row needs more
    out_ids = np.empty(cap, np.int32)
    out_p = np.empty(cap, np.float32)
    offsets = np.empty(n + 1, np.int64)
    tail = np.empty(n, np.float32)
    mark = np.full(n_student, -1, np.int64)  # see _project_row
    pos = 0
    for i in range(n):
        need = pos + _row_bound(onehot, indptr, ids[i])
        if need > out_ids.shape[0]:
            out_ids, out_p = _grow(out_ids, out_p, pos, need)
        offsets[i] = pos
        pos, tot = _project_row(onehot, cv, indptr, cols, vals, ids[i], probs[i], i, mark, out_ids, out_p, pos)
        tail[i] = max(0.0, 1.0 - tot)
    offsets[n] = pos
    return out_ids[:pos], out_p[:pos], offsets, tail


def _project_raw_py(rows, ids_buf, id_mode, deltas, k, n_kept, tail_mass, tail_buf, tail_none, m, table,
                    onehot, cv, indptr, cols, vals, n_student):
    """`_decode_rows` fused with `_project_rows`: row by row, decoded into a (k+m)-entry scratch that stays
    in L1, then projected (no [n, k+m] intermediate)."""
    n = rows.shape[0]
    w = k + m
    cap = max(16, n * w)  # grown by _grow when a row needs more
    out_ids = np.empty(cap, np.int32)
    out_p = np.empty(cap, np.float32)
    offsets = np.empty(n + 1, np.int64)
    tail = np.empty(n, np.float32)
    mark = np.full(n_student, -1, np.int64)  # see _project_row
    codes = np.empty(max(k, 1), np.int64)
    rid = np.empty(w, np.int32)
    rp = np.empty(w, np.float32)
    pos = 0
    for i in range(n):
        _decode_row_into(rows[i], ids_buf, id_mode, deltas, k, n_kept, tail_mass, tail_buf, tail_none, m, table,
                         codes, rid, rp)
        need = pos + _row_bound(onehot, indptr, rid)
        if need > out_ids.shape[0]:
            out_ids, out_p = _grow(out_ids, out_p, pos, need)
        offsets[i] = pos
        pos, tot = _project_row(onehot, cv, indptr, cols, vals, rid, rp, i, mark, out_ids, out_p, pos)
        tail[i] = max(0.0, 1.0 - tot)
    offsets[n] = pos
    return out_ids[:pos], out_p[:pos], offsets, tail


def _common_prefix_py(t_data, t_off, t_ids, t_cum, t_skip, s_data, s_off, s_ids, s_cum, s_skip):
    """Length of the common leading part of two token byte streams (token k's bytes: data[off[id] +
    skip[k] : ...] with cum[k+1] - cum[k] bytes; special tokens have none), compared without
    materialising the streams."""
    n = t_ids.shape[0]
    m = s_ids.shape[0]
    i = 0
    j = 0
    a = 0  # bytes of token i / j already compared
    b = 0
    L = 0
    while True:
        while i < n and a >= t_cum[i + 1] - t_cum[i]:
            i += 1
            a = 0
        while j < m and b >= s_cum[j + 1] - s_cum[j]:
            j += 1
            b = 0
        if i >= n or j >= m:
            return L
        c = min(t_cum[i + 1] - t_cum[i] - a, s_cum[j + 1] - s_cum[j] - b)
        pt = t_off[t_ids[i]] + t_skip[i] + a
        ps = s_off[s_ids[j]] + s_skip[j] + b
        for x in range(c):
            if t_data[pt + x] != s_data[ps + x]:
                return L + x
        a += c
        b += c
        L += c


def _fill_rows_py(flat_ids, flat_p, offsets, out_ids, out_p):
    """Scatter a flat CSR result into padded [n, K] arrays (already zeroed)."""
    for i in range(offsets.shape[0] - 1):
        a = offsets[i]
        for j in range(offsets[i + 1] - a):
            out_ids[i, j] = flat_ids[a + j]
            out_p[i, j] = flat_p[a + j]


_KERNELS: dict[str, Any] = {}
# called from kernels: compiled first
_HELPERS = ("_unpack_id", "_merge", "_grow", "_decode_row_into", "_project_row", "_row_bound")
_INLINED = ("_unpack_id", "_merge", "_grow")  # helpers inlined into their callers by Numba (inline='always')


def _kernel(name: str):
    """The Numba-compiled kernel `name` (compiled once per process, or loaded from the on-disk cache)."""
    fn = _KERNELS.get(name)
    if fn is None:
        import numba

        g = globals()
        for h in _HELPERS:  # kernels call these by their global name: make it the compiled dispatcher
            if h not in _KERNELS:
                opts = {"inline": "always"} if h in _INLINED else {}
                _KERNELS[h] = g[h] = numba.njit(cache=True, nogil=True, **opts)(g[h + "_py"])
        fn = numba.njit(cache=True, nogil=True)(g[name + "_py"])
        _KERNELS[name] = fn
    return fn


def _decode_row_into(*a):  # replaced by the compiled helper on first kernel use (see `_kernel`)
    return _decode_row_into_py(*a)


def _unpack_id(*a):
    return _unpack_id_py(*a)


def _project_row(*a):
    return _project_row_py(*a)


def _merge(*a):
    return _merge_py(*a)


def _grow(*a):
    return _grow_py(*a)


def _row_bound(*a):
    return _row_bound_py(*a)


# ------------------------------------------------------------------------------------------
# Rows -> student tokens
# ------------------------------------------------------------------------------------------


def example_key(row: Mapping, key_column: str | None = None) -> str:
    """The key linking a dataset row to teacher-store examples: `xtok.store.example_key`, the rule
    `xtok extract` used (the key column / `id` / `key`, else a content hash)."""
    global _STORE_KEY
    if _STORE_KEY is None:
        from .store import example_key as _k

        _STORE_KEY = _k
    return _STORE_KEY(row, key_column)


_STORE_KEY = None


@dataclass
class StudentExample:
    key: str
    input_ids: np.ndarray   # int64 [S]
    labels: np.ndarray      # int64 [S], IGNORE_INDEX where no loss
    truncated: bool = False


# ------------------------------------------------------------------------------------------
# Teachers
# ------------------------------------------------------------------------------------------


@dataclass
class TeacherSpec:
    """One teacher: its tokenizer, its store (`xtok extract` output) and the projection W
    (`xtok build-projection` output) from its vocabulary into the student's.

    tokenizer/store/projection may be paths/specs (opened lazily in each worker; preferred) or
    already-loaded objects. `weight` is not used by the collator (the loss aggregator owns the
    weights; keep them here to configure both from one list). `min_coverage`: an example whose
    kept chunks cover less than this fraction of the student's trained text tokens (within the
    aligned range) is treated as a text mismatch (present = False). `check_hashes`: verify the
    store's and W's tokenizer hashes against the tokenizers (a store whose manifest records no
    `tokenizer_hash` is refused; pass False to use it unchecked). `min_run_bytes`: chunks are kept
    only inside runs of at least this many matched bytes (docs/collator.md; 0 keeps every chunk).
    """

    name: str
    tokenizer: Any
    store: Any
    projection: Any
    weight: float = 1.0
    min_coverage: float = 0.5
    check_hashes: bool = True
    min_run_bytes: int = MIN_RUN_BYTES
    _tok: Any = field(default=None, init=False, repr=False, compare=False)
    _store: Any = field(default=None, init=False, repr=False, compare=False)
    _proj: Any = field(default=None, init=False, repr=False, compare=False)
    _raw: Any = field(default=None, init=False, repr=False, compare=False)
    _temp: Any = field(default=None, init=False, repr=False, compare=False)

    # -- pickling: paths travel, opened handles do not -----------------------------------------
    def __getstate__(self):
        d = dict(self.__dict__)
        if not _is_loaded(self.store):
            d["_store"] = d["_temp"] = None
        if not _is_loaded(self.projection):
            d["_proj"] = None
        if not isinstance(self.tokenizer, Tokenizer):
            d["_tok"] = None
        d["_raw"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)

    # -- lazy handles ------------------------------------------------------------------------
    @property
    def tok(self) -> Tokenizer:
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer)
        return self._tok

    @property
    def teacher_store(self):
        if self._store is None:
            if _is_loaded(self.store):
                store = self.store
            else:
                from .store import TeacherStore

                store = TeacherStore(self.store)
            if self.check_hashes:
                self._check_store_hash(store)
            self._store = store
        return self._store

    @property
    def temperature(self) -> float:
        """The temperature the store's targets were extracted at (manifest 'temperature'; 1.0 if absent);
        read once."""
        if self._temp is None:
            store = self.teacher_store
            from .store import TeacherStore

            if isinstance(store, TeacherStore):
                t = store.temperature
            else:
                man = _manifest(store)
                t = man.get("temperature") if man is not None else None
            try:
                self._temp = 1.0 if t is None else float(t)
            except (TypeError, ValueError):
                raise CollatorError(f"teacher {self.name!r}: store {_store_name(self.store)} has a manifest "
                                    f"'temperature' of {t!r}, not a number; fix the manifest or re-extract the "
                                    "store.") from None
        return self._temp

    def projector(self, student: Tokenizer) -> "_Projector":
        """The (lazily loaded) projection W, wrapped for the collator."""
        if self._proj is None:
            proj = self.projection
            if not _is_loaded(proj):
                from .projection import ProjectionMatrix

                proj = ProjectionMatrix.load(proj, device="cpu", teacher=self.tok, student=student,
                                             check_hashes=self.check_hashes)
            elif self.check_hashes and hasattr(proj, "check_tokenizers"):
                proj.check_tokenizers(self.tok, student)
            self._proj = _Projector(proj)
        return self._proj

    def _check_store_hash(self, store) -> None:
        man = _manifest(store)
        h = man.get("tokenizer_hash") if man is not None else None
        if not h:
            raise CollatorError(
                f"teacher {self.name!r}: store {_store_name(self.store)} records no tokenizer_hash "
                f"({'its manifest has no such field' if man is not None else 'it has no manifest'}), so it cannot "
                f"be checked against the teacher tokenizer {self.tok.name!r}. Use a store written by `xtok extract` "
                "(its manifest.json records the hash), or pass TeacherSpec(..., check_hashes=False) to use it "
                "unchecked.")
        if h != self.tok.content_hash:
            raise CollatorError(
                f"teacher {self.name!r}: store {_store_name(self.store)} was extracted with tokenizer hash {h[:12]}…, "
                f"but the teacher tokenizer {self.tok.name!r} has hash {self.tok.content_hash[:12]}…. "
                "Pass the tokenizer the store was extracted with.")

    def lookup(self, key: str):
        """The stored example for `key`, or None when the store lacks it. For an `xtok extract` store
        this is a `_RawExample` (top-k rows decoded on demand from the packed bytes); any other store's
        own example object otherwise."""
        store = self.teacher_store
        raw = self._raw
        if raw is None:
            raw = self._raw = _RawReader.of(store) or False
        if raw is not False:
            return raw.get(key)
        try:
            return store[key]
        except (KeyError, IndexError):
            return None


def _store_name(store) -> str:
    """How a store is named in messages: its path, else its type."""
    if not _is_loaded(store):
        return str(store)
    path = getattr(store, "path", None)
    return str(path) if isinstance(path, (str, os.PathLike)) else f"<{type(store).__name__}>"


def _manifest(store):
    man = getattr(store, "manifest", None)
    return man if isinstance(man, Mapping) else None


def _is_loaded(x) -> bool:
    return not isinstance(x, (str, os.PathLike))


def _csr_of(proj):
    """(indptr int64, cols int32, vals float32, n_student) of W when the projection exposes its CSR
    arrays (`xtok.projection.ProjectionMatrix` does), else None (then `proj.project` is used)."""
    if all(hasattr(proj, a) for a in ("indptr", "indices", "data", "shape")):
        return (np.ascontiguousarray(proj.indptr, dtype=np.int64), np.ascontiguousarray(proj.indices, dtype=np.int32),
                np.ascontiguousarray(proj.data, dtype=np.float32), int(proj.shape[1]))
    return None


# ------------------------------------------------------------------------------------------
# Store rows: raw access to `xtok extract` shards
# ------------------------------------------------------------------------------------------


class _RawReader:
    """Reads `xtok.store.TeacherStore` rows as `_RawExample`s through `TeacherStore.raw_row` (the
    store's key index and row-group cache), leaving the top-k columns packed: `_decode_rows` decodes
    only the wanted rows instead of unpacking and dequantising (float64 exp/log over P*k) every row.
    `of()` returns None for any other store type; `TeacherSpec.lookup` then uses `store[key]`."""

    def __init__(self, store):
        from .store import _code_nats

        self.store = store
        self.table = np.exp(-_code_nats(np.arange(256)))  # exp(-d(code)) of every log-prob code

    @classmethod
    def of(cls, store):
        from .store import TeacherStore

        return cls(store) if isinstance(store, TeacherStore) else None

    def get(self, key: str):
        st = self.store
        got = st.raw_row(str(key))
        if got is None:
            return None
        cols, i = got
        return _RawExample(cols, i, int(st.top_k), int(st.sample_tail), int(st.vocab_size), self.table)


class _RawExample:
    """One stored example with its top-k rows still packed. input_ids, positions, tail_mass and
    target_logprob are decoded (small); `rows(rows)` decodes the wanted top-k rows (+ tail samples)."""

    def __init__(self, cols, i, k, m, vocab_size, table):
        from .store import _NO_BYTES, _from_runs, _id_mode, _raw_bytes, unpack_ids

        def raw(name):
            return _raw_bytes(cols, name, i)

        T = int(cols["n_tokens"][i].as_py())
        P = int(cols["n_positions"][i].as_py())
        self.key = cols["key"][i].as_py()
        self.k, self.m, self.table = k, m, table
        self.id_mode = _id_mode(vocab_size)
        self.input_ids = unpack_ids(raw("input_ids"), T, vocab_size)
        self.positions = _from_runs(raw("position_runs").view("<i4").reshape(-1, 2))
        self.tail_mass = raw("tail_mass").view("<f4").astype(np.float32)
        self.target_logprob = raw("target_logprob").view("<f2").astype(np.float32)
        self.ids_buf = raw("topk_ids")
        self.deltas = raw("topk_codes")
        nk = raw("n_kept")
        self.n_kept = nk.view("<u2").astype(np.int64) if nk.size else np.zeros(0, np.int64)
        self.tail_buf = raw("tail_ids")
        self.tail_none = raw("tail_none")
        if not self.tail_buf.size:
            self.m = 0
        if not self.m:  # no sampled tail ids: the kernels get none (read-only, as the shard views)
            self.tail_buf = self.tail_none = _NO_BYTES
        if P and (self.positions.shape[0] != P or self.tail_mass.shape[0] != P
                  or self.deltas.shape[0] != P * max(k - 1, 0)):
            raise ValueError(f"store row {self.key!r}: column sizes do not match n_positions={P}")

    def raw_args(self) -> tuple:
        """The kernel arguments (`_decode_row_into`) describing this row's packed top-k and tail."""
        return (self.ids_buf, self.id_mode, self.deltas, self.k, self.n_kept, self.tail_mass, self.tail_buf,
                self.tail_none, self.m, self.table)

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [n, k+m] (-1 = none), probs float32 [n, k+m]) of store rows `rows`."""
        return _kernel("_decode_rows")(np.ascontiguousarray(rows, dtype=np.int64), *self.raw_args())


def _dense_rows(ex, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n, k+m], probs float32 [n, k+m]) of rows of any example object with numpy-like
    topk_ids / topk_logprobs / tail_mass (/ tail_ids) (e.g. `TeacherStore[key]`)."""
    if isinstance(ex, _RawExample):
        return ex.rows(rows)
    ids = np.asarray(ex.topk_ids)[rows].astype(np.int32)
    probs = np.exp(np.asarray(ex.topk_logprobs, dtype=np.float32)[rows])
    tail_ids = getattr(ex, "tail_ids", None)
    if tail_ids is not None and np.asarray(tail_ids).size:
        tail_ids = np.asarray(tail_ids)
        tw = np.asarray(ex.tail_mass, dtype=np.float32)[rows] / np.float32(tail_ids.shape[1])
        ids = np.concatenate([ids, tail_ids[rows].astype(np.int32)], axis=1)
        probs = np.concatenate([probs, np.repeat(tw[:, None], tail_ids.shape[1], axis=1)], axis=1)
    return np.ascontiguousarray(ids), np.ascontiguousarray(probs, dtype=np.float32)


# ------------------------------------------------------------------------------------------
# Projection of stored rows
# ------------------------------------------------------------------------------------------


class _Projector:
    """Projects rows of a stored example into student space -> flat CSR (ids, probs, offsets, tail).

    With W's CSR arrays (ProjectionMatrix) a Numba kernel does projection + merge of duplicate
    student ids + tail (fused with the decoding of the packed rows for an `xtok extract` store); any
    other projection object is used through its `project()`."""

    def __init__(self, proj):
        self.proj = proj
        self.csr = _csr_of(proj)
        self.onehot = False
        self.cv = np.zeros((1, 2), np.float32)
        if self.csr is not None:
            indptr, cols, vals, n_s = self.csr
            nnz = np.diff(indptr)
            if (nnz.max() if nnz.size else 0) <= 1 and n_s < (1 << 24):  # first-token W: one gather per id
                has = nnz > 0
                cv = np.zeros((nnz.shape[0], 2), np.float32)  # student ids < 2^24 are exact in float32
                cv[:, 0] = -1
                cv[has, 0] = cols[indptr[:-1][has]]
                cv[has, 1] = vals[indptr[:-1][has]]
                self.onehot, self.cv = True, cv

    def __call__(self, ex, rows: np.ndarray):
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if self.csr is not None:
            indptr, cols, vals, n_s = self.csr
            if isinstance(ex, _RawExample):
                return _kernel("_project_raw")(rows, *ex.raw_args(), self.onehot, self.cv, indptr, cols, vals, n_s)
            ids, probs = _dense_rows(ex, rows)
            return _kernel("_project_rows")(self.onehot, self.cv, indptr, cols, vals, n_s, ids, probs)
        ids, probs = _dense_rows(ex, rows)
        o, p = self.proj.project(ids.astype(np.int64), probs)
        o, p = np.asarray(_to_numpy(o)), np.asarray(_to_numpy(p), dtype=np.float32)
        keep = (o >= 0) & (p > 0)
        offsets = np.zeros(o.shape[0] + 1, np.int64)
        np.cumsum(keep.sum(axis=1), out=offsets[1:])
        tail = np.clip(1.0 - np.where(keep, p, 0).sum(axis=1, dtype=np.float64), 0.0, 1.0).astype(np.float32)
        return o[keep].astype(np.int32), p[keep], offsets, tail


# ------------------------------------------------------------------------------------------
# Per-example targets
# ------------------------------------------------------------------------------------------


@dataclass
class TeacherTargets:
    """One teacher's targets for one student example (compact; padded at batch assembly)."""

    positions: np.ndarray        # int64 [n] student output positions
    flat_ids: np.ndarray         # int32 [nnz] projected student ids, rows back to back
    flat_probs: np.ndarray       # float32 [nnz]
    offsets: np.ndarray          # int64 [n + 1] row i = flat[offsets[i]:offsets[i+1]]
    tail_mass: np.ndarray        # float32 [n]
    chunk_spans: np.ndarray      # int64 [c, 2]
    chunk_logprob: np.ndarray    # float32 [c]
    present: bool
    counts: dict
    teacher_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64 [n]

    @property
    def width(self) -> int:
        return int(np.diff(self.offsets).max()) if self.offsets.shape[0] > 1 else 0

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n, K] int64, probs [n, K] float32), padded with 0 (for inspection and tests)."""
        n, K = self.positions.shape[0], self.width
        ids, pr = np.zeros((n, K), np.int64), np.zeros((n, K), np.float32)
        if n and K:
            _kernel("_fill_rows")(self.flat_ids, self.flat_probs, self.offsets, ids, pr)
        return ids, pr


def _empty_targets(present: bool, counts: dict) -> TeacherTargets:
    return TeacherTargets(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32),
                          np.zeros(1, np.int64), np.zeros(0, np.float32), np.zeros((0, 2), np.int64),
                          np.zeros(0, np.float32), present, counts)


def _byte_cum(tok: Tokenizer, ids: np.ndarray, strip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(cum int64 [n+1], skip int64 [n]): byte offsets of the token stream `ids` (special tokens have
    no bytes, as the aligner counts them), and 1 for a token whose leading dummy-prefix space is dropped
    (strip and a prefix_space tokenizer: the first token with bytes at the start or after a special
    token, starting with a space; as xtok.align)."""
    tb = tok.token_bytes
    ln = tb.lengths[ids]
    skip = np.zeros(ids.shape[0], np.int64)
    if strip and tok.prefix_space and ids.shape[0]:
        has = np.flatnonzero(ln > 0)
        if has.size:
            nsp = np.cumsum(tb.is_special[ids])
            prev = np.empty(has.size, np.int64)
            prev[0] = -1
            prev[1:] = nsp[has[:-1]]
            after = (nsp[has] - prev) > 0  # a special token since the previous token with bytes
            after[0] = True
            el = has[after & tb.word_start[ids[has]]]
            skip[el] = 1
            ln = ln - skip
    cum = np.zeros(ids.shape[0] + 1, np.int64)
    np.cumsum(ln, out=cum[1:])
    return cum, skip


def _last_common(a: np.ndarray, b: np.ndarray, limit: int) -> int:
    """The largest value <= limit present in both sorted arrays (0 if none)."""
    a, b = a[: int(np.searchsorted(a, limit, side="right"))], b[: int(np.searchsorted(b, limit, side="right"))]
    if not a.size or not b.size:
        return 0
    idx = np.minimum(np.searchsorted(a, b), a.size - 1)
    hit = np.flatnonzero(a[idx] == b)
    return int(b[hit[-1]]) if hit.size else 0


def _align_chunks(teacher: Tokenizer, student: Tokenizer, t_ids: np.ndarray, s_ids: np.ndarray):
    """Alignment chunks int64 [n, 4], the path taken ('exact' | 'prefix' | 'dp') and the byte offsets
    (cum int64 [T+1], [S+1]; special tokens have no bytes) of both token sequences.

    When one byte stream is a prefix of the other (equal texts; truncation on either side), only the
    common prefix is aligned (an exact merge: chunks up to the last byte where both sides have a token
    boundary; the rest are gaps). Otherwise the aligner's DP runs, each side first cut to the other
    side's byte length (+ 1/8 + 256 bytes of slack): text one side lacks cannot align. Chunk indices
    refer to the uncut ids."""
    from .align import align_arrays

    tb, sb = teacher.token_bytes, student.token_bytes
    tcum, _ = _byte_cum(teacher, t_ids, False)
    scum, _ = _byte_cum(student, s_ids, False)

    def run(t, s):
        ch, _tg, _sg, info = align_arrays(tb.data, tb.offsets, tb.is_special, sb.data, sb.offsets, sb.is_special,
                                          t, s, teacher.prefix_space, student.prefix_space)
        return np.asarray(ch, dtype=np.int64).reshape(-1, 4), str(info[0])

    prefix = _kernel("_common_prefix")
    modes = [False] + ([True] if teacher.prefix_space or student.prefix_space else [])
    for strip in modes:
        if strip:
            tc, tsk = _byte_cum(teacher, t_ids, True)
            sc, ssk = _byte_cum(student, s_ids, True)
        else:
            tc, sc = tcum, scum
            tsk, ssk = np.zeros(t_ids.shape[0], np.int64), np.zeros(s_ids.shape[0], np.int64)
        nt, ns = int(tc[-1]), int(sc[-1])
        L = prefix(tb.data, tb.offsets, t_ids, tc, tsk, sb.data, sb.offsets, s_ids, sc, ssk)
        if L < min(nt, ns):
            continue
        if nt == ns:  # equal streams
            ch, path = run(t_ids, s_ids)
            if path == "exact":
                return ch, path, tcum, scum
            continue
        b = _last_common(tc, sc, min(nt, ns))
        it = int(np.searchsorted(tc[1:], b, side="right"))
        js = int(np.searchsorted(sc[1:], b, side="right"))
        ch, path = run(t_ids[:it], s_ids[:js]) if it and js else (np.zeros((0, 4), np.int64), "exact")
        if path == "exact":
            return ch, "prefix", tcum, scum
    nt, ns = int(tcum[-1]), int(scum[-1])
    t_cut = t_ids[: int(np.searchsorted(tcum[1:], ns + ns // 8 + 256, side="right"))]
    s_cut = s_ids[: int(np.searchsorted(scum[1:], nt + nt // 8 + 256, side="right"))]
    ch, path = run(t_cut, s_cut)
    return ch, path, tcum, scum


def run_filter(chunks: np.ndarray, t_cum: np.ndarray, s_cum: np.ndarray, min_run_bytes: int = MIN_RUN_BYTES):
    """Which alignment chunks lie in a long enough run of equal text (bool [n]).

    chunks int [n, 4] (t_start, t_end, s_start, s_end), in order; t_cum/s_cum: byte offsets of the
    token sequences (special tokens have no bytes). A run is a maximal sequence of consecutive chunks
    with no byte between two of them on either side (only byte-less special tokens may sit between),
    so inside a run the teacher-minus-student byte offset is constant and the text from the run's start
    is byte-equal on both sides. A run is kept when its matched bytes (per chunk the smaller side's byte
    length) reach `min_run_bytes`, or when it starts at byte 0 on both sides (the whole preceding text
    is equal: empty)."""
    ch = np.asarray(chunks, dtype=np.int64).reshape(-1, 4)
    n = ch.shape[0]
    if n == 0 or min_run_bytes <= 0:
        return np.ones(n, bool)
    tb0, tb1, sb0, sb1 = t_cum[ch[:, 0]], t_cum[ch[:, 1]], s_cum[ch[:, 2]], s_cum[ch[:, 3]]
    brk = np.ones(n, bool)
    brk[1:] = (tb0[1:] != tb1[:-1]) | (sb0[1:] != sb1[:-1])
    starts = np.flatnonzero(brk)
    run_bytes = np.add.reduceat(np.minimum(tb1 - tb0, sb1 - sb0), starts)
    ok = (run_bytes >= min_run_bytes) | ((tb0[starts] == 0) & (sb0[starts] == 0))
    return ok[np.cumsum(brk) - 1]


def build_targets(chunks: np.ndarray, ex, label_ok: np.ndarray, project, student_special: np.ndarray,
                  min_coverage: float = 0.5, t_cum: np.ndarray | None = None, s_cum: np.ndarray | None = None,
                  min_run_bytes: int = MIN_RUN_BYTES) -> TeacherTargets:
    """Targets of one teacher for one student example.

    chunks int [n, 4] (t_start, t_end, s_start, s_end) aligning `ex.input_ids` with the student
    ids; `ex` a stored example; `label_ok` bool [S] (student token trained); `project(ex, rows)` ->
    flat CSR (ids, probs, offsets, tail) of the projected stored rows; `student_special` bool [S]
    (student tokens without bytes, left out of the coverage test); t_cum/s_cum: byte offsets of both
    token sequences for the run filter (`run_filter`; None: no filter)."""
    S = label_ok.shape[0]
    counts = {"targets": 0, "missing_positions": 0, "uncovered_tokens": 0, "chunks": 0, "chunks_masked": 0,
              "mismatch": 0, "short_run_chunks": 0}
    T = int(np.asarray(ex.input_ids).shape[0])
    ch = np.asarray(chunks, dtype=np.int64).reshape(-1, 4)
    n_all = ch.shape[0]
    if t_cum is not None and s_cum is not None:
        keep = run_filter(ch, t_cum, s_cum, min_run_bytes)
        counts["short_run_chunks"] = int(n_all - keep.sum())
        ch = ch[keep]
    ts, te, ss, se = ch[:, 0], ch[:, 1], ch[:, 2], ch[:, 3]

    # -- text match: trained student text tokens inside kept chunks, within the aligned range ------
    text_lab = label_ok & ~student_special
    ctl = np.zeros(S + 1, np.int64)
    np.cumsum(text_lab, out=ctl[1:])
    if ch.shape[0]:  # chunks are disjoint and ordered: covered = sum over chunks
        num = int((ctl[se] - ctl[ss]).sum())
        denom = int(ctl[int(se.max())])
        counts["uncovered_tokens"] = int(ctl[S]) - num
        mismatch = denom > 0 and num < min_coverage * denom
    else:
        counts["uncovered_tokens"] = int(ctl[S])
        mismatch = counts["uncovered_tokens"] > 0
    if mismatch:
        counts["mismatch"] = 1
        return _empty_targets(False, counts)

    positions = np.asarray(ex.positions, dtype=np.int64)
    # row of every teacher output position in the store (-1: not stored)
    row_of = np.full(T + 1, -1, np.int64)
    inr = (positions >= 0) & (positions < T)
    row_of[positions[inr]] = np.nonzero(inr)[0]

    # -- KL targets at chunk starts ---------------------------------------------------------
    sel = (ts >= 1) & (ss >= 1) & (te <= T)
    sel[sel] = label_ok[ss[sel]]
    tp = ts[sel] - 1
    rows = row_of[tp]
    sp = ss[sel] - 1
    have = rows >= 0
    counts["missing_positions"] = int((~have).sum())
    rows, sp, tp = rows[have], sp[have], tp[have]
    counts["targets"] = int(rows.shape[0])
    if rows.shape[0]:
        flat_ids, flat_p, offsets, tail = project(ex, rows)
    else:
        flat_ids, flat_p, offsets = np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(1, np.int64)
        tail = np.zeros(0, np.float32)

    # -- chunk log-likelihoods: teacher positions t_start-1 .. t_end-2 all stored ------------------
    lp = np.zeros(T + 1, np.float64)
    st = np.zeros(T + 1, np.int64)
    lp[positions[inr]] = np.asarray(ex.target_logprob, dtype=np.float64)[inr]
    st[positions[inr]] = 1
    clp = np.zeros(T + 2, np.float64)
    np.cumsum(lp, out=clp[1:])
    cst = np.zeros(T + 2, np.int64)
    np.cumsum(st, out=cst[1:])
    cl = np.zeros(S + 1, np.int64)
    np.cumsum(label_ok, out=cl[1:])
    csel = (ts >= 1) & (ss >= 1) & (te <= T) & (se <= S) & (te > ts) & (se > ss)
    a, b = np.where(csel, ts - 1, 0), np.where(csel, te - 1, 0)  # teacher positions [a, b)
    csel &= (cst[b] - cst[a]) == (b - a)                      # every teacher position stored
    s0, s1 = np.where(csel, ss, 0), np.where(csel, se, 0)
    csel &= (cl[s1] - cl[s0]) == (s1 - s0)                      # every student token trained
    counts["chunks"] = int(csel.sum())
    counts["chunks_masked"] = int(n_all - csel.sum())
    spans = np.stack([ss[csel], se[csel]], axis=1)
    chunk_lp = (clp[b[csel]] - clp[a[csel]]).astype(np.float32)
    return TeacherTargets(sp, flat_ids, flat_p, offsets, tail, spans, chunk_lp, True, counts, tp)


# ------------------------------------------------------------------------------------------
# The collator
# ------------------------------------------------------------------------------------------


_TEACHER_COUNTERS = ("examples", "present", "missing", "mismatch", "targets", "missing_positions",
                     "uncovered_tokens", "chunks", "chunks_masked", "short_run_chunks", "dp_aligned")


class CrossTokenizerCollator:
    """`collate_fn` for a DataLoader over rows `{"text": str}` or `{"messages": [...]}` (plus the
    example key column; see `example_key`).

    Returns `input_ids [B,T] long, attention_mask [B,T] long, labels [B,T] long (-100 = no loss),
    teachers: {name: {positions, mask, target_ids, target_probs, tail_mass, chunk_spans,
    chunk_teacher_logprob, chunk_mask, present, temperature}}, stats: {..., name: counters}` (docs/collator.md).

    student_tokenizer: spec or Tokenizer. max_length: student tokens kept (right truncation).
    chat_template: template for chat rows (default: the student tokenizer's own / a built-in one).
    add_special_tokens: for text rows, whether the student encoding adds BOS (as its model expects).
    pad_to_multiple_of: round T up. validate: open stores / projections now (hash checks) and fail
    early; handles are dropped again when the collator is pickled into workers.
    """

    def __init__(self, student_tokenizer, teachers: Sequence[TeacherSpec] = (), *, max_length: int = 2048,
                 chat_template: str | None = None, add_special_tokens: bool = True,
                 text_column: str = "text", messages_column: str = "messages", key_column: str | None = None,
                 pad_to_multiple_of: int | None = None, validate: bool = True):
        self.student_spec = student_tokenizer
        self._student = student_tokenizer if isinstance(student_tokenizer, Tokenizer) else None
        self.teachers = list(teachers)
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        if "stats" in names or any(not isinstance(n, str) or not n for n in names):
            raise ValueError(f"teacher names must be non-empty strings other than 'stats', got {names}")
        self.max_length = int(max_length)
        self.chat_template = chat_template
        self.add_special_tokens = add_special_tokens
        self.text_column, self.messages_column, self.key_column = text_column, messages_column, key_column
        self.pad_to_multiple_of = pad_to_multiple_of
        if validate:
            for t in self.teachers:
                t.teacher_store  # noqa: B018  (opens it: hash check)
                t.temperature  # noqa: B018  (manifest field check)
                t.projector(self.student)

    def __getstate__(self):
        d = dict(self.__dict__)
        if not isinstance(self.student_spec, Tokenizer):
            d["_student"] = None
        return d

    @property
    def student(self) -> Tokenizer:
        if self._student is None:
            self._student = load_tokenizer(self.student_spec)
        return self._student

    @property
    def pad_id(self) -> int:
        s = self.student
        for i in (s.pad_id, s.eos_id):
            if i is not None:
                return int(i)
        return 0

    # -- student side ------------------------------------------------------------------------
    def _key_row(self, row: Mapping) -> Mapping:
        """The fields the key rule reads, under the names `xtok extract` gives them."""
        if self.key_column is not None or any(row.get(c) is not None for c in ("id", "key")):
            return row
        if row.get(self.messages_column) is not None:
            return {"messages": row[self.messages_column]}
        if row.get(self.text_column) is not None:
            return {"text": row[self.text_column]}
        return {c: row[c] for c in ("user", "assistant") if c in row}

    def tokenize(self, row) -> StudentExample:
        """Student ids + labels of one row (text: every token; chat: assistant tokens)."""
        if isinstance(row, str):
            row = {self.text_column: row}
        key = example_key(self._key_row(row), self.key_column)
        msgs = row.get(self.messages_column)
        if msgs is None and row.get(self.text_column) is None and "user" in row and "assistant" in row:
            msgs = [{"role": "user", "content": row["user"]}, {"role": "assistant", "content": row["assistant"]}]
        if msgs is not None:
            from .chat import render_chat

            msgs = [{k: v for k, v in m.items() if v is not None} for m in msgs]
            r = render_chat(self.student, msgs, template=self.chat_template)
            ids = np.asarray(r.ids, dtype=np.int64)
            labels = np.where(r.assistant_mask, ids, IGNORE_INDEX)
        else:
            text = row.get(self.text_column)
            if not isinstance(text, str):
                raise ValueError(f"row has no {self.text_column!r} string, {self.messages_column!r} list or "
                                 f"'user'+'assistant' columns: keys {sorted(row)!r}")
            ids = self.student.encode(text, add_special_tokens=self.add_special_tokens)
            labels = ids.copy()
        trunc = ids.shape[0] > self.max_length
        if trunc:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return StudentExample(key, ids, labels, trunc)

    def targets(self, teacher: TeacherSpec, sx: StudentExample) -> TeacherTargets:
        """One teacher's targets for one student example (never raises for a missing/odd example)."""
        ex = teacher.lookup(sx.key)
        if ex is None:
            return _empty_targets(False, {"missing": 1})
        t_ids = np.asarray(ex.input_ids, dtype=np.int64)
        if t_ids.size and (t_ids.min() < 0 or t_ids.max() >= teacher.tok.vocab_size):
            return _empty_targets(False, {"mismatch": 1})  # not this tokenizer's ids
        chunks, path, t_cum, s_cum = _align_chunks(teacher.tok, self.student, t_ids, sx.input_ids)
        label_ok = sx.labels != IGNORE_INDEX
        special = self.student.token_bytes.is_special[sx.input_ids]
        tg = build_targets(chunks, ex, label_ok, teacher.projector(self.student), special, teacher.min_coverage,
                           t_cum, s_cum, teacher.min_run_bytes)
        tg.counts["dp_aligned"] = int(path == "dp")
        return tg

    # -- batch -------------------------------------------------------------------------------
    def __call__(self, rows: Sequence) -> dict:
        import torch

        xs = [self.tokenize(r) for r in rows]
        B = len(xs)
        T = max([x.input_ids.shape[0] for x in xs] + [1])
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            T = (T + m - 1) // m * m
        input_ids = np.full((B, T), self.pad_id, np.int64)
        labels = np.full((B, T), IGNORE_INDEX, np.int64)
        attn = np.zeros((B, T), np.int64)
        for i, x in enumerate(xs):
            n = x.input_ids.shape[0]
            input_ids[i, :n] = x.input_ids
            labels[i, :n] = x.labels
            attn[i, :n] = 1
        out: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attn),
            "labels": torch.from_numpy(labels),
            "teachers": {},
        }
        stats: dict[str, Any] = {"examples": B, "tokens": int(attn.sum()),
                                 "label_tokens": int((labels != IGNORE_INDEX).sum()),
                                 "truncated": int(sum(x.truncated for x in xs))}
        for t in self.teachers:
            per = [self.targets(t, x) for x in xs]
            ts = dict.fromkeys(_TEACHER_COUNTERS, 0)
            ts["examples"] = B
            for tg in per:
                for k, v in tg.counts.items():
                    ts[k] = ts.get(k, 0) + int(v)
                ts["present"] += int(tg.present)
            out["teachers"][t.name] = _pad_teacher(per, torch)
            out["teachers"][t.name]["temperature"] = t.temperature
            stats[t.name] = ts
        out["stats"] = stats
        return out


def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _pad_teacher(per: list[TeacherTargets], torch) -> dict:
    B = len(per)
    P = max([t.positions.shape[0] for t in per] + [1])
    K = max([t.width for t in per] + [1])
    C = max([t.chunk_spans.shape[0] for t in per] + [1])
    pos = np.zeros((B, P), np.int64)
    mask = np.zeros((B, P), bool)
    tid = np.zeros((B, P, K), np.int32)  # int32: a third fewer bytes to pad and to send from the worker
    tpr = np.zeros((B, P, K), np.float32)
    tail = np.zeros((B, P), np.float32)
    spans = np.zeros((B, C, 2), np.int64)
    clp = np.zeros((B, C), np.float32)
    cmask = np.zeros((B, C), bool)
    present = np.zeros(B, bool)
    fill = _kernel("_fill_rows")
    for i, t in enumerate(per):
        n, c = t.positions.shape[0], t.chunk_spans.shape[0]
        present[i] = t.present
        if n:
            pos[i, :n] = t.positions
            mask[i, :n] = True
            fill(t.flat_ids, t.flat_probs, t.offsets, tid[i], tpr[i])
            tail[i, :n] = t.tail_mass
        if c:
            spans[i, :c] = t.chunk_spans
            clp[i, :c] = t.chunk_logprob
            cmask[i, :c] = True
    f = torch.from_numpy
    return {"positions": f(pos), "mask": f(mask), "target_ids": f(tid), "target_probs": f(tpr), "tail_mass": f(tail),
            "chunk_spans": f(spans), "chunk_teacher_logprob": f(clp), "chunk_mask": f(cmask), "present": f(present)}
