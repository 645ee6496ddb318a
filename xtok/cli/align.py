"""`xtok align`: show how two tokenizers split the same text (chunks, gaps, stats)."""
from __future__ import annotations

import json
import sys
import time

import click


def _read_text(path: str) -> str:
    try:
        raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    except OSError as e:
        raise click.ClickException(f"{path}: cannot read the file ({e.strerror}).")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise click.ClickException(f"{path}: not UTF-8 text (byte {e.start}); convert it, e.g. `iconv -t utf-8`.")


def _load(spec: str, what: str):
    from xtok.tokens import TokenizerLoadError, load_tokenizer

    try:
        return load_tokenizer(spec)
    except TokenizerLoadError as e:
        raise click.ClickException(f"--{what}: {e}")


def _encode(tok, text: str, messages, template, what: str):
    import numpy as np

    if messages is None:
        return np.asarray(tok.encode(text), dtype=np.int64)
    from xtok.chat import ChatFormatError, render_chat

    try:
        return render_chat(tok, messages, template=template).ids
    except ChatFormatError as e:
        raise click.ClickException(f"--chat with the {what} template: {e}")


def _piece(tok, i: int) -> str:
    tb = tok.token_bytes
    if tb.is_special[i]:
        return f"[{tok.token_str(i)}]"
    return "[" + repr(tb.get(i).decode("utf-8", errors="backslashreplace"))[1:-1] + "]"


def _rows(al):
    """(kind, t_start, t_end, s_start, s_end) in text order, chunks and gaps interleaved."""
    tg, sg, out = list(map(tuple, al.teacher_gaps)), list(map(tuple, al.student_gaps)), []
    a = b = 0
    for t0, t1, s0, s1 in al.chunks.tolist():
        while a < len(tg) and tg[a][1] <= t0:
            out.append(("teacher gap", tg[a][0], tg[a][1], 0, 0))
            a += 1
        while b < len(sg) and sg[b][1] <= s0:
            out.append(("student gap", 0, 0, sg[b][0], sg[b][1]))
            b += 1
        kind = "1:1" if (t1 - t0 == 1 and s1 - s0 == 1) else f"{t1 - t0}:{s1 - s0}"
        out.append((kind, t0, t1, s0, s1))
    out += [("teacher gap", x, y, 0, 0) for x, y in tg[a:]]
    out += [("student gap", 0, 0, x, y) for x, y in sg[b:]]
    return out


@click.command("align")
@click.option("--teacher", "-t", required=True, help="Teacher tokenizer: folder, tokenizer.json, .model, Tekken .json, "
              "mistral-common:<file> or hub id.")
@click.option("--student", "-s", required=True, help="Student tokenizer (same forms as --teacher).")
@click.argument("file", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: ids, chunks, gaps.")
@click.option("--chat", is_flag=True, help="FILE is a JSON list of {role, content} messages; render it with each "
              "tokenizer's chat template.")
@click.option("--teacher-template", default=None, help="Jinja chat template file for the teacher (with --chat).")
@click.option("--student-template", default=None, help="Jinja chat template file for the student (with --chat).")
@click.option("--max-rows", default=200, show_default=True, help="Rows of the side-by-side view (0 = all).")
def align_cmd(teacher, student, file, as_json, chat, teacher_template, student_template, max_rows):
    """Align the teacher's and the student's tokens of FILE and show chunks, gaps and stats.

    A chunk is the finest group of teacher tokens and student tokens whose bytes are equal; tokens
    in no chunk (special/template tokens, text on one side only) are gaps.
    """
    from xtok.alignment import align

    text = _read_text(file)
    messages = None
    if chat:
        try:
            messages = json.loads(text)
        except json.JSONDecodeError as e:
            raise click.ClickException(f"{file}: --chat expects a JSON list of messages; JSON error at line "
                                       f"{e.lineno} column {e.colno}: {e.msg}.")
    elif teacher_template or student_template:
        raise click.ClickException("--teacher-template/--student-template need --chat.")
    ttok, stok = _load(teacher, "teacher"), _load(student, "student")
    t_ids = _encode(ttok, text, messages, teacher_template, "teacher")
    s_ids = _encode(stok, text, messages, student_template, "student")
    al = align(ttok, stok, t_ids, s_ids)
    if as_json:
        click.echo(json.dumps(al.to_json(t_ids, s_ids)))
        return
    reps = max(1, min(50, 200_000 // max(1, len(t_ids) + len(s_ids))))
    t0 = time.perf_counter()
    for _ in range(reps):
        align(ttok, stok, t_ids, s_ids)
    dt = (time.perf_counter() - t0) / reps
    rows = _rows(al)
    click.echo(f"{'kind':<12} {'teacher (' + ttok.name + ')':<40} | student ({stok.name})")
    for r in rows[: max_rows or None]:
        kind, t0_, t1_, s0_, s1_ = r
        tp = "".join(_piece(ttok, int(i)) for i in t_ids[t0_:t1_])
        sp = "".join(_piece(stok, int(i)) for i in s_ids[s0_:s1_])
        click.echo(f"{kind:<12} {tp:<40} | {sp}")
    if max_rows and len(rows) > max_rows:
        click.echo(f"... {len(rows) - max_rows} more rows (--max-rows 0 shows all)")
    st = al.stats
    click.echo("")
    click.echo(f"teacher tokens: {st['teacher_tokens']}   student tokens: {st['student_tokens']}   path: {st['path']}")
    click.echo(f"chunks: {st['chunks']}   1:1: {st['one_to_one']} ({100 * st['one_to_one_share']:.1f}%)   "
               f"gaps: teacher {len(al.teacher_gaps)} runs / {st['teacher_gap_tokens']} tokens, "
               f"student {len(al.student_gaps)} runs / {st['student_gap_tokens']} tokens")
    click.echo(f"matched bytes: {st['matched_bytes']} of {st['teacher_bytes']} (teacher) / {st['student_bytes']} "
               f"(student)   speed: {(st['teacher_tokens'] + st['student_tokens']) / max(dt, 1e-9):,.0f} tokens/s")
