"""Teachers as the collator sees them: `TeacherSpec` (tokenizer + store + projection W, opened lazily in
each DataLoader worker, hash-checked) and `RowProjector` (stored top-k rows -> student-space targets).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..alignment import MIN_RUN_BYTES
from ..projection import ProjectionMatrix
from ..projection.kernels import project_rows_flat, sparse_w
from ..store import PackedExample, TeacherStore
from ..tokens import Tokenizer, load_tokenizer
from .targets import decode_project_rows

__all__ = ["TeacherSpec", "RowProjector", "CollatorError", "dense_rows"]


class CollatorError(ValueError):
    """A teacher set-up the collator refuses (store/tokenizer mismatch, unverifiable store); the message
    names the store and the fix."""


@dataclass
class TeacherSpec:
    """One teacher: its tokenizer, where its distributions come from, and the projection W
    (`xtok build-projection` output) from its vocabulary into the student's.

    Distributions come from a `store` (`xtok extract` output; offline) or a live `model` (a causal LM
    run during training; online; the collator plans the targets in its workers and
    `fill_online_targets` / `xtok.DistillationTrainer` runs the model on the training device).
    tokenizer/store/projection may be paths/specs (opened lazily in each worker; preferred) or
    already-loaded objects; a `model` is never sent to DataLoader workers. The loss weights live in
    `MultiTeacherLossAggregator` (by teacher name).
    `temperature`: online, the temperature of the teacher's softmax (default 1.0; the KL loss's tau must
    match it); with a store, None (the store's manifest says) or the value the store must have.
    Online only: `top_k` (teacher entries per position), `chat_template` (the teacher's own; default: its tokenizer's),
    `add_bos` (text rows: prepend BOS; default: when the tokenizer has one), `max_length` (teacher
    tokens kept).
    `min_coverage`: an example whose kept chunks cover less than this fraction of the student's trained
    text tokens (within the aligned range) is treated as a text mismatch (present = False).
    `check_hashes`: verify the store's and W's tokenizer hashes against the tokenizers (a store whose
    manifest records no `tokenizer_hash` is refused; pass False to use it unchecked). `min_run_bytes`:
    chunks are kept only inside runs of at least this many matched bytes (docs/collator.md; 0 keeps
    every chunk).
    """

    name: str
    tokenizer: Any
    store: Any = None
    projection: Any = None
    min_coverage: float = 0.5
    check_hashes: bool = True
    min_run_bytes: int = MIN_RUN_BYTES
    model: Any = field(default=None, repr=False, compare=False)
    top_k: int = 32
    temperature: float | None = None
    chat_template: str | None = None
    add_bos: bool | None = None
    max_length: int | None = None
    _tok: Any = field(default=None, init=False, repr=False, compare=False)
    _store: Any = field(default=None, init=False, repr=False, compare=False)
    _proj: Any = field(default=None, init=False, repr=False, compare=False)
    _temp: Any = field(default=None, init=False, repr=False, compare=False)
    runner: Any = field(default=None, init=False, repr=False, compare=False)  # OnlineTeacher, main process only

    def __post_init__(self):
        if (self.store is None) == (self.model is None):
            raise ValueError(f"TeacherSpec {self.name!r}: give exactly one of store= (an `xtok extract` store: offline) "
                             "or model= (a causal LM run during training: online).")
        if self.model is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ValueError(f"TeacherSpec {self.name!r}: top_k must be an int >= 1, got {self.top_k!r}.")
        if self.temperature is not None and not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"TeacherSpec {self.name!r}: temperature must be > 0, got {self.temperature!r}.")

    @property
    def online(self) -> bool:
        """True for a live teacher (a model), False for a store."""
        return self.model is not None

    # -- pickling: paths travel, opened handles and models do not ----------------------------
    def __getstate__(self):
        d = dict(self.__dict__)
        d["model"] = None if self.model is None else _InMainProcess(self.name)
        d["runner"] = None
        if not _is_loaded(self.store):
            d["_store"] = d["_temp"] = None
        if not _is_loaded(self.projection):
            d["_proj"] = None
        if not isinstance(self.tokenizer, Tokenizer):
            d["_tok"] = None
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
            store = self.store if _is_loaded(self.store) else TeacherStore(self.store)
            if self.check_hashes:
                self._check_store_hash(store)
            self._store = store
        return self._store

    @property
    def target_temperature(self) -> float:
        """The temperature of this teacher's targets: online, `temperature` (default 1.0); a store's,
        its manifest's 'temperature' (1.0 if absent; must equal `temperature` when that is given). Read once."""
        if self._temp is None:
            if self.online:
                self._temp = 1.0 if self.temperature is None else float(self.temperature)
                return self._temp
            man = _manifest(self.teacher_store)
            t = man.get("temperature") if man is not None else None
            try:
                got = 1.0 if t is None else float(t)
            except (TypeError, ValueError):
                raise CollatorError(f"teacher {self.name!r}: store {_store_name(self.store)} has a manifest "
                                    f"'temperature' of {t!r}, not a number; fix the manifest or re-extract the "
                                    "store.") from None
            if self.temperature is not None and abs(got - float(self.temperature)) > 1e-9 * max(1.0, got):
                raise CollatorError(f"teacher {self.name!r}: store {_store_name(self.store)} was extracted at "
                                    f"temperature {got:g}, not the {float(self.temperature):g} given; re-extract with "
                                    f"--temperature {float(self.temperature):g} or drop temperature=.")
            self._temp = got
        return self._temp

    def projector(self, student: Tokenizer) -> "RowProjector":
        """The (lazily loaded) projection W, wrapped for the collator."""
        if self.projection is None:
            raise ValueError(f"TeacherSpec {self.name!r}: projection= is required (the W file of `xtok build-projection "
                             "--teacher T --student S`).")
        if self._proj is None:
            proj = self.projection
            if not _is_loaded(proj):
                proj = ProjectionMatrix.load(proj, device="cpu", teacher=self.tok, student=student,
                                             check_hashes=self.check_hashes)
            elif self.check_hashes and hasattr(proj, "check_tokenizers"):
                proj.check_tokenizers(self.tok, student)
            self._proj = RowProjector(proj)
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
        this is a `PackedExample` (top-k rows decoded on demand from the packed bytes); any other store's
        own example object otherwise."""
        store = self.teacher_store
        if isinstance(store, TeacherStore):
            return store.packed(key)
        try:
            return store[key]
        except (KeyError, IndexError):
            return None


class _InMainProcess:
    """What a live teacher's model becomes when a TeacherSpec is pickled (DataLoader workers): the
    workers only tokenise and align; the model runs in the main process."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"<teacher {self.name!r} model: in the main process>"

    def __call__(self, *a, **k):
        raise RuntimeError(f"teacher {self.name!r}: its model lives in the main process (it is not sent to "
                           "DataLoader workers); run it there with fill_online_targets / DistillationTrainer.")


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


def dense_rows(ex, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n, k+m] (-1 = none), probs float32 [n, k+m]) of store rows `rows` of a stored example:
    a `PackedExample` decodes them from its packed bytes; any other example object with numpy-like
    topk_ids / topk_logprobs / tail_mass (/ tail_ids) (e.g. `TeacherStore[key]`) gives them densely."""
    if isinstance(ex, PackedExample):
        return ex.decode_rows(rows)
    ids = np.asarray(ex.topk_ids)[rows].astype(np.int32)
    probs = np.exp(np.asarray(ex.topk_logprobs, dtype=np.float32)[rows])
    tail_ids = getattr(ex, "tail_ids", None)
    if tail_ids is not None and np.asarray(tail_ids).size:
        tail_ids = np.asarray(tail_ids)
        tw = np.asarray(ex.tail_mass, dtype=np.float32)[rows] / np.float32(tail_ids.shape[1])
        ids = np.concatenate([ids, tail_ids[rows].astype(np.int32)], axis=1)
        probs = np.concatenate([probs, np.repeat(tw[:, None], tail_ids.shape[1], axis=1)], axis=1)
    return np.ascontiguousarray(ids), np.ascontiguousarray(probs, dtype=np.float32)


class RowProjector:
    """Projects rows of a stored example into student space -> flat CSR (ids, probs, offsets, tail).

    A `ProjectionMatrix` (or any object with CSR arrays indptr/indices/data/shape) goes through the
    projection kernel, fused with the decoding of the packed rows for an `xtok extract` store
    (`decode_project_rows`); any other projection object is used through its `project()`."""

    def __init__(self, proj):
        self.proj = proj
        if isinstance(proj, ProjectionMatrix):
            self.w = proj.kernel_w
        elif all(hasattr(proj, a) for a in ("indptr", "indices", "data", "shape")):
            self.w = sparse_w(proj.indptr, proj.indices, proj.data, proj.shape)
        else:
            self.w = None

    def __call__(self, ex, rows: np.ndarray):
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if self.w is not None:
            if isinstance(ex, PackedExample):
                return decode_project_rows(rows, ex.rows, self.w)
            ids, probs = dense_rows(ex, rows)
            return project_rows_flat(self.w, ids, probs, False, np.zeros(0, np.float32))
        ids, probs = dense_rows(ex, rows)
        o, p = self.proj.project(ids.astype(np.int64), probs)
        o, p = np.asarray(_to_numpy(o)), np.asarray(_to_numpy(p), dtype=np.float32)
        keep = (o >= 0) & (p > 0)
        offsets = np.zeros(o.shape[0] + 1, np.int64)
        np.cumsum(keep.sum(axis=1), out=offsets[1:])
        tail = np.clip(1.0 - np.where(keep, p, 0).sum(axis=1, dtype=np.float64), 0.0, 1.0).astype(np.float32)
        return o[keep].astype(np.int32), p[keep], offsets, tail


def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)
