"""The benchmarks' memory method checked against itself: a child's peak memory does not depend on how
much memory the parent (pytest, after other benchmarks) has used. The reference is the method used
before, `ru_maxrss` of the child, which inherits the parent's peak (see benchmarks/memory.py).

Run: `pytest benchmarks/test_bench_memory.py --benchmark -q -s`.
"""
from __future__ import annotations

import numpy as np

from benchmarks.conftest import report, run_fresh

_CHILD = r"""
import json, resource, sys
import numpy as np
from benchmarks import memory
start = memory.peak_mib()
base = memory.reset_peak()
x = np.ones(int(sys.argv[1]) * 2 ** 20 // 8)  # touch N MiB
del x
print(json.dumps({"start_peak_mib": start, "peak_mib": memory.peak_mib(), "extra_mib": memory.peak_mib() - base,
                  "method": memory.METHOD, "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_bench_memory_method_ignores_the_parent():
    N, BALLAST = 200, 1024
    alone = run_fresh(_CHILD, N)
    ballast = np.ones(BALLAST * 2 ** 20 // 8)  # this process's peak is now >= 1 GiB more
    try:
        loaded = run_fresh(_CHILD, N)
    finally:
        del ballast
    report("memory method (child allocates 200 MiB; parent holds 1 GiB or not)", method=loaded["method"],
           child_peak_mib_alone=alone["peak_mib"], child_peak_mib_parent_1gib=loaded["peak_mib"],
           child_extra_mib_alone=alone["extra_mib"], child_extra_mib_parent_1gib=loaded["extra_mib"],
           old_ru_maxrss_mib_alone=alone["ru_maxrss_mib"], old_ru_maxrss_mib_parent_1gib=loaded["ru_maxrss_mib"])
    assert abs(loaded["peak_mib"] - alone["peak_mib"]) < 32
    assert abs(loaded["extra_mib"] - alone["extra_mib"]) < 16 and N * 0.95 <= loaded["extra_mib"] <= N * 1.15
