"""Benchmarks run only with `pytest benchmarks/ --benchmark`; each compares xtok against a
reference implementation in the same run and prints the ratio.

Shared helpers:
- `report(name, **fields)`: one grep-able `[xtok-bench]` line;
- `rounds(fn, n)`: CPU time (`time.process_time`, this process) of n calls, as `Rounds` (median, spread);
  asserts use the median, never the best round;
- `run_fresh(code, *args)`: run a Python snippet in a fresh interpreter (a new process image: nothing
  of this process's memory is counted), return the JSON object it prints last. `memory.py` holds what
  such a child uses to measure its own peak memory.

Why not pytest-benchmark's `benchmark` fixture: it times one callable per test by wall clock, while every
benchmark here times xtok *and* its reference (plus per-stage splits and memory children) under the same
CPU-time clock on a shared machine; `rounds()` gives the median and spread those comparisons need. The
package is therefore not a dependency.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


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


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


@dataclass
class Rounds:
    """Seconds per call over several rounds."""

    values: list

    @property
    def median(self) -> float:
        return float(np.median(self.values))

    @property
    def min(self) -> float:
        return float(np.min(self.values))

    @property
    def max(self) -> float:
        return float(np.max(self.values))

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the rounds disagree."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def fields(self, prefix: str, scale: float = 1.0) -> dict:
        """{prefix_median, prefix_min, prefix_max} (times `scale`, e.g. 1e3 for ms)."""
        return {f"{prefix}_median": self.median * scale, f"{prefix}_min": self.min * scale,
                f"{prefix}_max": self.max * scale}


def rounds(fn, n: int, timer=time.process_time, per_call: int = 1) -> Rounds:
    """CPU seconds per call of fn over n rounds (each round = per_call calls)."""
    out = []
    for _ in range(n):
        t0 = timer()
        for _ in range(per_call):
            fn()
        out.append((timer() - t0) / per_call)
    return Rounds(out)


def run_fresh(code: str, *args, env: dict | None = None, timeout: float = 1800) -> dict:
    """Run `python -c code args...` in a fresh process (cwd = the repository, which is on its path)
    and return the JSON object on the last line of its stdout."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    e.update(env or {})
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                         env=e, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
