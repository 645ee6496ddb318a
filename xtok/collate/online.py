"""Live (online) teachers, worker side: the teacher's view of a row and the targets plan, no logits.

For a `TeacherSpec` with a `model` instead of a store, the collator (in DataLoader workers) renders the
row for the teacher exactly as `xtok extract` would (the teacher's own chat template; BOS for text
rows when its tokenizer has one), aligns it with the student's tokens and plans the targets
(`targets.plan_targets`, every teacher output position available). The batch then carries the
teacher's token ids and the plan; `xtok.collate.device.fill_online_targets` (main process, on the
training device) runs the teacher and turns the plan into the same fields a store gives.

Per online teacher the batch holds (besides the store fields filled later): teacher_input_ids [B, Tt]
long, teacher_attention_mask [B, Tt] long, teacher_positions [B, P] long (the teacher output position
of every KL target), chunk_teacher_positions [B, C, 2] long ([first, stop) teacher output positions of
every chunk), positions / mask / chunk_spans / chunk_mask / present as for a store, and online = True.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..alignment import align_pair
from ..chat import render_chat
from ..rows import RowFormat
from ..tokens import Tokenizer
from .targets import TargetPlan, plan_targets

__all__ = ["TeacherView", "render_teacher_view", "plan_online", "pad_online"]


@dataclass
class TeacherView:
    """A row as the teacher reads it: token ids int64 [T] (truncated to the teacher's max_length)."""

    ids: np.ndarray
    truncated: bool = False


def render_teacher_view(tok: Tokenizer, fmt: RowFormat, row, *, chat_template=None, add_bos: bool | None = None,
                        max_length: int | None = None) -> TeacherView:
    """The teacher's token ids for `row`: chat rows rendered with the teacher's template (its tokenizer's
    own unless `chat_template`), text rows encoded with BOS prepended when `add_bos` (default: when
    the tokenizer has a BOS token), as `xtok extract` renders them."""
    msgs = fmt.messages(row)
    if msgs is not None:
        ids = np.asarray(render_chat(tok, msgs, template=chat_template).ids, dtype=np.int64)
    else:
        text = fmt.text(row)
        if text is None:
            raise ValueError(f"row has no text or messages for the teacher: keys {sorted(row)!r}")
        ids = np.asarray(tok.encode(text), dtype=np.int64)
        bos = (tok.bos_id is not None) if add_bos is None else bool(add_bos)
        if bos and tok.bos_id is not None:
            ids = np.concatenate([[tok.bos_id], ids]).astype(np.int64)
    truncated = max_length is not None and ids.shape[0] > max_length
    return TeacherView(ids[:max_length] if truncated else ids, truncated)


def plan_online(teacher_tok: Tokenizer, student: Tokenizer, view: TeacherView, student_ids: np.ndarray,
                label_ok: np.ndarray, *, min_coverage: float, min_run_bytes: int) -> tuple[TargetPlan, str]:
    """(the targets plan of a live teacher for one student example, the alignment path). Every teacher
    output position 0 .. T-2 has values (the teacher runs on the whole view)."""
    T = view.ids.shape[0]
    pair = align_pair(teacher_tok, student, view.ids, student_ids)
    available = np.zeros(T + 1, bool)
    available[: max(T - 1, 0)] = True
    special = student.token_bytes.is_special[student_ids]
    plan = plan_targets(pair.chunks, T, available, label_ok, special, min_coverage, pair.teacher_cum,
                        pair.student_cum, min_run_bytes)
    return plan, pair.path


def pad_online(views: list[TeacherView], plans: list[TargetPlan], pad_id: int, torch) -> dict:
    """A batch of one live teacher's views and plans -> its tensors (module doc)."""
    B = len(plans)
    Tt = max([v.ids.shape[0] for v in views] + [1])
    P = max([p.student_positions.shape[0] for p in plans] + [1])
    C = max([p.chunk_spans.shape[0] for p in plans] + [1])
    t_ids = np.full((B, Tt), pad_id, np.int64)
    t_att = np.zeros((B, Tt), np.int64)
    positions = np.zeros((B, P), np.int64)
    t_pos = np.zeros((B, P), np.int64)
    mask = np.zeros((B, P), bool)
    spans = np.zeros((B, C, 2), np.int64)
    chunk_t = np.zeros((B, C, 2), np.int64)
    chunk_mask = np.zeros((B, C), bool)
    present = np.zeros(B, bool)
    for i, (v, p) in enumerate(zip(views, plans)):
        n, c, T = p.student_positions.shape[0], p.chunk_spans.shape[0], v.ids.shape[0]
        t_ids[i, :T] = v.ids
        t_att[i, :T] = 1
        present[i] = p.present
        positions[i, :n] = p.student_positions
        t_pos[i, :n] = p.teacher_positions
        mask[i, :n] = True
        spans[i, :c] = p.chunk_spans
        chunk_t[i, :c] = p.chunk_teacher
        chunk_mask[i, :c] = True
    f = torch.from_numpy
    return {"teacher_input_ids": f(t_ids), "teacher_attention_mask": f(t_att), "positions": f(positions),
            "teacher_positions": f(t_pos), "mask": f(mask), "chunk_spans": f(spans),
            "chunk_teacher_positions": f(chunk_t), "chunk_mask": f(chunk_mask), "present": f(present), "online": True}
