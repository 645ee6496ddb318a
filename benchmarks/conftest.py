"""Benchmarks run only with `pytest benchmarks/ --benchmark`; each compares xtok against a
reference implementation in the same run and prints the ratio."""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False, help="run the xtok benchmarks")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with --benchmark")
    for item in items:
        item.add_marker(skip)


def report(name: str, **fields):
    """Print one benchmark line in a uniform, grep-able format."""
    body = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
    print(f"\n[xtok-bench] {name}: {body}", flush=True)
