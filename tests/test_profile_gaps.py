"""benchmarks/kernels_sparse_linear.idle_before: where a decode step's device idle time
goes, from kernel spans (the profiler itself needs a GPU; the attribution does not)."""

import pytest

import benchmark_scripts


@pytest.fixture(scope="module")
def idle_before():
    return benchmark_scripts.load("kernels_sparse_linear").idle_before


def test_idle_time_goes_to_the_kernel_after_it(idle_before):
    spans = [("a", 0.0, 10.0), ("sparse", 12.5, 20.0), ("b", 21.0, 30.0), ("sparse", 33.0, 40.0)]
    assert idle_before(list(reversed(spans))) == {"sparse": 2.5 + 3.0, "b": 1.0}


def test_overlap_is_not_idle(idle_before):
    # "c" starts while "a" (the longest so far) still runs, though after "b" ended.
    spans = [("a", 0.0, 10.0), ("b", 1.0, 3.0), ("c", 5.0, 12.0), ("d", 12.0, 13.0)]
    assert idle_before(spans) == {"b": 0.0, "c": 0.0, "d": 0.0}
