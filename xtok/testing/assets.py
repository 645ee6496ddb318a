"""Where the real test assets are: tokenizers that always exist (mistral-common is a dependency) and
the optional `../shared/assets` folder (real tokenizers, corpora, a tiny real LM) of a development
checkout, or wherever $XTOK_ASSETS points."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO", "ASSETS", "MISTRAL_SPM", "MISTRAL_SPM_V3", "TEKKEN"]

REPO = Path(__file__).resolve().parents[2]  # the checkout holding xtok/ (development installs)
ASSETS = Path(os.environ.get("XTOK_ASSETS", REPO.parent / "shared" / "assets"))

# Real tokenizers always available (PyPI mistral-common is a dependency).
MISTRAL_SPM = "mistral-common:tokenizer.model.v1"        # SentencePiece 32k, byte fallback
MISTRAL_SPM_V3 = "mistral-common:mistral_instruct_tokenizer_240323.model.v3"  # 32768, control tokens
TEKKEN = "mistral-common:tekken_240911.json"             # byte-level BPE 131k
