#!/usr/bin/env python
"""Where does optc::decode_qkv lose to Inductor's kernels for the same work?

On the H100 the kernel (RMSNorm + q/k/v + rotary of one token in one launch) takes about
1.2x the time of Inductor's kernels for the same function (benchmarks/NOTES.md, "The
KV-cache write inside the attention-input kernel"). This times, per layer, a ladder of
one-launch kernels that each add one thing the real kernel does, over the same bytes:

    gemv            q, k and v weights as one [rows, K] matrix, BLOCK_N adjacent rows a program
    gemv + norm     the same with the RMSNorm folded in as decode_qkv folds it (statistic
                    accumulated in the loop, g * x as the input)
    pairs + norm    programs over rotary pairs (rows i and i + D/2 of a head), as decode_qkv
    split + norm    gemv + norm over (row block, K slice) programs: partial sums added into an
                    fp32 workspace, the last program of a row block (a counter says which)
                    applying the norm's scale, storing the rows and zeroing the workspace for
                    the next call: more rows a program without fewer programs
    optc            decode_qkv itself (three weight pointers, rotary, the target's tile)
    inductor        Inductor's lowering of HF's form, one compiled call a layer

Each variant runs over distinct weights filling three times the L2, captured in one CUDA
graph; us per layer, read rate over the weights' bytes. The step in which the gap lies is
the one to fix.

    python benchmarks/experiments/qkv_probe.py --out $OUT/qkv_probe.json
    python benchmarks/experiments/qkv_probe.py --smoke   # CPU: numerics only, interpreted
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
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from gemv_pdl_prefetch import print_table, time_graph  # noqa: E402
from harness import envelope, write_result  # noqa: E402
from kernels_decode_qkv import EPS, hf_form, make_layers  # noqa: E402

from optc.compiler.codegen.kernels.decode_qkv import decode_qkv, default_qkv_tile  # noqa: E402

SHAPES = ((2048, 32, 8, 64), (4096, 32, 8, 128))  # K, Hq, Hkv, D: Llama-1B, Llama-3.1-8B


@triton.jit
def ladder_kernel(x_ptr, g_ptr, w_ptr, y_ptr, K, eps,
                  HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  NORM: tl.constexpr, PAIRS: tl.constexpr):
    pid = tl.program_id(0)
    if PAIRS:  # BLOCK_N // 2 rotary pairs: rows i and i + HALF of one head
        j = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        r1 = (j // HALF) * (2 * HALF) + j % HALF
        rows = tl.join(r1, r1 + HALF).reshape(BLOCK_N)
    else:
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)[None, :]
    same_row = tl.zeros((BLOCK_N, 1), dtype=tl.int32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    squares = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * K + kk, mask=k_mask, other=0.0,
                    eviction_policy="evict_first")
        x = tl.load(x_ptr + same_row + kk, mask=k_mask, other=0.0).to(tl.float32)
        if NORM:
            squares += x * x
            x = x * tl.load(g_ptr + same_row + kk, mask=k_mask, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x
    y = tl.sum(acc, axis=1)
    if NORM:
        y = y / tl.sqrt(tl.sum(squares, axis=1) / K + eps)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty))


@triton.jit
def split_kernel(x_ptr, g_ptr, w_ptr, y_ptr, ws_ptr, sq_ptr, count_ptr, K, eps,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    pid, part = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    per_split = K // SPLIT
    offs_k = tl.arange(0, BLOCK_K)[None, :]
    same_row = tl.zeros((BLOCK_N, 1), dtype=tl.int32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    squares = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(part * per_split, (part + 1) * per_split, BLOCK_K):
        kk = k0 + offs_k
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * K + kk, eviction_policy="evict_first")
        x = tl.load(x_ptr + same_row + kk).to(tl.float32)
        squares += x * x
        acc += w.to(tl.float32) * (x * tl.load(g_ptr + same_row + kk).to(tl.float32))
    tl.atomic_add(ws_ptr + rows, tl.sum(acc, axis=1))
    tl.atomic_add(sq_ptr + rows, tl.sum(squares, axis=1))  # each row its own copy of the statistic
    if tl.atomic_add(count_ptr + pid, 1) == SPLIT - 1:  # acq_rel: the other parts' sums are in
        # Read through the atomic unit (not a cached line), then zero for the next call: no
        # other program of this call touches these rows any more.
        zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
        total = tl.atomic_add(ws_ptr + rows, zero)
        sq = tl.atomic_add(sq_ptr + rows, zero)
        tl.store(ws_ptr + rows, zero)
        tl.store(sq_ptr + rows, zero)
        tl.store(count_ptr + pid, 0)
        tl.store(y_ptr + rows, (total / tl.sqrt(sq / K + eps)).to(y_ptr.dtype.element_ty))


def split(block_n, block_k, parts, warps):
    state = {}

    def run(layer, half):
        w = layer["wcat"]
        n, k = w.shape
        assert k % (parts * block_k) == 0 and n % block_n == 0, "the split kernel takes no partial tiles"
        if n not in state:  # zeroed once; each call leaves it zeroed
            state[n] = (torch.zeros(n, device=w.device), torch.zeros(n, device=w.device),
                        torch.zeros(n // block_n, device=w.device, dtype=torch.int32))
        ws, sq, count = state[n]
        y = torch.empty(n, device=w.device, dtype=w.dtype)
        split_kernel[(n // block_n, parts)](layer["x"], layer["g"], w, y, ws, sq, count, k, EPS,
                                            BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=parts, num_warps=warps)
        return y
    return run


def ladder(norm, pairs, block_n, block_k, warps):
    def run(layer, half):
        w = layer["wcat"]
        y = torch.empty(w.shape[0], device=w.device, dtype=w.dtype)
        ladder_kernel[(w.shape[0] // block_n,)](layer["x"], layer["g"], w, y, w.shape[1], EPS, HALF=half,
                                                BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm, PAIRS=pairs,
                                                num_warps=warps)
        return y
    return run


def reference(layer, norm):
    x = layer["x"].double().reshape(-1)
    if norm:
        x = layer["g"].double() * x * torch.rsqrt(x.pow(2).mean() + EPS)
    return layer["wcat"].double() @ x


def variants(smoke, target):
    tiles = ((2, 16, 1),) if smoke else ((1, 1024, 4), (2, 512, 4), (4, 512, 4), (4, 512, 8), (8, 256, 8))
    out = []
    for norm, pairs, name in ((False, False, "gemv"), (True, False, "gemv + norm"), (True, True, "pairs + norm")):
        for bn, bk, warps in tiles:
            if pairs and bn < 2:
                continue
            out.append((f"{name} n{bn} k{bk} w{warps}", norm, ladder(norm, pairs, bn, bk, warps)))
    split_tiles = ((2, 8, 2, 1),) if smoke else ((4, 512, 2, 4), (8, 256, 4, 4), (8, 512, 4, 8), (16, 256, 8, 8))
    for bn, bk, parts, warps in split_tiles:
        out.append((f"split + norm n{bn} k{bk} s{parts} w{warps}", True, split(bn, bk, parts, warps)))

    def optc(layer, half):
        D = 2 * half
        tile = default_qkv_tile(target, half, layer["x"].shape[-1])
        return decode_qkv(layer["x"], layer["g"], EPS, layer["wq"], layer["wk"], layer["wv"], layer["cos"],
                          layer["sin"], D, tile)
    out.append(("optc decode_qkv", "rope", optc))
    if not smoke:
        options = {"coordinate_descent_tuning": True, "triton.cudagraphs": False}
        step = torch.compile(hf_form, options=options, fullgraph=True, dynamic=False)

        def inductor(layer, half):
            q, k, v = step(layer["x"], layer["g"], layer["wq"], layer["wk"], layer["wv"], layer["cos"],
                           layer["sin"], 2 * half)
            return torch.cat([t.reshape(-1) for t in (q, k, v)])
        out.append(("inductor (one call a layer)", "rope", inductor))
    return out


def rope_reference(layer, D):
    parts = hf_form(*(layer[n].double() for n in ("x", "g", "wq", "wk", "wv", "cos", "sin")), D)
    return torch.cat([t.reshape(-1) for t in parts])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--target", default="h100", help="whose decode_qkv tile the optc row takes")
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreted, tiny shapes: numerics only")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    l2 = 50 * 2**20 if args.smoke else torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for K, Hq, Hkv, D in ((32, 4, 2, 8),) if args.smoke else SHAPES:
        shape = f"{K}/{Hq}/{Hkv}/{D}"
        nbytes = 2 * (Hq + 2 * Hkv) * D * K
        copies = 2 if args.smoke else max(2, min(64, -(-3 * l2 // nbytes)))
        layers = make_layers(K, Hq, Hkv, D, copies, device)
        for layer in layers:
            layer["wcat"] = torch.cat([layer["wq"], layer["wk"], layer["wv"]])
        refs = {"rope": [rope_reference(L, D) for L in layers],
                **{norm: [reference(L, norm) for L in layers] for norm in (False, True)}}
        for name, kind, fn in variants(args.smoke, args.target):
            def run(x, weights, outs, fn=fn):
                return [fn(layer, D // 2) for layer in layers]
            try:
                us, results = (float("nan"), run(None, None, None)) if args.smoke else time_graph(
                    run, None, None, None, args.reps)
                err = max(((r.double() - ref).norm() / ref.norm()).item() for r, ref in zip(results, refs[kind]))
                row = {"shape": shape, "variant": name, "us_per_layer": us / copies,
                       "tbs": nbytes * copies / us / 1e6, "rel_err": err}
            except Exception as exc:  # a variant that fails to compile or launch is reported, not fatal
                row = {"shape": shape, "variant": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            rows.append(row)
            print(row, flush=True)
    print_table(rows, "shape", "us_per_layer", "us/layer")
    if args.out:
        write_result(args.out, {"experiment": "qkv_probe", "reps": args.reps, "rows": rows}, envelope(device))


if __name__ == "__main__":
    main()
