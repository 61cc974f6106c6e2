#!/usr/bin/env python
"""Does a decode GEMV gain from loading its weights before waiting for the kernel ahead?

With programmatic dependent launch (PDL) a kernel may start while the one before it is
still running; `gdc_wait` then holds it until that kernel's writes are visible. Inductor's
PDL code waits before its reduction loop, so a GEMV's weight loads (which depend on
nothing the previous kernel writes) still start only after it. Here a GEMV whose program
holds its whole weight slice in registers loads that slice first and only then waits for
its input vector. It lets the next kernel launch after its wait ("pdl"), as Inductor's
kernels do, so a kernel that reads a value two kernels back without waiting (as Inductor's
code may) still finds it written; or before its wait ("pdl early": the next kernel's loads
overlap this one's wait too; safe only in a chain where each kernel reads its
predecessor's output alone, as here).

Chains of dependent GEMVs (x <- W_i x), each layer a distinct weight so the chain reads
from HBM as a decode step does, captured in one CUDA graph; us per GEMV and the chain's
read rate. Variants: cuBLAS (F.linear), Inductor's lowering of the same chain
(coordinate descent, with and without PDL), the looped Triton GEMV without PDL, with PDL
waiting first, and the prefetching GEMV without PDL and with both orders, at a few tiles
each.

    python benchmarks/experiments/gemv_pdl_prefetch.py --out $OUT/gemv_pdl_prefetch.json
    python benchmarks/experiments/gemv_pdl_prefetch.py --smoke   # CPU: numerics only, interpreted, no PDL
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py
if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from harness import envelope, write_result  # noqa: E402

# Chains as (name, [(N, K) per GEMV of one layer], layers): Llama-1B's o projection, its
# MLP's up/down pair, and Llama-3.1-8B's o projection.
CHAINS = [("o 2048x2048", [(2048, 2048)], 32), ("up/down 8192x2048, 2048x8192", [(8192, 2048), (2048, 8192)], 16),
          ("o 4096x4096", [(4096, 4096)], 16)]


@triton.jit
def gemv_kernel(x_ptr, w_ptr, y_ptr, N, K,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    # PDL 0: plain launch; 1: wait, then let the next kernel launch; 2 (PREFETCH only): the other way round
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64) * K
    offs_k = tl.arange(0, BLOCK_K)
    if PREFETCH:
        # BLOCK_K covers K: the program's whole slice is loaded before the wait.
        k_mask = offs_k < K
        w = tl.load(w_ptr + rows[:, None] + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_first")
        if PDL == 2:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        if PDL == 1:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    else:
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < K
            x = tl.load(x_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


def triton_chain(block_n, block_k, warps, pdl: int, prefetch):
    def run(x, weights, outs):
        for w, y in zip(weights, outs):
            n, k = w.shape
            bk = triton.next_power_of_2(k) if prefetch else block_k
            extra = {"launch_pdl": True} if pdl else {}  # PDL 0: none, 1: trigger after the wait, 2: before
            gemv_kernel[(triton.cdiv(n, block_n),)](x, w, y, n, k, BLOCK_N=block_n, BLOCK_K=bk, PDL=pdl,
                                                    PREFETCH=prefetch, num_warps=warps, **extra)
            x = y
        return x
    return run


def eager_chain(x, weights, outs):
    for w in weights:
        x = F.linear(x, w)
    return x


def inductor_chain(pdl):
    opts = {"coordinate_descent_tuning": True, "triton.enable_pdl": pdl}
    fn = torch.compile(lambda x, *ws: eager_chain(x, ws, None), options=opts, dynamic=False)
    return lambda x, weights, outs: fn(x, *weights)


def time_graph(run, x, weights, outs, reps):
    """us per replay of `run` captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run(x, weights, outs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = run(x, weights, outs)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    return sorted(times)[len(times) // 2], result


def variants(smoke):
    out = [("cuBLAS", eager_chain)]
    if not smoke:
        out += [("inductor", inductor_chain(False)), ("inductor pdl", inductor_chain(True))]
    for bn, bk, warps in ((1, 1024, 4), (2, 1024, 4)):
        out.append((f"triton loop n{bn} k{bk} w{warps}", triton_chain(bn, bk, warps, 0, False)))
        if not smoke:
            out.append((f"triton loop pdl n{bn} k{bk} w{warps}", triton_chain(bn, bk, warps, 1, False)))
    for bn, warps in ((1, 4), (2, 4), (2, 8), (4, 8)):
        out.append((f"triton prefetch n{bn} w{warps}", triton_chain(bn, 0, warps, 0, True)))
        if not smoke:
            out.append((f"triton prefetch pdl n{bn} w{warps}", triton_chain(bn, 0, warps, 1, True)))
            out.append((f"triton prefetch pdl early n{bn} w{warps}", triton_chain(bn, 0, warps, 2, True)))
    return out


def print_table(rows, group: str, time_key: str, time_label: str):
    """The rows as a table: `group`, the variant, the time, the read rate, the error."""
    print(f"\n{group:<30} {'variant':<32} {time_label:>9} {'TB/s':>6} {'rel err':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r[group]:<30} {r['variant']:<32} {r['error'][:60]}")
        else:
            print(f"{r[group]:<30} {r['variant']:<32} {r[time_key]:>9.2f} {r['tbs']:>6.2f} {r['rel_err']:>8.1e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreted, tiny shapes: numerics only")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    chains = [("smoke", [(48, 40), (40, 48)], 2)] if args.smoke else CHAINS
    rows = []
    for chain, shapes, layers in chains:
        gen = torch.Generator().manual_seed(0)
        dims = [shape for _ in range(layers) for shape in shapes]
        weights = [(torch.randn(n, k, generator=gen) / k ** 0.5).to(device, torch.bfloat16) for n, k in dims]
        x = torch.randn(dims[0][1], generator=gen).to(device, torch.bfloat16)
        outs = [torch.empty(n, device=device, dtype=torch.bfloat16) for n, _ in dims]
        ref = eager_chain(x.float(), [w.float() for w in weights], None)
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        for name, run in variants(args.smoke):
            try:
                if args.smoke:
                    us, result = float("nan"), run(x, weights, outs)
                else:
                    us, result = time_graph(run, x, weights, outs, args.reps)
                err = ((result.float() - ref).norm() / ref.norm()).item()
                row = {"chain": chain, "variant": name, "us_per_gemv": us / len(dims), "tbs": nbytes / us / 1e6,
                       "rel_err": err}
            except Exception as exc:  # a variant that fails to compile or launch is reported, not fatal
                row = {"chain": chain, "variant": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            rows.append(row)
            print(row, flush=True)
    print_table(rows, "chain", "us_per_gemv", "us/GEMV")
    if args.out:
        write_result(args.out, {"experiment": "gemv_pdl_prefetch", "reps": args.reps, "rows": rows},
                     envelope(device))


if __name__ == "__main__":
    main()
