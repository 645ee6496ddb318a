"""Shared fixtures: real tokenizers (mistral-common ships some; ../shared/assets has more)."""
from __future__ import annotations

from pathlib import Path

import pytest

from xtok.testing.assets import ASSETS, MISTRAL_SPM, MISTRAL_SPM_V3, REPO, TEKKEN  # noqa: F401 (re-exported)
from xtok.tokens import load_tokenizer, mistral_common_data_dir


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
