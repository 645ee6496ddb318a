"""xtok: cross-tokenizer knowledge distillation.

Data flows one way (each package imports only those before it):

    tokens, chat, rows -> alignment -> projection -> store -> extract -> collate -> losses -> trainer  (cli/)

Heavy modules are imported lazily on first attribute access (`xtok.align` is the function; the
alignment package is `xtok.alignment`).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "load_tokenizer": "tokens", "Tokenizer": "tokens", "TokenBytes": "tokens",
    "RowFormat": "rows", "example_key": "rows",
    "align": "alignment", "Alignment": "alignment",
    "ProjectionMatrix": "projection",
    "TeacherStore": "store",
    "CrossTokenizerKLLoss": "losses", "ChunkLikelihoodLoss": "losses", "SFTLoss": "losses",
    "MultiTeacherLossAggregator": "losses", "TeacherLoss": "losses",
    "CrossTokenizerCollator": "collate", "TeacherSpec": "collate", "fill_online_targets": "collate",
    "DistillationTrainer": "trainer",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # names for IDEs and type checkers; at run time they load lazily (__getattr__)
    from .alignment import Alignment, align
    from .collate import CrossTokenizerCollator, TeacherSpec, fill_online_targets
    from .losses import ChunkLikelihoodLoss, CrossTokenizerKLLoss, MultiTeacherLossAggregator, SFTLoss, TeacherLoss
    from .projection import ProjectionMatrix
    from .rows import RowFormat, example_key
    from .store import TeacherStore
    from .tokens import TokenBytes, Tokenizer, load_tokenizer
    from .trainer import DistillationTrainer


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'xtok' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"xtok.{mod}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return __all__ + ["__version__"]
