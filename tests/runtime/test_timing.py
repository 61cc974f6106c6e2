import time

import numpy as np
import pytest
import torch

from optc.errors import UsageError
from optc.runtime.timing import Timing, call_with, device_info, device_probe, measure, summarise

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_summarise_known_samples():
    t = summarise([10, 1, 9, 2, 8, 3, 7, 4, 6, 5])  # order must not matter
    assert t.n == 10
    assert t.median_ms == pytest.approx(5.5)
    assert t.p20_ms == pytest.approx(2.8)  # rank 1.8 between 2 and 3
    assert t.p80_ms == pytest.approx(8.2)


def test_summarise_matches_numpy_linear_percentiles():
    rng = np.random.default_rng(0)
    xs = rng.exponential(3.0, size=37).tolist()
    t = summarise(xs)
    assert t.median_ms == pytest.approx(float(np.percentile(xs, 50)))
    assert t.p20_ms == pytest.approx(float(np.percentile(xs, 20)))
    assert t.p80_ms == pytest.approx(float(np.percentile(xs, 80)))
    assert t.p20_ms <= t.median_ms <= t.p80_ms


def test_summarise_single_and_odd():
    assert summarise([4.0]) == Timing(4.0, 4.0, 4.0, 1)
    assert summarise([3, 1, 2]).median_ms == 2.0


@pytest.mark.parametrize("bad", [[], [1.0, -1.0], [float("nan")]])
def test_summarise_rejects_bad_samples(bad):
    with pytest.raises(UsageError):
        summarise(bad)


def test_as_row_ratio_is_baseline_over_median():
    t = summarise([2.0, 2.0, 2.0])
    row = t.as_row("optc", baseline_ms=6.0)
    assert set(row) == {"name", "median_ms", "p20_ms", "p80_ms", "ratio_vs_baseline"}
    assert row["name"] == "optc"
    assert row["ratio_vs_baseline"] == pytest.approx(3.0)  # 3x faster than the baseline
    assert t.as_row("slow", baseline_ms=1.0)["ratio_vs_baseline"] == pytest.approx(0.5)
    assert t.as_row("x", baseline_ms=None)["ratio_vs_baseline"] is None


def test_with_extra_keeps_numbers():
    t = summarise([1.0, 2.0, 3.0]).with_extra(compile_s=1.5, note="x")
    assert (t.median_ms, t.compile_s, t.info["note"]) == (2.0, 1.5, "x")
    assert t.to_dict()["compile_s"] == 1.5


def test_call_with_dispatch():
    f = lambda *a, **k: (a, k)
    assert call_with(f, {"x": 1}) == ((), {"x": 1})
    assert call_with(f, (1, 2)) == ((1, 2), {})
    t = torch.ones(1)
    assert call_with(f, t)[0][0] is t


def test_measure_cpu_times_the_call_and_rotates_inputs():
    seen = []

    def fn(x):
        seen.append(x)
        time.sleep(0.002)

    t = measure(fn, [("a",), ("b",), ("c",)], warmup=2, iters=6, device="cpu")
    assert t.n == 6
    assert 2.0 <= t.median_ms < 200.0
    assert seen == ["a", "b", "a", "b", "c", "a", "b", "c"]  # 2 warm-up calls, then 6 timed


def test_measure_rejects_empty_inputs():
    with pytest.raises(UsageError):
        measure(lambda: None, [], device="cpu")


def test_device_info_cpu():
    info = device_info("cpu")
    for key in ("device", "torch", "triton", "transformers", "cuda", "date"):
        assert key in info
    assert info["torch"] == torch.__version__
    assert info["device_type"] == "cpu"


@pytest.mark.gpu
@cuda
def test_measure_cuda_events_scale_with_work():
    # torch.cuda._sleep spins for a number of GPU cycles: twice the cycles must take
    # about twice the time, which host timing of an async launch would not show.
    short = measure(lambda c: torch.cuda._sleep(c), [(2_000_000,)], warmup=2, iters=10, device="cuda")
    long = measure(lambda c: torch.cuda._sleep(c), [(4_000_000,)], warmup=2, iters=10, device="cuda")
    assert short.median_ms > 0.2
    assert 1.6 < long.median_ms / short.median_ms < 2.4


@pytest.mark.gpu
@cuda
def test_device_info_cuda():
    info = device_info("cuda")
    assert info["device"] == torch.cuda.get_device_name()
    assert info["cuda"] == torch.version.cuda


@pytest.mark.gpu
@cuda
def test_device_probe_cuda():
    probe = device_probe("cuda")
    # A copy of 256 MiB cannot run faster than any HBM or slower than PCIe-era memory.
    assert 0.2 < probe["copy_tbs"] < 10
    assert probe["gemv_8192x2048_us"] > 1
    assert device_info("cuda")["uuid"]


def test_device_probe_cpu_is_none():
    assert device_probe("cpu") is None
