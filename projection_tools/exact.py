"""Exact byte matches between two vocabularies, and re-applying them to an (edited) projection matrix.

A teacher token whose bytes equal a student token's bytes maps to that student token with weight 1.
The lookup hashes every token's bytes (FNV-1a 64, Numba), sorts the student hashes and binary-searches
each teacher hash, verifying the bytes: O((V_t + V_s) log V_s), no V_t x V_s work.

When the student vocabulary holds the same bytes under several ids (SentencePiece's `<0x20>` byte
piece and `▁` are both b" "), the id the student tokenizer itself produces for those bytes mid-text
wins (`canonical_student_mask`).

    python -m projection_tools.exact --help
"""
from __future__ import annotations

import sys

import click
import numpy as np
from numba import njit

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


@njit(cache=True, nogil=True)
def _hash_all(data, offsets):
    n = offsets.size - 1
    out = np.empty(n, np.uint64)
    for i in range(n):
        h = np.uint64(0xCBF29CE484222325)
        for p in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(data[p])) * np.uint64(0x100000001B3)
        out[i] = h
    return out


@njit(cache=True, nogil=True)
def _find(h, q_data, qs, qe, sorted_h, sorted_ids, s_data, s_off):
    """Student id whose bytes equal q_data[qs:qe] (hash h), or -1."""
    j = np.searchsorted(sorted_h, h)
    L = qe - qs
    while j < sorted_h.size and sorted_h[j] == h:
        sid = sorted_ids[j]
        a = s_off[sid]
        if s_off[sid + 1] - a == L:
            same = True
            for p in range(L):
                if s_data[a + p] != q_data[qs + p]:
                    same = False
                    break
            if same:
                return sid
        j += 1
    return -1


@njit(cache=True, nogil=True)
def _exact_kernel(t_data, t_off, t_hash, t_ok, sorted_h, sorted_ids, s_data, s_off):
    n = t_off.size - 1
    out = np.full(n, -1, np.int64)
    for i in range(n):
        if t_ok[i]:
            out[i] = _find(t_hash[i], t_data, t_off[i], t_off[i + 1], sorted_h, sorted_ids, s_data, s_off)
    return out


@njit(cache=True, nogil=True)
def _dup_pairs(sorted_h, sorted_ids, s_data, s_off):
    """(a, b) student id pairs with equal bytes (adjacent in hash order, same hash, same bytes)."""
    out_a = []
    out_b = []
    n = sorted_h.size
    i = 0
    while i < n:
        j = i + 1
        while j < n and sorted_h[j] == sorted_h[i]:
            j += 1
        for x in range(i, j):
            for y in range(x + 1, j):
                a, b = sorted_ids[x], sorted_ids[y]
                la = s_off[a + 1] - s_off[a]
                if la == s_off[b + 1] - s_off[b]:
                    same = True
                    for p in range(la):
                        if s_data[s_off[a] + p] != s_data[s_off[b] + p]:
                            same = False
                            break
                    if same:
                        out_a.append(a)
                        out_b.append(b)
        i = j
    return np.array(out_a, np.int64), np.array(out_b, np.int64)


@njit(cache=True, nogil=True)
def _greedy_kernel(q_data, q_off, items, sorted_h, sorted_ids, s_data, s_off, maxlen):
    """Greedy longest-match byte decomposition of token bytes q[items[i]] over the student lookup.
    Returns (counts int64 [n] (-1 = some byte not representable), ids int64 [total])."""
    n = items.size
    total = 0
    for i in range(n):
        total += q_off[items[i] + 1] - q_off[items[i]]
    ids = np.empty(total, np.int64)
    counts = np.zeros(n, np.int64)
    w = 0
    for i in range(n):
        s, e = q_off[items[i]], q_off[items[i] + 1]
        pos = s
        start_w = w
        while pos < e:
            best = -1
            bestlen = 0
            h = np.uint64(0xCBF29CE484222325)
            lim = min(maxlen, e - pos)
            for L in range(1, lim + 1):
                h = (h ^ np.uint64(q_data[pos + L - 1])) * np.uint64(0x100000001B3)
                sid = _find(h, q_data, pos, pos + L, sorted_h, sorted_ids, s_data, s_off)
                if sid >= 0:
                    best = sid
                    bestlen = L
            if best < 0:
                break
            ids[w] = best
            w += 1
            pos += bestlen
        if pos < e or e == s:
            w = start_w
            counts[i] = -1
        else:
            counts[i] = w - start_w
    return counts, ids[:w]


class ByteLookup:
    """Student bytes -> id (canonical ids only: non-special, non-empty, duplicates resolved)."""

    def __init__(self, student_tb, mask: np.ndarray | None = None):
        self.tb = student_tb
        lens = student_tb.lengths
        ok = (~student_tb.is_special) & (lens > 0)
        if mask is not None:
            ok &= mask
        h = _hash_all(student_tb.data, student_tb.offsets)
        ids = np.nonzero(ok)[0].astype(np.int64)
        order = np.argsort(h[ids], kind="stable")
        self.sorted_ids = ids[order]
        self.sorted_h = h[self.sorted_ids]
        self.maxlen = int(lens[ok].max()) if ok.any() else 0

    def lookup(self, query_tb, query_ok: np.ndarray | None = None) -> np.ndarray:
        """int64 [V_q]: the student id with exactly each query token's bytes, or -1."""
        qh = _hash_all(query_tb.data, query_tb.offsets)
        ok = (~query_tb.is_special) & (query_tb.lengths > 0)
        if query_ok is not None:
            ok &= query_ok
        return _exact_kernel(query_tb.data, query_tb.offsets, qh, ok, self.sorted_h, self.sorted_ids,
                             self.tb.data, self.tb.offsets)

    def duplicate_groups(self) -> list[list[int]]:
        """Groups (>= 2 ids) of student tokens with identical bytes."""
        a, b = _dup_pairs(self.sorted_h, self.sorted_ids, self.tb.data, self.tb.offsets)
        parent: dict[int, int] = {}

        def root(x):
            while parent.get(x, x) != x:
                x = parent[x]
            return x

        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = root(x), root(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
        groups: dict[int, list[int]] = {}
        for x in set(a.tolist()) | set(b.tolist()):
            groups.setdefault(root(x), []).append(x)
        return [sorted(g) for g in groups.values()]

    def greedy(self, query_tb, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Greedy longest-match decomposition of query tokens `items`: (counts [-1 = fails], flat ids)."""
        items = np.ascontiguousarray(items, dtype=np.int64)
        return _greedy_kernel(query_tb.data, query_tb.offsets, items, self.sorted_h, self.sorted_ids,
                              self.tb.data, self.tb.offsets, max(self.maxlen, 1))


def canonical_student_mask(student) -> np.ndarray:
    """bool [V_s]: False for student ids shadowed by a same-bytes twin the student tokenizer prefers."""
    from .build import encode_midtext

    tb = student.token_bytes
    mask = np.ones(tb.vocab_size, bool)
    groups = ByteLookup(tb).duplicate_groups()
    if not groups:
        return mask
    texts = [tb.get(g[0]) for g in groups]
    decs = encode_midtext(student, texts)
    for g, dec in zip(groups, decs):
        keep = dec[0] if (dec is not None and len(dec) == 1 and dec[0] in g) else min(g)
        for x in g:
            if x != keep:
                mask[x] = False
    return mask


def exact_map(teacher, student, student_mask: np.ndarray | None = None) -> np.ndarray:
    """int64 [V_t]: the student id with exactly each teacher token's bytes, or -1 (special / none).
    `teacher`, `student`: Tokenizer objects (the student's tokenizer resolves duplicate bytes)."""
    if student_mask is None:
        student_mask = canonical_student_mask(student)
    return ByteLookup(student.token_bytes, student_mask).lookup(teacher.token_bytes)


def apply_exact(W, teacher, student):
    """Copy of W whose exact-match rows are replaced by one-hot rows at the matching student id
    (and whose decompositions for those rows become that single id). Returns (W', n_rows_changed).

    W'.stats are recomputed from W''s arrays (nnz, exact, multi-token, specials, coverage, ...); the
    per-row build tiers are not stored, so `tiers` becomes {exact, special, kept, unmapped} (kept = rows
    taken over from W as they were) and the build's breakdown moves to `tiers_at_build`."""
    from xtok.projection import ProjectionMatrix

    from .build import matrix_stats

    V_t, V_s = W.shape
    if (V_t, V_s) != (teacher.vocab_size, student.vocab_size):
        raise ValueError(f"matrix shape {W.shape} does not match the tokenizers ({teacher.vocab_size}, "
                         f"{student.vocab_size}); pass the teacher/student it was built for.")
    ex = exact_map(teacher, student)
    hit = ex >= 0
    rows, cols, vals = W.coo_arrays()
    old_hit_row = hit[rows]
    # rows already exactly one-hot at the right id are unchanged
    cnt = np.diff(W.indptr)
    at = np.minimum(W.indptr[:-1], max(W.nnz - 1, 0))
    first = W.indices[at] if W.nnz else np.full(V_t, -1)
    first_val = W.data[at] if W.nnz else np.zeros(V_t)
    unchanged = (cnt == 1) & (first == ex) & (first_val == 1.0)
    n_changed = int((hit & ~unchanged).sum())
    keep = ~old_hit_row
    hr = np.nonzero(hit)[0]
    new_rows = np.concatenate([rows[keep].astype(np.int64), hr])
    new_cols = np.concatenate([cols[keep].astype(np.int64), ex[hr]])
    new_vals = np.concatenate([vals[keep], np.ones(hr.size, np.float32)])
    # decompositions: exact rows -> [ex]
    dl = np.diff(W.decomp_offsets)
    new_len = np.where(hit, 1, dl)
    offs = np.zeros(V_t + 1, np.int64)
    np.cumsum(new_len, out=offs[1:])
    row_of = np.repeat(np.arange(V_t), new_len)
    src = W.decomp_offsets[row_of] + (np.arange(int(offs[-1])) - offs[row_of])
    old = W.decomp_ids[np.clip(src, 0, max(W.decomp_ids.size - 1, 0))] if W.decomp_ids.size else np.zeros(src.size, np.int32)
    ids = np.where(hit[row_of], ex[row_of], old).astype(np.int32)
    meta = dict(W.meta)
    opts = dict(meta.get("options", {}))
    opts["exact_reapplied"] = True
    meta["options"] = opts
    W2 = ProjectionMatrix.from_coo(new_rows, new_cols, new_vals, W.shape, decomp_offsets=offs, decomp_ids=ids,
                                   meta=meta, device=W.device)
    old = dict(W.meta.get("stats") or {})
    special = np.asarray(teacher.token_bytes.is_special, bool)
    nonempty = np.diff(W2.indptr) > 0
    tiers = {"exact": int(hit.sum()), "special": int((special & nonempty).sum()),
             "kept": int((~special & ~hit & nonempty).sum()), "unmapped": int((~nonempty).sum())}
    stats = matrix_stats(W2, teacher, hit, {k: v for k, v in tiers.items() if v}, old.get("build_time_s"))
    stats["exact_rows_changed"] = n_changed
    if "tiers" in old:
        stats["tiers_at_build"] = old.get("tiers_at_build", old["tiers"])
    W2.meta["stats"] = stats
    return W2, n_changed


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("matrix", type=click.Path(dir_okay=False))
@click.option("--teacher", "-t", required=True, help="Teacher tokenizer (folder, file, mistral-common:<file>, hub id).")
@click.option("--student", "-s", required=True, help="Student tokenizer (same forms as --teacher).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Where to write the corrected matrix (.safetensors); may equal MATRIX.")
@click.option("--no-check-hashes", is_flag=True, help="Load MATRIX even if its tokenizer hashes differ.")
def cli(matrix, teacher, student, output, no_check_hashes):
    """Re-apply the exact byte-match map to MATRIX (e.g. after editing or learning W): every
    teacher token whose bytes equal a student token's becomes a one-hot row at that token."""
    from xtok.projection import ProjectionError, ProjectionMatrix, check_writable
    from xtok.tokens import TokenizerLoadError, load_tokenizer

    try:
        check_writable(output)  # fail fast, before loading anything
        T, S = load_tokenizer(teacher), load_tokenizer(student)
        W = ProjectionMatrix.load(matrix, teacher=T, student=S, check_hashes=not no_check_hashes)
        W2, n = apply_exact(W, T, S)
        W2.save(output)
    except (ProjectionError, TokenizerLoadError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"exact rows re-applied: {n} changed; wrote {output} (nnz={W2.nnz})")


def main(argv=None):
    return cli.main(args=argv, prog_name="python -m projection_tools.exact")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
