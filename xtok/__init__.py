"""xtok: cross-tokenizer knowledge distillation.

Data flows one way: tokens -> align -> projection -> store/extract -> collate -> losses (-> cli).
Heavy modules are imported lazily on first attribute access.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_tokenizer": "tokens", "Tokenizer": "tokens", "TokenBytes": "tokens",
    "align": "align", "Alignment": "align",
    "ProjectionMatrix": "projection",
    "TeacherStore": "store",
    "CrossTokenizerKLLoss": "losses", "ChunkLikelihoodLoss": "losses", "SFTLoss": "losses",
    "MultiTeacherLossAggregator": "losses",
    "CrossTokenizerCollator": "collate", "TeacherSpec": "collate",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'xtok' has no attribute {name!r}")
    return getattr(importlib.import_module(f"xtok.{mod}"), name)


def __dir__():
    return __all__ + ["__version__"]
