"""Shared fixtures: real tokenizers (mistral-common ships some; ../shared/assets has more)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from xtok.tokens import load_tokenizer, mistral_common_data_dir

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("XTOK_ASSETS", REPO.parent / "shared" / "assets"))

# Real tokenizers always available (PyPI mistral-common is a dependency).
MISTRAL_SPM = "mistral-common:tokenizer.model.v1"        # SentencePiece 32k, byte fallback
MISTRAL_SPM_V3 = "mistral-common:mistral_instruct_tokenizer_240323.model.v3"  # 32768, control tokens
TEKKEN = "mistral-common:tekken_240911.json"             # byte-level BPE 131k


def asset(rel: str) -> Path:
    """Path under ../shared/assets, or skip the test cleanly when it is absent."""
    p = ASSETS / rel
    if not p.exists():
        pytest.skip(f"asset {rel} not present (set XTOK_ASSETS or place ../shared/assets)")
    return p


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    if not ASSETS.exists():
        pytest.skip("../shared/assets not present")
    return ASSETS


@pytest.fixture(scope="session")
def spm_tok():
    return load_tokenizer(MISTRAL_SPM)


@pytest.fixture(scope="session")
def tekken_tok():
    return load_tokenizer(TEKKEN)


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """Real English text. Falls back to the Python standard library's own docstrings (real prose, in
    paragraphs separated by blank lines) when the assets are absent."""
    p = ASSETS / "corpora" / "tinyshakespeare.txt"
    if p.exists():
        return p.read_text(encoding="utf-8")
    from xtok.cli.demo import stdlib_docstrings
    return "\n\n".join(stdlib_docstrings(400))


def pytest_report_header(config):
    return [f"xtok assets: {ASSETS} ({'present' if ASSETS.exists() else 'absent'}); "
            f"mistral-common data: {mistral_common_data_dir()}"]
