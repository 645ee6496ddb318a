"""The collator: dataset rows -> training tensors with every teacher's targets, in DataLoader workers.

Modules: `targets` (which targets a teacher gives a student example, filled from a store; the batch
layout), `teachers` (`TeacherSpec`: a teacher's tokenizer, store and W, opened lazily per worker;
`RowProjector`), `collator` (`CrossTokenizerCollator`), `online` (a live teacher's view of a row and its
targets plan, in the workers) and `device` (running live teachers on the training device:
`fill_online_targets`). See `collator`'s docstring and docs/collator.md.
"""
from __future__ import annotations

from ..alignment import MIN_RUN_BYTES, run_filter
from ..rows import example_key
from .collator import IGNORE_INDEX, CrossTokenizerCollator, StudentExample
from .device import OnlineTeacher, fill_online_targets
from .targets import TargetPlan, TeacherTargets, pad_targets, plan_targets, stored_targets
from .teachers import CollatorError, RowProjector, TeacherSpec

__all__ = ["CrossTokenizerCollator", "TeacherSpec", "TeacherTargets", "TargetPlan", "StudentExample", "CollatorError",
           "RowProjector", "plan_targets", "stored_targets", "pad_targets", "example_key", "run_filter",
           "MIN_RUN_BYTES", "IGNORE_INDEX", "OnlineTeacher", "fill_online_targets"]
