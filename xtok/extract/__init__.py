"""Run a teacher model over a dataset and write its top-k log-probs to a teacher store (`xtok extract`).

Modules: `config` (ExtractConfig: every option's default, bounds and help; ExtractError), `dataset`
(read_dataset, split files), `render` (dataset rows -> text, ids, target positions), `model` (device,
model checks, load_teacher, OutputLayer and the logit transforms, check_output_layer, model_hash),
`topk` (teacher_targets: the fused on-device top-k statistics; store_rows) and `driver` (extract:
keys, shards, batches, resume).
"""
from __future__ import annotations

from .config import ExtractConfig, ExtractError
from .dataset import read_dataset, split_files
from .driver import extract, length_batches, max_length_note, tail_uniforms
from .model import (OutputLayer, check_model_spec, check_output_layer, gguf_model_file, load_teacher, model_hash,
                    model_max_length, resolve_device, teacher_parts)
from .topk import store_rows, teacher_targets

__all__ = ["ExtractConfig", "ExtractError", "OutputLayer", "extract", "teacher_targets", "load_teacher", "read_dataset",
           "check_output_layer", "model_hash", "store_rows", "length_batches", "tail_uniforms", "split_files",
           "check_model_spec", "gguf_model_file", "model_max_length", "resolve_device", "max_length_note", "teacher_parts"]
