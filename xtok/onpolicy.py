"""On-policy batches: the student writes, live teachers on other tokenizers score what it wrote.

For a batch of dataset rows:

1. `split_prompt`: each row's prompt for the student: a chat row's messages before its last assistant
   turn, rendered with the student's template and its generation prompt; a text row's first
   `prompt_fraction` of the student's tokens (at least one, BOS included);
2. `generate`: batched sampling with the student's KV cache (`model.generate`, left padding), stopping at
   the student's EOS; the student goes back to train mode afterwards;
3. `completion_row`: the row as the teachers must read it: the prompt plus exactly the bytes the
   student produced. For text rows: the prompt's own text (byte spans of the prompt tokens in the
   original text) + the completion's bytes. For chat rows: the prompt messages + an assistant message
   whose content is the completion, chosen so that the *student's* template renders back to the
   student's own bytes (the seam: a template that puts a space before the content and a SentencePiece
   completion that starts with that space must not double it) -- the teachers then render it with
   their own templates;
4. `on_policy_batch`: the collator's batch of those rows with the student side fixed to the generated
   ids (`labels` on the completion tokens only, so KL and chunk targets cover only generated tokens)
   and only the live teachers (a store cannot score new text). The SFT term is off for such batches
   (the student's own samples are no supervision): `DistillationTrainer` calls the aggregator with
   `sft=False`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .chat import render_chat
from .collate import CrossTokenizerCollator, StudentExample
from .collate.collator import IGNORE_INDEX

__all__ = ["Prompt", "split_prompt", "generate", "completion_row", "on_policy_batch", "OnPolicySample"]


@dataclass
class Prompt:
    """A row's prompt for the student: ids int64 [L] and how to rebuild the row around a completion."""

    row: Any
    ids: np.ndarray
    messages: list | None = None      # chat: the messages before the last assistant turn
    text_bytes: bytes | None = None   # text: the prompt's bytes in the original text


@dataclass
class OnPolicySample:
    """One generated example (for logs): the prompt and completion as text, and the completion ids."""

    prompt: str
    completion: str
    completion_ids: list = field(default_factory=list)


def split_prompt(collator: CrossTokenizerCollator, row, prompt_fraction: float = 0.5,
                 max_prompt_tokens: int | None = None) -> Prompt | None:
    """The student prompt of one row (module doc, step 1), or None when the row has none (a chat without
    an assistant turn after a user turn; a text of fewer than two tokens)."""
    student, fmt = collator.student, collator.row_format
    if isinstance(row, str):
        row = {collator.text_column: row}
    msgs = fmt.messages(row)
    if msgs is not None:
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if last is None or last == 0:
            return None
        prompt_msgs = msgs[:last]
        ids = np.asarray(render_chat(student, prompt_msgs, template=collator.chat_template,
                                     add_generation_prompt=True).ids, dtype=np.int64)
        if max_prompt_tokens is not None and ids.shape[0] > max_prompt_tokens:
            return None
        return Prompt(row, ids, messages=prompt_msgs)
    text = fmt.text(row)
    if text is None:
        return None
    ids, spans = student.encode_with_offsets(text)
    if ids.shape[0] < 2:
        return None
    n = max(1, int(ids.shape[0] * float(prompt_fraction)))
    if max_prompt_tokens is not None:
        n = min(n, int(max_prompt_tokens))
    text_bytes = text.encode("utf-8")[: int(spans[n - 1, 1])]
    prompt_ids = ids[:n].astype(np.int64)
    if collator.add_special_tokens and student.bos_id is not None:
        prompt_ids = np.concatenate([[student.bos_id], prompt_ids]).astype(np.int64)
    return Prompt(row, prompt_ids, text_bytes=text_bytes)


def generate(model, prompts: Sequence[Prompt], *, pad_id: int, eos_id: int | None, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, generator_seed: int | None = None) -> list[np.ndarray]:
    """Sample a completion (int64 ids, up to and including the first EOS) for every prompt, batched with
    left padding and the KV cache. The model is put in eval mode for sampling and its previous mode is
    restored afterwards."""
    import torch

    if not prompts:
        return []
    dev = next(model.parameters()).device
    L = max(p.ids.shape[0] for p in prompts)
    ids = torch.full((len(prompts), L), int(pad_id), dtype=torch.long)
    att = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        n = p.ids.shape[0]
        ids[i, L - n:] = torch.as_tensor(p.ids)
        att[i, L - n:] = 1
    was_training = model.training
    model.eval()
    try:
        if generator_seed is not None:
            torch.manual_seed(int(generator_seed))
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), max_new_tokens=int(max_new_tokens),
                                 do_sample=temperature > 0, temperature=float(temperature) if temperature > 0 else None,
                                 top_p=float(top_p) if temperature > 0 else None, top_k=0 if temperature > 0 else None,
                                 pad_token_id=int(pad_id), eos_token_id=None if eos_id is None else int(eos_id),
                                 use_cache=True)
    finally:
        model.train(was_training)
    gen = out[:, L:].cpu().numpy().astype(np.int64)
    res = []
    for row in gen:
        if eos_id is not None:
            hit = np.flatnonzero(row == eos_id)
            row = row[: hit[0] + 1] if hit.size else row
        res.append(row)
    return res


def _content_for_student(collator: CrossTokenizerCollator, prompt: Prompt, completion_ids: np.ndarray,
                         completion: str) -> tuple[str, bool]:
    """(the assistant content whose rendering by the student's template reproduces the student's bytes,
    whether one did): the completion text as produced, without one leading space, or stripped; when none
    does (e.g. the template puts a space before the content and the student wrote none), the completion
    as produced (nothing the student wrote is dropped)."""
    student = collator.student
    want = student.decode_bytes(np.concatenate([prompt.ids, completion_ids]))
    cands = [completion]
    if completion.startswith(" "):
        cands.append(completion[1:])
    cands.append(completion.strip())
    for c in dict.fromkeys(cands):
        try:
            r = render_chat(student, prompt.messages + [{"role": "assistant", "content": c}],
                            template=collator.chat_template)
        except Exception:  # noqa: BLE001 - a template that refuses this content: try the next
            continue
        if student.decode_bytes(r.ids).startswith(want.rstrip()):
            return c, True
    return completion, False


def completion_row(collator: CrossTokenizerCollator, prompt: Prompt, completion_ids: np.ndarray) -> tuple[dict, bool]:
    """(the row the teachers read: the prompt + the student's completion, whether its bytes are the
    student's exactly) -- module doc, step 3."""
    student = collator.student
    comp = student.decode_bytes(completion_ids)
    if prompt.messages is None:
        raw = prompt.text_bytes + comp
        text = raw.decode("utf-8", errors="replace")
        key = {"id": f"onpolicy:{_digest(raw)}"}
        return {**key, collator.text_column or "text": text}, text.encode("utf-8") == raw
    content, exact = _content_for_student(collator, prompt, completion_ids, comp.decode("utf-8", errors="replace"))
    msgs = list(prompt.messages) + [{"role": "assistant", "content": content}]
    return {"id": f"onpolicy:{_digest(repr(msgs).encode())}", collator.messages_column or "messages": msgs}, exact


def _digest(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()[:16]


def on_policy_batch(collator: CrossTokenizerCollator, prompts: Sequence[Prompt],
                    completions: Sequence[np.ndarray]) -> dict:
    """The training batch of the student's own samples (module doc, step 4); stats['onpolicy'] counts
    examples, generated tokens and seams that did not re-render exactly."""
    rows, xs, seam = [], [], 0
    for p, c in zip(prompts, completions):
        row, exact = completion_row(collator, p, c)
        seam += int(not exact)
        ids = np.concatenate([p.ids, c]).astype(np.int64)
        labels = np.full(ids.shape[0], IGNORE_INDEX, np.int64)
        labels[p.ids.shape[0]:] = c
        trunc = ids.shape[0] > collator.max_length
        if trunc:
            ids, labels = ids[: collator.max_length], labels[: collator.max_length]
        rows.append(row)
        xs.append(StudentExample(row["id"], ids, labels, trunc))
    batch = collator.collate(rows, xs, teachers=[t for t in collator.teachers if t.online])
    batch["stats"]["onpolicy"] = {"examples": len(xs), "generated_tokens": int(sum(len(c) for c in completions)),
                                  "seam_mismatch": seam}
    return batch
