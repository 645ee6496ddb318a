"""`CrossTokenizerCollator`: dataset rows -> ready training tensors, inside DataLoader workers.

Per batch the collator tokenises every row with the student tokenizer (plain text, or chat
messages rendered with a template, assistant-only labels), and for every teacher:

1. fetches the teacher's stored example (`xtok extract` output) by the row's example key;
2. aligns the teacher's stored token ids with the student's ids (`xtok.alignment.align_pair`: chunks of equal bytes;
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
(`cache=True`, so workers load them from the on-disk cache); torch is imported lazily.
All per-example work is vectorised numpy or a Numba kernel (the top-k rows of an `xtok extract`
store are decoded by a kernel straight from the packed shard bytes); Python loops run over the
batch and the teachers only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..alignment import align_pair
from ..chat import render_chat
from ..rows import RowFormat
from ..tokens import Tokenizer, load_tokenizer
from .online import pad_online, plan_online, render_teacher_view
from .targets import TARGET_COUNTERS, TeacherTargets, empty_targets, pad_targets, plan_targets, stored_targets
from .teachers import TeacherSpec

__all__ = ["CrossTokenizerCollator", "StudentExample", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass
class StudentExample:
    key: str
    input_ids: np.ndarray   # int64 [S]
    labels: np.ndarray      # int64 [S], IGNORE_INDEX where no loss
    truncated: bool = False


# counters per teacher in batch["stats"][name] (docs/architecture.md)
_TEACHER_COUNTERS = ("examples", "present", "missing") + TARGET_COUNTERS + ("dp_aligned",)


class CrossTokenizerCollator:
    """`collate_fn` for a DataLoader over rows `{"text": str}` or `{"messages": [...]}` (plus the
    example key column; see `xtok.rows`).

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
        self.row_format = RowFormat(text_column, messages_column, key_column)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.keep_rows = False  # also return the rows themselves (batch["rows"]): on-policy training needs them
        if validate:
            for t in self.teachers:
                if not t.online:
                    t.teacher_store  # noqa: B018  (opens it: hash check)
                t.target_temperature  # noqa: B018  (manifest field check)
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
    def tokenize(self, row) -> StudentExample:
        """Student ids + labels of one row (text: every token; chat: assistant tokens)."""
        if isinstance(row, str):
            row = {self.text_column: row}
        fmt = self.row_format
        key = fmt.key(row)
        msgs = fmt.messages(row)
        if msgs is not None:
            r = render_chat(self.student, msgs, template=self.chat_template)
            ids = np.asarray(r.ids, dtype=np.int64)
            labels = np.where(r.assistant_mask, ids, IGNORE_INDEX)
        else:
            text = fmt.text(row)
            if text is None:
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
            return empty_targets(False, {"missing": 1})
        t_ids = np.asarray(ex.input_ids, dtype=np.int64)
        if t_ids.size and (t_ids.min() < 0 or t_ids.max() >= teacher.tok.vocab_size):
            return empty_targets(False, {"mismatch": 1})  # not this tokenizer's ids
        pair = align_pair(teacher.tok, self.student, t_ids, sx.input_ids)
        label_ok = sx.labels != IGNORE_INDEX
        special = self.student.token_bytes.is_special[sx.input_ids]
        T = t_ids.shape[0]
        positions = np.asarray(ex.positions, dtype=np.int64)
        available = np.zeros(T + 1, bool)
        available[positions[(positions >= 0) & (positions < T)]] = True
        plan = plan_targets(pair.chunks, T, available, label_ok, special, teacher.min_coverage, pair.teacher_cum,
                            pair.student_cum, teacher.min_run_bytes)
        tg = stored_targets(plan, ex, teacher.projector(self.student))
        tg.counts["dp_aligned"] = int(pair.path == "dp")
        return tg

    def online_plan(self, teacher: TeacherSpec, row, sx: StudentExample):
        """A live teacher's view of one row and its targets plan (the logits come later, on the device)."""
        if isinstance(row, str):
            row = {self.text_column: row}
        view = render_teacher_view(teacher.tok, self.row_format, row, chat_template=teacher.chat_template,
                                   add_bos=teacher.add_bos, max_length=teacher.max_length)
        plan, path = plan_online(teacher.tok, self.student, view, sx.input_ids, sx.labels != IGNORE_INDEX,
                                 min_coverage=teacher.min_coverage, min_run_bytes=teacher.min_run_bytes)
        plan.counts["dp_aligned"] = int(path == "dp")
        plan.counts["teacher_truncated"] = int(view.truncated)
        return view, plan

    # -- batch -------------------------------------------------------------------------------
    def __call__(self, rows: Sequence) -> dict:
        out = self.collate(rows, [self.tokenize(r) for r in rows])
        if self.keep_rows:
            out["rows"] = list(rows)
        return out

    def collate(self, rows: Sequence, xs: Sequence[StudentExample], teachers: Sequence[TeacherSpec] | None = None) -> dict:
        """The batch of `rows` whose student side is already tokenised (`xs`, e.g. a student's own
        samples with labels on the generated tokens only); the teachers (default: all) read `rows`."""
        import torch

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
        for t in (self.teachers if teachers is None else teachers):
            ts = dict.fromkeys(_TEACHER_COUNTERS, 0)
            ts["examples"] = B
            if t.online:
                got = [self.online_plan(t, r, x) for r, x in zip(rows, xs)]
                per_counts = [(p.counts, p.present) for _, p in got]
                tok = t.tok
                pad = next((i for i in (tok.pad_id, tok.eos_id) if i is not None), 0)
                out["teachers"][t.name] = pad_online([v for v, _ in got], [p for _, p in got], int(pad), torch)
            else:
                per = [self.targets(t, x) for x in xs]
                per_counts = [(tg.counts, tg.present) for tg in per]
                out["teachers"][t.name] = pad_targets(per, torch)
            for counts, present in per_counts:
                for k, v in counts.items():
                    ts[k] = ts.get(k, 0) + int(v)
                ts["present"] += int(present)
            out["teachers"][t.name]["temperature"] = t.target_temperature
            stats[t.name] = ts
        out["stats"] = stats
        out["student_vocab_size"] = int(self.student.vocab_size)
        return out
