"""benchmarks/kernels_sparse_linear.idle_before: where a decode step's device idle time
goes, from kernel spans (the profiler itself needs a GPU; the attribution does not)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def idle_before():
    spec = importlib.util.spec_from_file_location("kernels_sparse_linear", ROOT / "benchmarks" / "kernels_sparse_linear.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))  # as when run as a script: benchmarks/harness.py importable
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod.idle_before


def test_idle_time_goes_to_the_kernel_after_it(idle_before):
    spans = [("a", 0.0, 10.0), ("sparse", 12.5, 20.0), ("b", 21.0, 30.0), ("sparse", 33.0, 40.0)]
    assert idle_before(list(reversed(spans))) == {"sparse": 2.5 + 3.0, "b": 1.0}


def test_overlap_is_not_idle(idle_before):
    # "c" starts while "a" (the longest so far) still runs, though after "b" ended.
    spans = [("a", 0.0, 10.0), ("b", 1.0, 3.0), ("c", 5.0, 12.0), ("d", 12.0, 13.0)]
    assert idle_before(spans) == {"b": 0.0, "c": 0.0, "d": 0.0}
