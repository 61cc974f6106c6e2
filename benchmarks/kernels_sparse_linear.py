"""Benchmark optc's activation-sparse kernels against dense cuBLAS (bf16, GPU).

    python benchmarks/kernels_sparse_linear.py [--out FILE]    # GPU, ~1 min
    python benchmarks/kernels_sparse_linear.py --tune          # GPU: sweep tiles, then time with the best, ~3 min
    python benchmarks/kernels_sparse_linear.py --smoke         # CPU interpreter, tiny shapes
    python benchmarks/kernels_sparse_linear.py --shapes llama-8b   # Llama-3.1-8B's projections

For the Llama-3.2-1B projections (K->N: 2048->8192, 8192->2048, 2048->2048, 2048->512)
at activation sparsity 0/0.25/0.5/0.7 and 1/4/16 tokens it first checks optc::sparse_linear
against the fp32 reference (relative-norm error < 1e-2), then times it and
torch.nn.functional.linear on the same shapes, and finds the token count where dense
wins (the crossover that kernels/configs.py's CROSSOVER_TOKENS should hold). It also
times optc::cats_gate_up against dense gate+up+silu*mul, and the whole CATS MLP.

Timing: each measurement is a CUDA graph of R calls, each on its own copy of the
weights (and its own activations), replayed under triton.testing.do_bench (median;
do_bench clears L2 before every replay). So every call reads its weights from HBM,
as in decode where the model is far larger than L2, and launch overhead is that of
graph replay, as in optc's runtime. Thresholds for sparsity s are the s-quantile of
|x| for standard normal x (sqrt(2) * erfinv(s)), so the measured sparsity matches;
the union over tokens of active channels (what the kernel must read) is reported too.
Bandwidth counts bytes actually read: active rows x N x 2 + activations + output.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

LLAMA_1B = [(2048, 8192), (8192, 2048), (2048, 2048), (2048, 512)]  # (K, N)
LLAMA_1B_MLP = (2048, 8192)  # (H, I)
LLAMA_8B = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)]  # Llama-3.1-8B
LLAMA_8B_MLP = (4096, 14336)
SHAPES = {"llama-1b": (LLAMA_1B, LLAMA_1B_MLP), "llama-8b": (LLAMA_8B, LLAMA_8B_MLP)}
SPARSITIES = [0.0, 0.25, 0.5, 0.7]
TOKENS = [1, 4, 16]
CROSSOVER_TOKENS = [1, 2, 3, 4, 6, 8, 12, 16]
SWEEP_TOKENS = (1, 4, 16)
PEAK_TBPS = {"H100": 2.94, "H200": 4.3}  # measured device-to-device copy (DESIGN.md, KINDS.md)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes; CPU interpreter if no GPU")
    p.add_argument("--sweep", action="store_true", help="also time candidate tiles (minutes more)")
    p.add_argument("--sweep-only", action="store_true", help="only the sweep (tuning configs.py)")
    p.add_argument("--sweep-tokens", default="1,4,16", help="token counts the sweep tunes")
    p.add_argument("--no-sweep-cats", action="store_true", help="skip the cats_gate_up sweep")
    p.add_argument("--tune", action="store_true",
                   help="sweep first, then time the table with the best tile per token bucket "
                        "(prints the configs.py entries to copy)")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="llama-1b",
                   help="whose projections and MLP to time (default llama-1b)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/... or benchmarks/results/)")
    p.add_argument("--rep-ms", type=float, default=60.0, help="do_bench rep time per measurement")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.smoke:
    import torch  # importing torch does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before optc's kernels are defined

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from harness import envelope, write_result  # noqa: E402
from optc.compiler.codegen import ops  # noqa: E402  (registers optc::*)
from optc.compiler.codegen.kernels import configs  # noqa: E402
from optc.compiler.codegen.kernels.configs import LaunchConfig  # noqa: E402
from optc.compiler.codegen.kernels.cats_mlp import cats_gate_up as cats_host  # noqa: E402
from optc.compiler.codegen.kernels.sparse_linear import plan, prepare_weight  # noqa: E402
from optc.compiler.codegen.kernels.sparse_linear import sparse_linear as sparse_host  # noqa: E402


def sparse_op(device):
    """The registered op on CUDA; on CPU the op is the torch reference, so the smoke run
    calls the (interpreted) Triton host wrappers instead."""
    return (ops.sparse_linear, ops.cats_gate_up) if device.type == "cuda" else (sparse_host, cats_host)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def threshold_for(s: float) -> float:
    """|x| quantile s of a standard normal: P(|x| <= t) = s."""
    return math.sqrt(2.0) * torch.special.erfinv(torch.tensor(s, dtype=torch.float64)).item()


def profile_kernels(run, divide_by: int, gaps: dict | None = None) -> dict[str, tuple[float, float]]:
    """Runs `run()` under torch.profiler: {kernel name (90 chars): (device us, launches)},
    each divided by `divide_by` (steps or calls). Device time only: no launch gaps.
    If `gaps` is a dict, it is filled with ``idle_before``: the device idle time before
    each kernel, per kernel name (see ``idle_before``), also divided by `divide_by`."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    out: dict[str, list] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if us:
            acc = out.setdefault(evt.key[:90], [0.0, 0.0])
            acc[0] += us / divide_by
            acc[1] += evt.count / divide_by
    if gaps is not None:
        device = torch.autograd.DeviceType.CUDA
        spans = [(e.name[:90], e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == device]
        gaps.update({name: us / divide_by for name, us in idle_before(spans).items()})
    return {name: (us, n) for name, (us, n) in out.items()}


def idle_before(spans: list[tuple[str, float, float]]) -> dict[str, float]:
    """{kernel name: summed device idle time just before its launches}, from (name, start,
    end) spans in any order. The idle time before a kernel is its start minus the latest
    end of the kernels that started before it (0 when they overlap). In a CUDA graph of
    dependent kernels that is the launch latency each one adds to the step; a kernel
    that shows much more of it than others is where the step's non-kernel time goes."""
    out: dict[str, float] = {}
    latest_end = None
    for name, start, end in sorted(spans, key=lambda s: s[1]):
        if latest_end is not None:
            out[name] = out.get(name, 0.0) + max(0.0, start - latest_end)
        latest_end = end if latest_end is None else max(latest_end, end)
    return out


class Timer:
    """R calls -> microseconds per call. GPU: CUDA graph + do_bench median; CPU: wall.

    With `profile_kernels`, each GPU timing also replays the graph under torch.profiler and
    leaves in `last_kernels` every kernel's own device time per call ({name: us}): the
    time without launch gaps, which is what a kernel costs inside a decode step's graph,
    where the split-K sum is fused into the next kernel instead of launched on its own."""

    def __init__(self, device, rep_ms, profile_kernels: bool = False):
        self.cuda = device.type == "cuda"
        self.rep_ms = rep_ms
        self.profile_kernels = profile_kernels
        self.last_kernels: dict | None = None

    def _kernel_times(self, graph, n_calls: int, replays: int = 5) -> dict:
        per_call = profile_kernels(lambda: [graph.replay() for _ in range(replays)], replays * n_calls)
        return {name: round(us, 3) for name, (us, _) in per_call.items()}

    def __call__(self, calls):
        for c in calls:  # compile and warm up outside the graph
            c()
        if not self.cuda:
            t0 = time.perf_counter()
            for c in calls:
                c()
            return (time.perf_counter() - t0) * 1e6 / len(calls), "cpu-wall"
        torch.cuda.synchronize()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for c in calls:
                    c()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for c in calls:
                    c()
            ms = triton.testing.do_bench(graph.replay, warmup=10, rep=self.rep_ms, return_mode="median")
            self.last_kernels = self._kernel_times(graph, len(calls)) if self.profile_kernels else None
            return ms * 1e3 / len(calls), "cudagraph+do_bench"
        except Exception as e:  # noqa: BLE001 - fall back to eager timing, say so
            log(f"  graph capture failed ({type(e).__name__}: {e}); timing eagerly")
            it = iter(range(10**9))
            ms = triton.testing.do_bench(
                lambda: calls[next(it) % len(calls)](), warmup=10, rep=self.rep_ms, return_mode="median"
            )
            return ms * 1e3, "eager+do_bench"


class Setup:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float16
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            self.name = props.name
            self.l2 = getattr(props, "L2_cache_size", 50 * 2**20)
        else:
            self.name, self.l2 = "cpu (triton interpreter)", 1 << 16
        self.peak = next((v for k, v in PEAK_TBPS.items() if k in self.name), None)
        self.target = configs.target_for_device(self.device)

    def copies(self, bytes_per_copy: int) -> int:
        """Distinct weight copies per timing graph: enough to span 2x L2, 4..64."""
        if self.smoke:
            return 2
        return max(4, min(64, math.ceil(2 * self.l2 / bytes_per_copy)))


def row_sparse(su, timer, K, N, M, s, Ws, WTs, n_x, check=True, config=None, split_k=None):
    """Times sparse_linear at (K, N, M, s); returns a result dict (and the inputs' stats)."""
    g = torch.Generator(device=su.device).manual_seed(1000 * M + int(100 * s) + K)
    xs = [torch.randn(M, K, device=su.device, generator=g).to(su.dtype) for _ in range(n_x)]
    thr = torch.tensor(threshold_for(s), device=su.device, dtype=torch.float32)
    active = [(x.float().abs() > thr) for x in xs]
    token_sparsity = 1 - sum(a.float().mean().item() for a in active) / n_x
    rows_frac = sum(a.any(dim=0).float().mean().item() for a in active) / n_x
    op = sparse_op(su.device)[0]
    if config is not None:
        def op(x, wt, t, b):
            return sparse_host(x, wt, t, b, config=config, split_k=split_k)
    err = None
    if check:
        err = rel_err(op(xs[0], WTs[0], thr, None), ops.sparse_linear_reference(xs[0], WTs[0], thr, None))
    calls = [lambda i=i: op(xs[i % n_x], WTs[i], thr, None) for i in range(len(WTs))]
    us, method = timer(calls)
    bytes_read = rows_frac * K * N * 2 + M * K * 2 + M * N * 2
    cfg, split, _ = plan(configs.sparse_linear_target(su.target), M, N, K, 2, config, split_k)
    return dict(
        kind="sparse_linear", K=K, N=N, M=M, sparsity=s, token_sparsity=round(token_sparsity, 4),
        rows_read_frac=round(rows_frac, 4), us=round(us, 3), bytes=int(bytes_read),
        gbps=round(bytes_read / us / 1e3, 1), rel_err=err, timing=method,
        config=cfg.__dict__, split_k=split,
    )


def row_dense(su, timer, K, N, M, Ws, n_x):
    g = torch.Generator(device=su.device).manual_seed(7 * M + K)
    xs = [torch.randn(M, K, device=su.device, generator=g).to(su.dtype) for _ in range(n_x)]
    calls = [lambda i=i: F.linear(xs[i % n_x], Ws[i]) for i in range(len(Ws))]
    us, method = timer(calls)
    bytes_read = K * N * 2 + M * K * 2 + M * N * 2
    return dict(kind="dense_linear", K=K, N=N, M=M, us=round(us, 3), bytes=bytes_read,
                gbps=round(bytes_read / us / 1e3, 1), timing=method)


def bench_linear(su, timer, shapes, tokens, sparsities, crossover_tokens):
    rows, failures = [], []
    for K, N in shapes:
        n = su.copies(K * N * 2)
        Ws = [torch.randn(N, K, device=su.device, dtype=su.dtype) / math.sqrt(K) for _ in range(n)]
        WTs = [prepare_weight(w) for w in Ws]
        for M in sorted(set(tokens) | set(crossover_tokens)):
            d = row_dense(su, timer, K, N, M, Ws, 4)
            rows.append(d)
            for s in sparsities:
                if M not in tokens and s == 0.0:
                    continue
                r = row_sparse(su, timer, K, N, M, s, Ws, WTs, 4)
                r["dense_us"] = d["us"]
                r["speedup_vs_dense"] = round(d["us"] / r["us"], 3)
                if su.peak:
                    r["pct_peak_bw"] = round(100 * r["gbps"] / (su.peak * 1e3), 1)
                if r["rel_err"] is None or not r["rel_err"] < 1e-2:
                    failures.append(r)
                rows.append(r)
                log(f"{K:>5}->{N:<5} M={M:<2} s={s:.2f} sparse {r['us']:8.2f} us "
                    f"({r['gbps']:7.1f} GB/s, rows {r['rows_read_frac']:.2f}) dense {d['us']:8.2f} us "
                    f"x{r['speedup_vs_dense']:.2f} err {r['rel_err']:.1e}")
        del Ws, WTs
    return rows, failures


def crossover(rows, sparsities):
    """Per (shape, sparsity): the largest M at which sparse still beats dense, and the
    smallest M at which dense wins (None: sparse wins at every M measured)."""
    out = []
    shapes = sorted({(r["K"], r["N"]) for r in rows if r["kind"] == "sparse_linear"})
    for K, N in shapes:
        for s in sparsities:
            rs = sorted((r for r in rows if r["kind"] == "sparse_linear" and r["K"] == K
                         and r["N"] == N and r["sparsity"] == s), key=lambda r: r["M"])
            if not rs:
                continue
            dense_wins = [r["M"] for r in rs if r["speedup_vs_dense"] <= 1.0]
            sparse_wins = [r["M"] for r in rs if r["speedup_vs_dense"] > 1.0]
            out.append(dict(K=K, N=N, sparsity=s, dense_wins_from=min(dense_wins) if dense_wins else None,
                            sparse_wins_up_to=max(sparse_wins) if sparse_wins else 0))
    return out


def bench_cats(su, timer, H, I, tokens, sparsities):
    rows, failures = [], []
    n = su.copies(2 * I * H * 2)
    Wg = [torch.randn(I, H, device=su.device, dtype=su.dtype) / math.sqrt(H) for _ in range(n)]
    Wu = [torch.randn(I, H, device=su.device, dtype=su.dtype) / math.sqrt(H) for _ in range(n)]
    Wgu = [torch.cat([a, b]) for a, b in zip(Wg, Wu)]
    Wd = [torch.randn(H, I, device=su.device, dtype=su.dtype) / math.sqrt(I) for _ in range(n)]
    WdT = [prepare_weight(w) for w in Wd]
    zero = torch.zeros((), device=su.device)
    sl, cats = sparse_op(su.device)
    for M in tokens:
        g = torch.Generator(device=su.device).manual_seed(M)
        xs = [torch.randn(M, H, device=su.device, generator=g).to(su.dtype) for _ in range(4)]

        def dense_sep(i):
            x = xs[i % 4]
            return F.silu(F.linear(x, Wg[i])) * F.linear(x, Wu[i])

        def dense_fused(i):
            gu = F.linear(xs[i % 4], Wgu[i])
            return F.silu(gu[:, :I]) * gu[:, I:]

        us_sep, method = timer([lambda i=i: dense_sep(i) for i in range(n)])
        us_fused, _ = timer([lambda i=i: dense_fused(i) for i in range(n)])
        us_mlp_dense, _ = timer([lambda i=i: F.linear(dense_fused(i), Wd[i]) for i in range(n)])
        dense_best = min(us_sep, us_fused)
        a0 = F.silu(xs[0].float() @ Wg[0].float().t()).abs()
        for s in sparsities:
            thr = torch.quantile(a0.flatten(), s).reshape(()) if s > 0 else torch.tensor(-1.0, device=su.device)
            kept = [(F.silu(x.float() @ Wg[0].float().t()).abs() > thr) for x in xs]
            rows_frac = sum(k.any(dim=0).float().mean().item() for k in kept) / len(kept)
            h = cats(xs[0], Wg[0], Wu[0], thr)
            err = rel_err(h, ops.cats_gate_up_reference(xs[0], Wg[0], Wu[0], thr))
            us, _ = timer([lambda i=i: cats(xs[i % 4], Wg[i], Wu[i], thr) for i in range(n)])
            us_mlp, _ = timer([lambda i=i: sl(cats(xs[i % 4], Wg[i], Wu[i], thr), WdT[i], zero, None)
                               for i in range(n)])
            bytes_read = I * H * 2 * (1 + rows_frac) + M * H * 2 + M * I * 2
            r = dict(kind="cats_gate_up", H=H, I=I, M=M, sparsity=s, rows_read_frac=round(rows_frac, 4),
                     us=round(us, 3), gbps=round(bytes_read / us / 1e3, 1), rel_err=err,
                     dense_separate_us=round(us_sep, 3), dense_fused_us=round(us_fused, 3),
                     speedup_vs_dense=round(dense_best / us, 3), mlp_us=round(us_mlp, 3),
                     mlp_dense_us=round(us_mlp_dense, 3), mlp_speedup=round(us_mlp_dense / us_mlp, 3),
                     timing=method)
            if su.peak:
                r["pct_peak_bw"] = round(100 * r["gbps"] / (su.peak * 1e3), 1)
            if not err < 1e-2:
                failures.append(r)
            rows.append(r)
            log(f"cats {H}->{I} M={M:<2} s={s:.2f} {us:8.2f} us ({r['gbps']:7.1f} GB/s, up rows "
                f"{rows_frac:.2f}) dense {dense_best:8.2f} us x{r['speedup_vs_dense']:.2f} | MLP "
                f"{us_mlp:8.2f} vs {us_mlp_dense:8.2f} us x{r['mlp_speedup']:.2f} err {err:.1e}")
    return rows, failures


def sweep(su, timer, shapes):
    """Candidate tiles and splits at s=0.5 (the data configs.py is tuned from)."""
    def tiles(m):
        # tl.dot tiles (tokens padded to 16) pipeline through shared memory (cp.async,
        # num_stages), which keeps more bytes in flight than the GEMV's two register
        # tiles; they are candidates for one token too.
        dot = [LaunchConfig(16, bn, bk, 4, st) for bn in (64, 128, 256) for bk in (32, 64, 128)
               for st in (3, 5) if 2048 <= bn * bk <= 16384]
        if m == 1:
            return [LaunchConfig(1, bn, bk, 4, 1) for bn, bk in ((64, 64), (128, 32))] + dot
        return dot

    rows = []
    tgt = configs.sparse_linear_target(su.target)
    for K, N in shapes:
        n = su.copies(K * N * 2)
        Ws = [torch.randn(N, K, device=su.device, dtype=su.dtype) / math.sqrt(K) for _ in range(n)]
        WTs = [prepare_weight(w) for w in Ws]
        for M in SWEEP_TOKENS:
            if M > 1 and (K, N) not in shapes[:1] + shapes[2:3]:
                continue
            cfgs = tiles(M)[:2] if su.smoke else tiles(M)
            for cfg in cfgs:
                chunks = -(-K // cfg.block_k)
                auto = configs.choose_split_k(tgt, cfg, M, N, K, 2)
                splits = {auto} | {s for s in (2, 4, 8, 16, 32) if s <= chunks}
                for split in sorted(splits):
                    try:
                        r = row_sparse(su, timer, K, N, M, 0.5, Ws, WTs, 4, config=cfg, split_k=split)
                    except Exception as e:  # noqa: BLE001 - a tile that does not compile is a result
                        rows.append(dict(kind="sweep", K=K, N=N, M=M, config=cfg.__dict__, split_k=split,
                                         error=f"{type(e).__name__}: {e}"[:300]))
                        continue
                    r["kind"] = "sweep"
                    rows.append(r)
            best = min((r for r in rows if r["kind"] == "sweep" and r["K"] == K and r["N"] == N
                        and r["M"] == M and "us" in r and r["rel_err"] < 1e-2), key=lambda r: r["us"], default=None)
            if best:
                log(f"sweep {K}->{N} M={M}: best {best['us']:.2f} us {best['gbps']:.0f} GB/s "
                    f"{best['config']} split {best['split_k']}")
        del Ws, WTs
    return rows


def sweep_cats(su, timer, H, I):
    def tiles(m):
        dot = [LaunchConfig(16, bn, bk, 4, st) for bn in (16, 32, 64) for bk in (64, 128) for st in (3, 4)]
        if m == 1:
            return [LaunchConfig(1, bn, bk, w, 1) for bn in (8, 16) for bk in (128, 256)
                    for w in (2, 4)] + dot
        return dot

    n = su.copies(2 * I * H * 2)
    Wg = [torch.randn(I, H, device=su.device, dtype=su.dtype) / math.sqrt(H) for _ in range(n)]
    Wu = [torch.randn(I, H, device=su.device, dtype=su.dtype) / math.sqrt(H) for _ in range(n)]
    rows = []
    for M in SWEEP_TOKENS:
        g = torch.Generator(device=su.device).manual_seed(M)
        xs = [torch.randn(M, H, device=su.device, generator=g).to(su.dtype) for _ in range(4)]
        a0 = F.silu(xs[0].float() @ Wg[0].float().t()).abs()
        thr = torch.quantile(a0.flatten(), 0.5).reshape(())
        for cfg in (tiles(M)[:2] if su.smoke else tiles(M)):
            try:
                err = rel_err(cats_host(xs[0], Wg[0], Wu[0], thr, config=cfg),
                              ops.cats_gate_up_reference(xs[0], Wg[0], Wu[0], thr))
                us, _ = timer([lambda i=i: cats_host(xs[i % 4], Wg[i], Wu[i], thr, config=cfg) for i in range(n)])
            except Exception as e:  # noqa: BLE001
                rows.append(dict(kind="sweep_cats", M=M, config=cfg.__dict__, error=f"{type(e).__name__}: {e}"[:300]))
                continue
            rows.append(dict(kind="sweep_cats", H=H, I=I, M=M, sparsity=0.5, config=cfg.__dict__,
                             us=round(us, 3), rel_err=err))
        best = min((r for r in rows if r["M"] == M and "us" in r and r["rel_err"] < 1e-2),
                   key=lambda r: r["us"], default=None)
        if best:
            log(f"sweep cats M={M}: best {best['us']:.2f} us {best['config']}")
    return rows


def best_tiles(sweep_rows, kind):
    """Per token count: the tile with the lowest geometric-mean time over the swept
    shapes (each shape at its best split), as a LaunchConfig."""
    out = {}
    for M in sorted({r["M"] for r in sweep_rows if r["kind"] == kind}):
        per_tile = {}
        for r in sweep_rows:
            if r["kind"] != kind or r["M"] != M or "us" not in r or not r["rel_err"] < 1e-2:
                continue
            key = tuple(sorted(r["config"].items()))
            shape = (r.get("K", r.get("H")), r.get("N", r.get("I")))
            per_tile.setdefault(key, {})
            per_tile[key][shape] = min(per_tile[key].get(shape, float("inf")), r["us"])
        n_shapes = max((len(v) for v in per_tile.values()), default=0)
        scored = [(math.exp(sum(math.log(t) for t in v.values()) / len(v)), k)
                  for k, v in per_tile.items() if len(v) == n_shapes]
        if scored:
            out[M] = LaunchConfig(**dict(min(scored)[1]))
    return out


def apply_tiles(target, linear_tiles, cats_tiles):
    """Replace the target's bucket tiles in configs (this process only)."""
    import dataclasses

    def merged(buckets, tiles):
        new = dict(buckets)
        for M, cfg in tiles.items():
            bucket = next((b for b, _ in buckets if M <= b), buckets[-1][0])
            new[bucket] = cfg
        return tuple(sorted(new.items()))

    tl_ = configs.SPARSE_LINEAR[target]
    configs.SPARSE_LINEAR[target] = dataclasses.replace(tl_, buckets=merged(tl_.buckets, linear_tiles))
    ct = configs.CATS_GATE_UP[target]
    configs.CATS_GATE_UP[target] = dataclasses.replace(ct, buckets=merged(ct.buckets, cats_tiles))
    return configs.SPARSE_LINEAR[target].buckets, configs.CATS_GATE_UP[target].buckets


def table(rows, xover, su):
    lines = [f"# {su.name}  torch {torch.__version__}  triton {triton.__version__}  dtype {su.dtype}"]
    lines.append(f"{'shape':>11} {'M':>3} {'s':>5} {'rows':>5} {'sparse us':>10} {'GB/s':>7} "
                 f"{'%peak':>6} {'dense us':>9} {'speedup':>8}")
    for r in rows:
        if r["kind"] == "sparse_linear" and r["M"] in TOKENS_SHOWN:
            lines.append(f"{r['K']:>5}->{r['N']:<5} {r['M']:>3} {r['sparsity']:>5.2f} "
                         f"{r['rows_read_frac']:>5.2f} {r['us']:>10.2f} {r['gbps']:>7.0f} "
                         f"{r.get('pct_peak_bw', float('nan')):>6.1f} {r['dense_us']:>9.2f} "
                         f"{r['speedup_vs_dense']:>8.2f}")
    lines.append(f"{'cats H->I':>11} {'M':>3} {'s':>5} {'rows':>5} {'cats us':>10} {'GB/s':>7} "
                 f"{'%peak':>6} {'dense us':>9} {'speedup':>8} {'MLP us':>8} {'dense':>8} {'MLP x':>6}")
    for r in rows:
        if r["kind"] == "cats_gate_up":
            lines.append(f"{r['H']:>5}->{r['I']:<5} {r['M']:>3} {r['sparsity']:>5.2f} "
                         f"{r['rows_read_frac']:>5.2f} {r['us']:>10.2f} {r['gbps']:>7.0f} "
                         f"{r.get('pct_peak_bw', float('nan')):>6.1f} "
                         f"{min(r['dense_separate_us'], r['dense_fused_us']):>9.2f} "
                         f"{r['speedup_vs_dense']:>8.2f} {r['mlp_us']:>8.2f} {r['mlp_dense_us']:>8.2f} "
                         f"{r['mlp_speedup']:>6.2f}")
    lines.append("crossover (largest M where sparse beats dense; tokens measured: "
                 f"{sorted({r['M'] for r in rows if r['kind'] == 'sparse_linear'})})")
    for s in sorted({c["sparsity"] for c in xover}):
        per = [c for c in xover if c["sparsity"] == s]
        lines.append(f"  s={s:.2f}: " + ", ".join(f"{c['K']}->{c['N']}: {c['sparse_wins_up_to']}" for c in per)
                     + f"  | all shapes: {min(c['sparse_wins_up_to'] for c in per)}")
    return "\n".join(lines)


TOKENS_SHOWN = set(TOKENS)


def main(args):
    global TOKENS_SHOWN, SWEEP_TOKENS
    su = Setup(args.smoke)
    if su.device.type != "cuda" and not args.smoke:
        log("no GPU: run with --smoke for the CPU interpreter path")
        return 2
    if args.smoke:
        shapes, mlp, tokens, sparsities, xtokens = [(40, 48), (48, 24)], (24, 40), [1, 3], [0.0, 0.5], [2]
    else:
        (shapes, mlp), tokens, sparsities, xtokens = SHAPES[args.shapes], TOKENS, SPARSITIES, CROSSOVER_TOKENS
    TOKENS_SHOWN = set(tokens)
    timer = Timer(su.device, args.rep_ms)
    t0 = time.time()
    log(f"device {su.name} target {su.target} L2 {su.l2 / 2**20:.0f} MiB peak {su.peak} TB/s")
    rows, fails, xover = [], [], []
    tuned = None
    if args.tune:
        SWEEP_TOKENS = tuple(int(t) for t in args.sweep_tokens.split(","))
        rows += sweep(su, timer, shapes)
        rows += sweep_cats(su, timer, *mlp)
        sl_b, cats_b = apply_tiles(su.target, best_tiles(rows, "sweep"), best_tiles(rows, "sweep_cats"))
        tuned = dict(sparse_linear=[(b, c.__dict__) for b, c in sl_b], cats_gate_up=[(b, c.__dict__) for b, c in cats_b])
        log(f"tuned sparse_linear buckets: {sl_b}")
        log(f"tuned cats_gate_up buckets: {cats_b}")
    if not args.sweep_only:
        rows, fails = bench_linear(su, timer, shapes, tokens, sparsities, xtokens)
        xover = crossover(rows, [s for s in sparsities if s > 0])
        crows, cfails = bench_cats(su, timer, *mlp, tokens, sparsities)
        rows += crows
        fails += cfails
    if (args.sweep or args.sweep_only) and not args.tune:
        SWEEP_TOKENS = tuple(int(t) for t in args.sweep_tokens.split(","))
        rows += sweep(su, timer, shapes)
        if not args.no_sweep_cats:
            rows += sweep_cats(su, timer, *mlp)
    result = dict(
        target=su.target, dtype=str(su.dtype), l2_bytes=su.l2, peak_tbps=su.peak, smoke=args.smoke,
        timing="CUDA graph of R calls on R distinct weight copies, do_bench median (L2 cleared per replay) / R",
        seconds=round(time.time() - t0, 1), crossover=xover,
        crossover_tokens_configured=configs.crossover_tokens(su.target),
        failures=len(fails), tuned_buckets=tuned,
        buckets_used=dict(sparse_linear=[(b, c.__dict__) for b, c in configs.SPARSE_LINEAR[su.target].buckets],
                          cats_gate_up=[(b, c.__dict__) for b, c in configs.CATS_GATE_UP[su.target].buckets]),
        rows=rows,
    )
    out = Path(args.out) if args.out else (
        Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
    ) / ("kernels_sparse_linear.smoke.json" if args.smoke else
         "kernels_sparse_linear.json" if args.shapes == "llama-1b" else f"kernels_sparse_linear_{args.shapes}.json")
    write_result(out, result, envelope(su.device))
    log(f"wrote {out} ({result['seconds']} s)")
    print(table(rows, xover, su))
    if fails:
        log(f"{len(fails)} configurations failed the correctness check (rel err >= 1e-2)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
