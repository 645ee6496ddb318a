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
  not part of `self.model`); they are moved to the training device.
"""
from __future__ import annotations

from typing import Any

from transformers import Trainer

from .collate import CrossTokenizerCollator
from .collate.device import fill_online_targets
from .losses import MultiTeacherLossAggregator

__all__ = ["DistillationTrainer"]


class DistillationTrainer(Trainer):
    """A `transformers.Trainer` that trains a student with `MultiTeacherLossAggregator` on batches from
    `CrossTokenizerCollator` (module doc). Extra argument: `aggregator`. Everything else is the
    Trainer's (`data_collator` must be a CrossTokenizerCollator)."""

    def __init__(self, *args, aggregator: MultiTeacherLossAggregator, **kwargs):
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
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.online_teachers:
            fill_online_targets(inputs, self.online_teachers, self.collator.student, self.args.device)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        loss, logs = self.aggregator(outputs.logits, inputs, num_items=num_items_in_batch)
        scaled = num_items_in_batch is not None
        if scaled and self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        self.loss_is_scaled_for_ga = scaled
        if model.training:
            self._accumulate(logs, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

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
