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

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .decompose import TIER_INDEX, TIERS, canonical_student_mask, decompose, encode_midtext
from .lookup import ByteLookup
from .stats import format_stats, matrix_stats

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
    tier = np.full(V_t, TIER_INDEX["unmapped"], np.int8)
    dec_len = np.zeros(V_t, np.int64)
    bar = tqdm(total=V_t, desc=f"projection {teacher.name} -> {student.name}", unit="tok", disable=not progress,
               leave=False)
    if teacher.content_hash == student.content_hash and V_t == V_s:
        row_col[:] = np.arange(V_t)
        tier[:] = TIER_INDEX["identity"]
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
                    tier[t] = TIER_INDEX["unmapped"]
                else:
                    row_col[t] = dec_ids[t] = sp[t]
                    tier[t] = TIER_INDEX["special"]
            dec_ids = dec_ids[dec_len > 0]
    else:
        mask = canonical_student_mask(student)
        lookup = ByteLookup(student.token_bytes, mask)
        ex = lookup.lookup(t_tb)
        hit = ex >= 0
        row_col[hit] = ex[hit]
        tier[hit] = TIER_INDEX["exact"]
        dec_len[hit] = 1
        bar.update(int(hit.sum()))
        sp, _ = map_specials(teacher, student, special_map)
        for t, s in sp.items():
            row_col[t] = s
            tier[t] = TIER_INDEX["special"]
            dec_len[t] = 1
        bar.update(int(t_tb.is_special.sum()))
        todo = np.nonzero((tier == TIER_INDEX["unmapped"]) & ~t_tb.is_special & (t_tb.lengths > 0))[0]
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
        single = np.isin(tier, (TIER_INDEX["exact"], TIER_INDEX["special"]))
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
    exact_mask = (tier == TIER_INDEX["exact"]) | ((tier == TIER_INDEX["identity"]) & ~t_tb.is_special)
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
