"""Build the teacher -> student projection matrix W (method `first-token`) and the decompositions.

For every teacher token t (row of W):
- exact: t's bytes equal a student token's bytes -> that student token, weight 1 (decomposition [s]);
- multi-token: otherwise the student tokenizer encodes t's bytes *as they would appear mid-text*, and the
  row maps to the first token of that decomposition, weight 1; the whole decomposition is kept.
  Mid-text encoding, in tiers (each verified byte-exactly against t's bytes):
    1. `"\\n" + text`, the prefix's tokens dropped (the boundary must fall between tokens);
    2. `"a" + text` likewise (for texts that merge with a newline, e.g. "\\n\\n");
    3. `text` alone (a SentencePiece/WordPiece dummy-prefix space, when it is a token of its own, dropped);
    4. greedy longest byte match over the student vocabulary (tokens that are not valid UTF-8, e.g.
       byte-level fragments of a multi-byte character, and anything tiers 1-3 could not reproduce);
    5. the student's own encoding of the text without byte verification (normalising students, e.g.
       lower-casing WordPiece), then the student's unk token.
- special tokens: mapped by role (the same special text in the student, then the role its text names,
  e.g. end-of-turn `<|im_end|>` -> the student's end-of-turn token `<|eot_id|>` or else its eos, then the
  role the teacher declares for the id: bos/eos/pad/unk), overridable with a JSON/YAML file; unmapped
  specials get an empty row and are listed in the stats.
When teacher and student have the same content hash W is the identity.

Encoding uses each backend's batch API (tokenizers `encode_batch`, tiktoken `encode_ordinary_batch`,
sentencepiece `encode(list, num_threads)`), only for tokens without an exact match; byte work is Numba.

    python -m projection_tools.build --help
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

from .exact import ByteLookup, canonical_student_mask

TIERS = ("exact", "prefix_newline", "prefix_a", "plain", "bytes_greedy", "unverified", "unk", "special",
         "identity", "unmapped")
_TIER = {n: i for i, n in enumerate(TIERS)}

# Role aliases for special tokens (text -> role). End-of-turn falls back to the student's eos.
ROLE_ALIASES = {
    "bos": ["<s>", "<|begin_of_text|>", "<bos>", "<｜begin▁of▁sentence｜>", "[CLS]", "<|startoftext|>"],
    "eos": ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<｜end▁of▁sentence｜>", "[SEP]"],
    "eot": ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|end_of_turn|>", "<｜end▁of▁turn｜>"],
    "turn_start": ["<|im_start|>", "<|start_header_id|>", "<start_of_turn>"],
    "pad": ["<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>", "<｜▁pad▁｜>"],
    "unk": ["<unk>", "[UNK]"],
}
_ROLE_FALLBACK = {"eot": "eos"}


# --------------------------------------------------------------------------------------------
# batch encoding
# --------------------------------------------------------------------------------------------

def batch_encode_plain(tok, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
    """Encode many texts as plain text (no special tokens added, special-token strings are text) through
    the tokenizer's batch encoder (`Tokenizer.encode_batch`: the backend library's batch API)."""
    if not texts:
        return []
    nt = num_threads or max(1, min(os.cpu_count() or 1, 8))
    return [ids.tolist() for ids in tok.encode_batch(texts, parse_special=False, num_threads=nt)]


@njit(cache=True, nogil=True)
def _verify(enc_ids, enc_off, q_data, q_off, items, prefix_len, s_data, s_off, s_special):
    """Index (into enc_ids) where item i's own tokens start, or -1 when the prefix does not end on a
    token boundary or the remaining tokens' bytes differ from the item's bytes."""
    n = items.size
    out = np.full(n, -1, np.int64)
    V = s_off.size - 1
    for i in range(n):
        a, b = enc_off[i], enc_off[i + 1]
        cum = 0
        j = a
        bad = False
        while j < b and cum < prefix_len:
            sid = enc_ids[j]
            if sid < 0 or sid >= V:
                bad = True
                break
            cum += s_off[sid + 1] - s_off[sid]
            j += 1
        if bad or cum != prefix_len or j >= b:
            continue
        qs, qe = q_off[items[i]], q_off[items[i] + 1]
        p = qs
        ok = True
        for t in range(j, b):
            sid = enc_ids[t]
            if sid < 0 or sid >= V or s_special[sid]:
                ok = False
                break
            for x in range(s_off[sid], s_off[sid + 1]):
                if p >= qe or s_data[x] != q_data[p]:
                    ok = False
                    break
                p += 1
            if not ok:
                break
        if ok and p == qe:
            out[i] = j
    return out


def _flatten(encs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter(map(len, encs), np.int64, len(encs))
    off = np.zeros(len(encs) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    flat = np.fromiter(itertools.chain.from_iterable(encs), np.int64, int(off[-1]))
    return flat, off


def _segments(flat: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenation of flat[starts[i]:ends[i]] and the lengths."""
    lens = (ends - starts).astype(np.int64)
    base = np.repeat(starts - (np.cumsum(lens) - lens), lens)
    return flat[base + np.arange(int(lens.sum()))], lens


def decompose(student, query_tb, items: np.ndarray, lookup: ByteLookup | None = None, *, batch_size: int = 16384,
              progress=None, verified_only: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mid-text student decomposition of the query tokens `items` (ids into `query_tb`).

    Returns (counts int64 [n], flat student ids int64 [sum counts], tier int8 [n]); items in order.
    Count 0 with tier 'unmapped' when nothing works (no greedy lookup, no unk). `verified_only` stops
    after the byte-verified tiers (1-4; tier 4 only with a `lookup`)."""
    items = np.asarray(items, np.int64)
    n = items.size
    s_tb = student.token_bytes
    tier = np.full(n, _TIER["unmapped"], np.int8)
    seg_item, seg_ids, seg_len = [], [], []
    texts: list[str | None] = []
    for i in items.tolist():
        try:
            texts.append(query_tb.get(i).decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(None)
    pending = np.array([k for k, t in enumerate(texts) if t is not None], np.int64)
    ps = int(bool(student.prefix_space))
    for name, prefix in (("prefix_newline", "\n"), ("prefix_a", "a"), ("plain", "")):
        if pending.size == 0:
            break
        plen = len(prefix.encode()) + ps
        ok_all = []
        for c in range(0, pending.size, batch_size):
            chunk = pending[c:c + batch_size]
            encs = batch_encode_plain(student, [prefix + texts[k] for k in chunk.tolist()])
            flat, off = _flatten(encs)
            start = _verify(flat, off, query_tb.data, query_tb.offsets, items[chunk], plen, s_tb.data, s_tb.offsets,
                            s_tb.is_special)
            good = start >= 0
            ids, lens = _segments(flat, start[good], off[1:][good])
            seg_item.append(chunk[good])
            seg_ids.append(ids)
            seg_len.append(lens)
            tier[chunk[good]] = _TIER[name]
            ok_all.append(good)
            if progress is not None:
                progress.update(int(good.sum()))
        pending = pending[~np.concatenate(ok_all)] if ok_all else pending
    rest = np.nonzero(tier == _TIER["unmapped"])[0]
    if rest.size and lookup is not None:
        counts, ids = lookup.greedy(query_tb, items[rest])
        good = counts >= 0
        seg_item.append(rest[good])
        seg_ids.append(ids)
        seg_len.append(counts[good])
        tier[rest[good]] = _TIER["bytes_greedy"]
        if progress is not None:
            progress.update(int(good.sum()))
        rest = rest[~good]
    if rest.size and not verified_only:  # normalising students: take the student's encoding as it is
        txt = [k for k in rest.tolist() if texts[k] is not None]
        encs = batch_encode_plain(student, [texts[k] for k in txt])
        got_i, got_ids, got_len = [], [], []
        for k, e in zip(txt, encs):
            e = [x for x in e if 0 <= x < s_tb.vocab_size and s_tb.offsets[x + 1] > s_tb.offsets[x]]
            if ps and len(e) > 1 and s_tb.get(e[0]) == b" ":
                e = e[1:]
            if e:
                got_i.append(k)
                got_ids.extend(e)
                got_len.append(len(e))
        if got_i:
            gi = np.array(got_i, np.int64)
            seg_item.append(gi)
            seg_ids.append(np.array(got_ids, np.int64))
            seg_len.append(np.array(got_len, np.int64))
            tier[gi] = _TIER["unverified"]
        rest = np.nonzero(tier == _TIER["unmapped"])[0]
        if rest.size and student.unk_id is not None:
            seg_item.append(rest)
            seg_ids.append(np.full(rest.size, student.unk_id, np.int64))
            seg_len.append(np.ones(rest.size, np.int64))
            tier[rest] = _TIER["unk"]
        if progress is not None:
            progress.update(int(rest.size))
    counts = np.zeros(n, np.int64)
    if not seg_item:
        return counts, np.zeros(0, np.int64), tier
    it = np.concatenate(seg_item)
    ln = np.concatenate(seg_len)
    ids = np.concatenate(seg_ids)
    counts[it] = ln
    # reorder segments into item order
    seg_start = np.cumsum(ln) - ln
    order = np.argsort(it, kind="stable")
    ids, _ = _segments(ids, seg_start[order], seg_start[order] + ln[order])
    return counts, ids, tier


def encode_midtext(student, byte_strings: list[bytes]) -> list[np.ndarray | None]:
    """Mid-text student decomposition of raw byte strings (tiers 1-3 only; None when none verifies)."""
    from xtok.tokens import TokenBytes

    tb = TokenBytes.from_list([b if b else b"?" for b in byte_strings])
    counts, ids, tier = decompose(student, tb, np.arange(len(byte_strings)), None, verified_only=True)
    out, pos = [], 0
    for c, t in zip(counts.tolist(), tier.tolist()):
        out.append(ids[pos:pos + c] if t != _TIER["unmapped"] else None)
        pos += c
    return out


# --------------------------------------------------------------------------------------------
# special tokens
# --------------------------------------------------------------------------------------------

def load_special_map(path: str | os.PathLike) -> dict:
    """A JSON or YAML mapping {teacher special (text or id): student token (text or id) or null}
    (optionally under a top-level key `specials`)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: special-token map file not found.")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{p}: not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'} ({e}).") from e
    if isinstance(data, dict) and isinstance(data.get("specials"), dict):
        data = data["specials"]
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping {{teacher token: student token}}, got {type(data).__name__}.")
    return data


def _resolve(tok, key, role: str, vocab_special_only: bool) -> int:
    if isinstance(key, bool):
        raise ValueError(f"{role} token {key!r}: expected a token text or id")
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        i = int(key)
        if not 0 <= i < tok.vocab_size:
            raise ValueError(f"{role} token id {i} out of range [0, {tok.vocab_size})")
        return i
    if key in tok.special_tokens:
        return tok.special_tokens[key]
    for attr in ("bos", "eos", "pad", "unk"):
        i = getattr(tok, f"{attr}_id")
        if i is not None and tok.token_str(i) == key:
            return i
    if not vocab_special_only:
        dec = encode_midtext(tok, [str(key).encode("utf-8")])[0]
        if dec is not None and len(dec) == 1:
            return int(dec[0])
    raise ValueError(f"{role} token {key!r} is not a special token of {tok.name} (nor a single token)")


def student_roles(student) -> dict[str, int]:
    """Role -> student id: the first role alias (ROLE_ALIASES order) among the student's special tokens,
    else the id the student declares for that role (bos/eos/pad/unk)."""
    s_by_text = _special_texts(student)
    roles: dict[str, int] = {}
    for role, names in ROLE_ALIASES.items():
        for nm in names:
            if nm in s_by_text:
                roles.setdefault(role, s_by_text[nm])
    for attr in ("bos", "eos", "pad", "unk"):
        i = getattr(student, f"{attr}_id")
        if i is not None:
            roles.setdefault(attr, i)
    return roles


def _special_texts(tok) -> dict[str, int]:
    d = dict(tok.special_tokens)
    for attr in ("bos", "eos", "pad", "unk"):
        i = getattr(tok, f"{attr}_id")
        if i is not None:
            d.setdefault(tok.token_str(i), i)
    return d


def map_specials(teacher, student, overrides: dict | None = None) -> tuple[dict[int, int], list[str]]:
    """Teacher special id -> student id, and the names of teacher specials left unmapped.

    Per teacher special, the first that applies: an override entry (a student token, or null = leave
    unmapped); the same special text in the student; the role its text names (ROLE_ALIASES, end-of-turn
    falling back to eos) -> `student_roles`; the role the teacher declares for the id (bos/eos/pad/unk)."""
    t_tb = teacher.token_bytes
    sp_ids = np.nonzero(t_tb.is_special)[0].tolist()
    s_by_text = _special_texts(student)
    s_roles = student_roles(student)
    alias_role = {nm: role for role, names in ROLE_ALIASES.items() for nm in names}
    t_role_of_id = {getattr(teacher, f"{a}_id"): a for a in ("unk", "pad", "eos", "bos")
                    if getattr(teacher, f"{a}_id") is not None}
    out: dict[int, int] = {}
    forced: dict[int, int | None] = {}
    for k, v in (overrides or {}).items():
        tid = _resolve(teacher, k, "teacher", True)
        forced[tid] = None if v is None else _resolve(student, v, "student", False)
    unmapped = []
    for t in sp_ids:
        name = teacher.token_str(t)
        if t in forced:
            if forced[t] is not None:
                out[t] = forced[t]
            else:
                unmapped.append(name)
            continue
        s = s_by_text.get(name)
        role = alias_role.get(name)
        while s is None and role is not None:
            s = s_roles.get(role)
            role = _ROLE_FALLBACK.get(role)
        if s is None and t in t_role_of_id:
            s = s_roles.get(t_role_of_id[t])
        if s is None:
            unmapped.append(name)
        else:
            out[t] = s
    for t, s in forced.items():  # overrides may also target non-special teacher tokens
        if s is not None and not t_tb.is_special[t]:
            out[t] = s
    return out, unmapped


def matrix_stats(W, teacher, exact_mask: np.ndarray, tiers: dict, build_time_s: float | None = None) -> dict:
    """The stats block of a projection file, computed from W's arrays, the teacher's token flags, the
    rows counted as exact matches (`exact_mask`, bool [V_t]) and the per-tier row counts `tiers`."""
    t_tb = teacher.token_bytes
    V_t, V_s = W.shape
    special = np.asarray(t_tb.is_special, bool)
    text = ~special
    n_text = int(text.sum())
    dec_len = np.diff(W.decomp_offsets)
    row_nnz = np.diff(W.indptr)
    exact_n = int((exact_mask & text).sum())
    multi = int(((dec_len > 1) & text).sum())
    unm = np.nonzero(special & (row_nnz == 0))[0]
    reached = np.unique(W.indices).size
    return {
        "teacher_vocab": V_t, "student_vocab": V_s,
        "teacher_text_tokens": n_text, "teacher_special_tokens": int(special.sum()),
        "exact": exact_n, "exact_pct": round(100.0 * exact_n / max(n_text, 1), 3),
        "multi_token": multi, "multi_token_pct": round(100.0 * multi / max(n_text, 1), 3),
        "single_token_nonexact": int(((dec_len == 1) & text & ~exact_mask).sum()),
        "tiers": tiers,
        "special_mapped": int((special & (row_nnz > 0)).sum()),
        "special_unmapped": int(unm.size), "special_unmapped_names": [teacher.token_str(int(i)) for i in unm[:50]],
        "empty_rows": int((row_nnz == 0).sum()),
        "mean_decomposition_len": round(float(dec_len[text].mean()) if n_text else 0.0, 4),
        "max_decomposition_len": int(dec_len.max()) if V_t else 0,
        "student_coverage_pct": round(100.0 * reached / max(V_s, 1), 3),
        "nnz": W.nnz, **({} if build_time_s is None else {"build_time_s": round(build_time_s, 3)}),
    }


# --------------------------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------------------------

def build_projection(teacher, student, *, top_k: int | None = None, normalize: bool = True,
                     min_weight: float = 0.0, special_map: dict | str | os.PathLike | None = None,
                     progress: bool = True, batch_size: int = 16384):
    """Build W (a `xtok.ProjectionMatrix`) for a teacher/student tokenizer pair (Tokenizer or spec)."""
    from tqdm.auto import tqdm

    from xtok.projection import ProjectionMatrix
    from xtok.tokens import load_tokenizer

    t0 = time.perf_counter()
    teacher, student = load_tokenizer(teacher), load_tokenizer(student)
    if special_map is not None and not isinstance(special_map, dict):
        special_map = load_special_map(special_map)
    V_t, V_s = teacher.vocab_size, student.vocab_size
    t_tb = teacher.token_bytes
    row_col = np.full(V_t, -1, np.int64)
    tier = np.full(V_t, _TIER["unmapped"], np.int8)
    dec_len = np.zeros(V_t, np.int64)
    bar = tqdm(total=V_t, desc=f"projection {teacher.name} -> {student.name}", unit="tok", disable=not progress,
               leave=False)
    if teacher.content_hash == student.content_hash and V_t == V_s:
        row_col[:] = np.arange(V_t)
        tier[:] = _TIER["identity"]
        dec_len[:] = 1
        dec_ids = np.arange(V_t, dtype=np.int64)
        bar.update(V_t)
        if special_map:  # overrides still apply (null: the row is left empty)
            forced = {_resolve(teacher, k, "teacher", True): v for k, v in special_map.items()}
            sp, _ = map_specials(teacher, student, special_map)
            for t, v in forced.items():
                if v is None:
                    row_col[t] = -1
                    dec_len[t] = 0
                    tier[t] = _TIER["unmapped"]
                else:
                    row_col[t] = dec_ids[t] = sp[t]
                    tier[t] = _TIER["special"]
            dec_ids = dec_ids[dec_len > 0]
    else:
        mask = canonical_student_mask(student)
        lookup = ByteLookup(student.token_bytes, mask)
        ex = lookup.lookup(t_tb)
        hit = ex >= 0
        row_col[hit] = ex[hit]
        tier[hit] = _TIER["exact"]
        dec_len[hit] = 1
        bar.update(int(hit.sum()))
        sp, _ = map_specials(teacher, student, special_map)
        for t, s in sp.items():
            row_col[t] = s
            tier[t] = _TIER["special"]
            dec_len[t] = 1
        bar.update(int(t_tb.is_special.sum()))
        todo = np.nonzero((tier == _TIER["unmapped"]) & ~t_tb.is_special & (t_tb.lengths > 0))[0]
        counts, flat, dtier = decompose(student, t_tb, todo, lookup, batch_size=batch_size, progress=bar)
        dec_len[todo] = counts
        tier[todo] = dtier
        has = counts > 0
        first = np.cumsum(counts) - counts
        row_col[todo[has]] = flat[first[has]]
        # decompositions CSR: one id for exact/special rows, the student sequence for the others
        offs_tmp = np.zeros(V_t + 1, np.int64)
        np.cumsum(dec_len, out=offs_tmp[1:])
        dec_ids = np.empty(int(offs_tmp[-1]), np.int64)
        single = np.isin(tier, (_TIER["exact"], _TIER["special"]))
        dec_ids[offs_tmp[:-1][single]] = row_col[single]
        rows_multi, lens = todo[has], counts[has]
        dst = np.repeat(offs_tmp[rows_multi] - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
        dec_ids[dst] = flat
    bar.update(max(0, bar.total - bar.n))
    bar.close()
    offs = np.zeros(V_t + 1, np.int64)
    np.cumsum(dec_len, out=offs[1:])
    rows = np.nonzero(row_col >= 0)[0]
    W = ProjectionMatrix.from_coo(rows, row_col[rows], np.ones(rows.size, np.float32), (V_t, V_s),
                                  decomp_offsets=offs, decomp_ids=dec_ids.astype(np.int32))
    if top_k is not None or min_weight > 0 or normalize:
        from .cut import cut

        W = cut(W, top_k=top_k, min_weight=min_weight, normalize=normalize)
    elapsed = time.perf_counter() - t0
    tier_counts = {n: int((tier == i).sum()) for i, n in enumerate(TIERS) if (tier == i).any()}
    exact_mask = (tier == _TIER["exact"]) | ((tier == _TIER["identity"]) & ~t_tb.is_special)
    stats = matrix_stats(W, teacher, exact_mask, tier_counts, elapsed)
    W.meta.update({
        "teacher_name": teacher.name, "teacher_hash": teacher.content_hash, "teacher_vocab": str(V_t),
        "student_name": student.name, "student_hash": student.content_hash, "student_vocab": str(V_s),
        "method": "first-token",
        "options": {"top_k": top_k, "normalize": normalize, "min_weight": min_weight,
                    "special_map": special_map or {}},
        "stats": stats,
    })
    return W


def format_stats(stats: dict) -> str:
    s = stats
    lines = [
        f"teacher vocab {s['teacher_vocab']:,}  student vocab {s['student_vocab']:,}",
        f"exact matches  {s['exact']:,} ({s['exact_pct']:.2f}% of {s['teacher_text_tokens']:,} text tokens)",
        f"multi-token    {s['multi_token']:,} ({s['multi_token_pct']:.2f}%), mean decomposition length "
        f"{s['mean_decomposition_len']:.3f}, max {s['max_decomposition_len']}",
        f"specials       {s['special_mapped']} mapped, {s['special_unmapped']} unmapped"
        + (f" (e.g. {', '.join(s['special_unmapped_names'][:8])})" if s['special_unmapped'] else ""),
        "tiers          " + ", ".join(f"{k}={v:,}" for k, v in s["tiers"].items()),
        f"nnz {s['nnz']:,}  empty rows {s['empty_rows']:,}  student coverage {s['student_coverage_pct']:.2f}%  "
        f"build time {s['build_time_s']:.2f}s",
    ]
    return "\n".join(lines)


def make_build_command(name: str = "build"):
    """The click command (shared by `python -m projection_tools.build` and `xtok build-projection`)."""
    import click

    @click.command(name=name, context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--teacher", "-t", required=True,
                  help="Teacher tokenizer: a folder, tokenizer.json(.xz), SentencePiece .model, Tekken .json, "
                       "mistral-common:<file>, or a hub id.")
    @click.option("--student", "-s", required=True, help="Student tokenizer (same forms as --teacher).")
    @click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
                  help="Output .safetensors file (written atomically; nothing is left on failure).")
    @click.option("--top-k", type=click.IntRange(min=1), default=None,
                  help="Keep at most this many entries per row. Default: all (first-token rows have one).")
    @click.option("--min-weight", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
                  help="Drop entries below this weight (a row always keeps its largest entry).")
    @click.option("--normalize/--no-normalize", default=True, show_default=True,
                  help="Renormalise every non-empty row to sum to 1.")
    @click.option("--special-map", type=click.Path(dir_okay=False), default=None,
                  help="JSON/YAML file {teacher special: student token or null} overriding the role mapping "
                       "of special tokens (texts or ids; null = leave unmapped).")
    @click.option("--batch-size", type=click.IntRange(min=1), default=16384, show_default=True,
                  help="Texts per batch-encoding call to the student tokenizer.")
    @click.option("--stats-json", is_flag=True, help="Also print the stats as one JSON line.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bar and no stats report.")
    def cmd(teacher, student, output, top_k, min_weight, normalize, special_map, batch_size, stats_json, quiet):
        """Build the sparse teacher->student vocab projection matrix W (rows sum to 1) and the
        teacher-token decompositions, and save them to OUTPUT (.safetensors)."""
        from xtok.projection import ProjectionError, check_writable
        from xtok.tokens import TokenizerLoadError

        out = Path(output)
        try:
            check_writable(out)  # fail fast, before the build
            W = build_projection(teacher, student, top_k=top_k, normalize=normalize, min_weight=min_weight,
                                 special_map=special_map, progress=not quiet, batch_size=batch_size)
            W.save(out)
        except (ProjectionError, TokenizerLoadError, ValueError, OSError) as e:
            raise click.ClickException(str(e)) from e
        if not quiet:
            click.echo(format_stats(W.stats))
            click.echo(f"wrote {out}")
        if stats_json:
            click.echo(json.dumps(W.stats))

    return cmd


cli = make_build_command("build")


def main(argv=None):
    return cli.main(args=argv, prog_name="python -m projection_tools.build")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
