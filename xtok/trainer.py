"""`DistillationTrainer`: cross-tokenizer distillation inside the Hugging Face `transformers.Trainer`.

    trainer = DistillationTrainer(model=student, args=TrainingArguments(...), train_dataset=rows,
                                  data_collator=CrossTokenizerCollator(student_tok, teachers),
                                  aggregator=MultiTeacherLossAggregator({...}, sft_weight=...))
    trainer.train()

What it adds to the Trainer:
* the loss: the student's logits and the collated batch go through the aggregator (per-teacher KL,
  chunk likelihood, SFT); live teachers (`TeacherSpec(model=...)`) are run first on the training
  device (`xtok.collate.device.fill_online_targets`), stored teachers need nothing;
* gradient accumulation: the aggregator normalises by the Trainer's `num_items_in_batch` (trained label
  tokens over all accumulated micro-batches, and over all ranks when `average_tokens_across_devices`),
  counted here when the Trainer would not (a student whose forward takes no loss kwargs), so a step
  over k micro-batches equals one step over their union;
* the dataset columns the collator reads (text / messages / key / id / user / assistant) survive
  `remove_unused_columns=True`;
* logging: per teacher `kl/<name>`, `chunk/<name>` (per trained student token, as the loss weighs them),
  `kl_per_position/<name>`, `present/<name>` (share of examples the teacher has), `coverage/<name>`
  (KL targets per trained token) and `sft`, over the logging window, through the Trainer's own `log`
  (so every report_to integration gets them); under DDP they are the main process's own batches;
* live teachers stay in eval mode, gradients off, outside the optimizer and the checkpoints (they are
  not part of `self.model`); they are moved to the training device;
* on-policy distillation (`on_policy=lam`): for a fraction lam of the optimizer steps (all micro-batches
  of a step alike), the student samples completions of the batch's prompts and learns from the live
  teachers' scores of its own text (`xtok.onpolicy`): KL and chunk terms on the generated tokens only,
  no SFT term. Such micro-batches are normalised by their own generated tokens (their loss is divided
  by the accumulation steps by the Trainer). Stored teachers do not take part in them (a store cannot
  score new text); with no live teacher, on_policy > 0 is an error.
"""
from __future__ import annotations

from typing import Any

import logging

import numpy as np
from transformers import Trainer

from .collate import CrossTokenizerCollator
from .collate.device import fill_online_targets
from .losses import MultiTeacherLossAggregator
from .onpolicy import OnPolicySample, generate, on_policy_batch, split_prompt

logger = logging.getLogger(__name__)

__all__ = ["DistillationTrainer"]


class DistillationTrainer(Trainer):
    """A `transformers.Trainer` that trains a student with `MultiTeacherLossAggregator` on batches from
    `CrossTokenizerCollator` (module doc). Extra arguments: `aggregator`; on-policy: `on_policy` (lam in
    [0, 1], the share of optimizer steps trained on the student's own samples), `max_new_tokens`,
    `generation_temperature`, `generation_top_p` (sampling), `prompt_fraction` (text rows: the share of
    the student's tokens used as the prompt), `max_prompt_tokens`, `log_samples_every` /
    `log_samples` (a few samples logged every N on-policy steps; all kept in `self.samples`).
    Everything else is the Trainer's (`data_collator` must be a CrossTokenizerCollator)."""

    def __init__(self, *args, aggregator: MultiTeacherLossAggregator, on_policy: float = 0.0,
                 max_new_tokens: int = 64, generation_temperature: float = 1.0, generation_top_p: float = 1.0,
                 prompt_fraction: float = 0.5, max_prompt_tokens: int | None = None, log_samples_every: int = 50,
                 log_samples: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        collator = self.data_collator
        if not isinstance(collator, CrossTokenizerCollator):
            raise TypeError("DistillationTrainer needs data_collator=CrossTokenizerCollator(...), got "
                            f"{type(collator).__name__}.")
        if not isinstance(aggregator, MultiTeacherLossAggregator):
            raise TypeError(f"aggregator must be a MultiTeacherLossAggregator, got {type(aggregator).__name__}.")
        names = {t.name for t in collator.teachers}
        unknown = sorted(set(aggregator.teachers) - names)
        if unknown:
            raise ValueError(f"the aggregator weighs teachers {unknown} that the collator does not have (its teachers: "
                             f"{sorted(names)}); name them alike.")
        self.aggregator = aggregator
        self.collator = collator
        self.online_teachers = [t for t in collator.teachers if t.online]
        for t in self.online_teachers:  # eval mode, no grads, on the training device; never in self.model
            t.model.to(self.args.device).eval().requires_grad_(False)
        self._window: dict[str, float] = {}
        if not 0.0 <= float(on_policy) <= 1.0:
            raise ValueError(f"on_policy must be in [0, 1], got {on_policy!r}.")
        if on_policy > 0 and not self.online_teachers:
            raise ValueError("on_policy > 0 needs a live teacher (TeacherSpec(..., model=...)): stored teachers cannot "
                             "score text the student writes during training. The collator's teachers are all stores: "
                             f"{[t.name for t in collator.teachers]}.")
        if not (0.0 < float(prompt_fraction) < 1.0):
            raise ValueError(f"prompt_fraction must be in (0, 1), got {prompt_fraction!r}.")
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}.")
        self.on_policy = float(on_policy)
        self.generation = dict(max_new_tokens=int(max_new_tokens), temperature=float(generation_temperature),
                               top_p=float(generation_top_p))
        self.prompt_fraction, self.max_prompt_tokens = float(prompt_fraction), max_prompt_tokens
        self.log_samples_every, self.log_samples = int(log_samples_every), int(log_samples)
        self.samples: list[dict] = []
        self._on_policy_steps = 0
        if self.on_policy > 0:
            collator.keep_rows = True  # batches carry their rows: the prompts come from them

    # -- columns the collator reads survive remove_unused_columns ------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        c = self.collator
        extra = [c.text_column, c.messages_column, c.key_column, "id", "key", "user", "assistant"]
        self._signature_columns = list(dict.fromkeys(list(self._signature_columns) + [x for x in extra if x]))

    # -- num_items_in_batch also for students whose forward takes no loss kwargs ---------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if num_items is None and batch_samples and "labels" in batch_samples[0]:
            num_items = sum(b["labels"][:, 1:].ne(-100).sum() for b in batch_samples)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                num_items = self.accelerator.gather(num_items.to(device)).sum()
            num_items = num_items.to(device)
        return batch_samples, num_items

    # -- the loss ------------------------------------------------------------------------------
    def is_on_policy_step(self, step: int) -> bool:
        """Whether optimizer step `step` trains on the student's own samples (a draw with probability
        `on_policy`, seeded by args.seed and the step: reproducible, and the same for all micro-batches
        of the step)."""
        if self.on_policy <= 0.0:
            return False
        if self.on_policy >= 1.0:
            return True
        return bool(np.random.default_rng([int(self.args.seed), int(step), 7]).random() < self.on_policy)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sft = True
        if model.training and "rows" in inputs and self.is_on_policy_step(self.state.global_step):
            got = self.on_policy_inputs(model, inputs["rows"])
            if got is not None:
                inputs, num_items_in_batch, sft = got, None, False
        inputs.pop("rows", None)
        if self.online_teachers:
            fill_online_targets(inputs, self.online_teachers, self.collator.student, self.args.device)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        loss, logs = self.aggregator(outputs.logits, inputs, num_items=num_items_in_batch, sft=sft)
        scaled = num_items_in_batch is not None
        if scaled and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        self.loss_is_scaled_for_ga = scaled
        if model.training:
            self._accumulate(logs, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def on_policy_inputs(self, model, rows):
        """The on-policy batch of these rows on the training device (the student samples; `xtok.onpolicy`),
        or None when no row has a prompt."""
        col = self.collator
        prompts = [p for p in (split_prompt(col, r, self.prompt_fraction, self.max_prompt_tokens) for r in rows)
                   if p is not None]
        if not prompts:
            return None
        student = col.student
        eos = student.eos_id
        pad = next((i for i in (student.pad_id, eos) if i is not None), 0)
        seed = int(self.args.seed) * 1_000_003 + int(self.state.global_step) * 101 + self._on_policy_steps
        completions = generate(self.accelerator.unwrap_model(model), prompts, pad_id=pad, eos_id=eos,
                               generator_seed=seed, **self.generation)
        self._on_policy_steps += 1
        batch = on_policy_batch(col, prompts, completions)
        self._keep_samples(prompts, completions)
        return self._prepare_inputs(batch)

    def _keep_samples(self, prompts, completions) -> None:
        """Every `log_samples_every`-th on-policy micro-batch: its first `log_samples` samples go to the log
        (logger.info) and to `self.samples` (the last 1000 kept)."""
        if self.log_samples_every <= 0 or (self._on_policy_steps - 1) % self.log_samples_every:
            return
        student = self.collator.student
        step = int(self.state.global_step)
        for p, c in list(zip(prompts, completions))[: max(self.log_samples, 0)]:
            s = OnPolicySample(student.decode(p.ids.tolist()), student.decode(c.tolist()), c.tolist())
            self.samples.append({"step": step, "prompt": s.prompt, "completion": s.completion})
            logger.info("on-policy sample at step %d:\n  prompt: %r\n  completion: %r", step, s.prompt[-200:],
                        s.completion[:400])
        del self.samples[:-1000]

    def _accumulate(self, logs: dict, inputs: dict, num_items) -> None:
        """Add one micro-batch's components to the logging window, weighted by its trained tokens."""
        n_tok = float(logs["tokens"])
        if n_tok <= 0:
            return
        denom = float(num_items) if num_items is not None else n_tok
        w = self._window
        w["_tokens"] = w.get("_tokens", 0.0) + n_tok
        w["_batches"] = w.get("_batches", 0.0) + 1.0
        stats = inputs.get("stats") or {}
        for k, v in logs.items():
            if k in ("loss", "tokens"):
                continue
            v = float(v)
            if k == "sft" or k.startswith(("kl/", "chunk/")):
                w[k] = w.get(k, 0.0) + v * denom  # the component's sum over the micro-batch
            elif k.startswith("kl_per_position/"):
                w[k] = w.get(k, 0.0) + v * n_tok
        w["_examples"] = w.get("_examples", 0.0) + float(stats.get("examples", 0))
        for name in self.aggregator.teachers:
            st = stats.get(name)
            if isinstance(st, dict):
                w[f"_present/{name}"] = w.get(f"_present/{name}", 0.0) + float(st.get("present", 0))
                w[f"coverage/{name}"] = w.get(f"coverage/{name}", 0.0) + float(st.get("targets", 0))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        w = self._window
        if "loss" in logs and w.get("_tokens"):
            tok = w["_tokens"]
            for k, v in w.items():
                if not k.startswith("_"):
                    logs[k] = round(v / tok, 6)
                elif k.startswith("_present/") and w.get("_examples"):
                    logs[k[1:]] = round(v / w["_examples"], 6)
            self._window = {}
        super().log(logs, *args, **kwargs)
