#!/usr/bin/env python
"""GPU smoke test of optc's decode runtime against the torch baselines.

On CUDA: a Llama-3.2-1B-shaped model (random init, bf16, built on the GPU) is exported
into prefill + decode programs and decoded greedily by StaticCacheDecoder, one CUDA
graph per token, in three variants:

    optc            the exported programs, no compile
    optc-inductor   torch.compile(mode="default")
    optc-max        torch.compile(mode="max-autotune-no-cudagraphs") under
                    torch._inductor.config.patch(coordinate_descent_tuning=True)

and the four in-process baselines (runtime/baselines.py): eager (HF generate, dynamic
cache), hf-static (HF generate, static cache, auto-compiled on CUDA), inductor and
inductor-max (torch.compile of the static-cache module, greedy Python loop).

ms/token = decode steps only, prefill excluded (see runtime/decode.py), the same
definition for every row. Each optc variant is checked against the eager model: tokens
of the first steps, teacher-forced logits (relative norm of the difference) and, where
tokens differ, that the optc token is within a small margin of the reference argmax.
Any failed check or stage makes the exit status 1; the table is printed last and the
JSON goes to $OUT/decode_smoke.json (or --out).

    python benchmarks/experiments/decode_smoke.py            # H100: the full run, < 8 minutes
    python benchmarks/experiments/decode_smoke.py --tiny     # CPU or GPU: a tiny Llama, same code path
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py

from harness import envelope, write_result  # noqa: E402
from optc.compiler.capture import export_lm_programs  # noqa: E402
from optc.runtime import baselines, decode as decode_mod, timing  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


StaticCacheDecoder = decode_mod.StaticCacheDecoder


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )
    else:
        cfg = LlamaConfig(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
            tie_word_embeddings=True, rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            },
            rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
        )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random init directly in the target dtype
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to(device=device, dtype=dtype).eval()
    n = sum(p.numel() for p in model.parameters())
    log(f"model: {'tiny' if tiny else 'Llama-1B shape'}, {n / 1e6:.1f}M params, {dtype}, {device}")
    return model


def reference_check(model, dec, prompt, k: int, eager_tokens: list[int], dtype) -> dict:
    """optc decoder vs the eager model on the first k new tokens."""
    T = prompt.shape[1]
    seq = dec.generate(prompt, k)  # through the CUDA graph on CUDA
    new = seq[0, T:].tolist()
    with torch.no_grad():
        ref = model(seq, use_cache=False).logits.float()[:, T - 1 : T + k - 1]  # predicts seq[T:]
        got = dec.forced_logits(seq[:, : T + k - 1], T).float()  # no graph, same programs
    rel = float((got - ref).norm() / ref.norm())
    # Negative control: the same metric between neighbouring positions must be large,
    # or the comparison could not tell a wrong program from a right one.
    control = float((got[:, 1:] - ref[:, :-1]).norm() / ref[:, :-1].norm()) if k > 1 else float("inf")
    # How far below the reference maximum each optc token is, in units of the row's std.
    picked = ref.gather(-1, seq[:, T:].unsqueeze(-1)).squeeze(-1)
    gaps = ((ref.max(-1).values - picked) / ref.std(-1)).flatten().tolist()
    bf16 = dtype in (torch.bfloat16, torch.float16)
    rel_tol, gap_tol = (3e-2, 0.1) if bf16 else (1e-4, 1e-3)
    tokens_equal = new == eager_tokens[:k]
    ok = rel <= rel_tol and control > 10 * rel_tol and (tokens_equal or max(gaps) <= gap_tol)
    return {
        "ok": bool(ok),
        "tokens": new,
        "eager_tokens": eager_tokens[:k],
        "tokens_equal_eager": tokens_equal,
        "n_equal": sum(a == b for a, b in zip(new, eager_tokens)),
        "logits_rel_norm": rel,
        "rel_tol": rel_tol,
        "control_rel_norm_shifted": control,
        "max_argmax_gap_in_std": max(gaps),
        "gap_tol": gap_tol,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny Llama (runs on CPU)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (16 with --tiny)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--check-tokens", type=int, default=8)
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    ap.add_argument("--only", default="", help="comma-separated subset of row names")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip stages once past this")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/decode_smoke.json)")
    args = ap.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif args.tiny:
        device = torch.device("cpu")
    else:
        log("no CUDA device: the full smoke run needs one (use --tiny on CPU)")
        return 2
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    T = args.prompt_len
    N = args.new_tokens or (16 if args.tiny else 128)
    K = min(args.check_tokens, N)
    out_path = Path(args.out or os.path.join(os.environ.get("OUT") or tempfile.gettempdir(), "decode_smoke.json"))
    info = envelope(device)
    log(f"device {info['device']}, torch {info['torch']}, triton {info['triton']}, "
        f"transformers {info['transformers']}, cuda {info['cuda']}")

    all_rows = ["optc", "optc-inductor", "optc-max", "eager", "hf-static", "inductor", "inductor-max"]
    wanted = [r for r in args.only.split(",") if r] or all_rows
    bad = [r for r in wanted if r not in all_rows]
    if bad:
        log(f"unknown rows {bad}; known: {all_rows}")
        return 2

    model = build_model(args.tiny, device, dtype)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(1)).to(device)
    L = T + N

    t = time.perf_counter()
    prefill, decode = export_lm_programs(model, batch_size=1, prompt_len=T, max_cache_len=L)
    export_s = time.perf_counter() - t
    log(f"exported prefill [1,{T}] + decode [1,1] programs, max_cache_len {L}: {export_s:.1f}s")

    with torch.no_grad():
        eager_tokens = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=K, min_new_tokens=K,
            do_sample=False, cache_implementation="dynamic", pad_token_id=0,
        )[0, T:].tolist()
    log(f"eager reference tokens: {eager_tokens}")

    results: dict[str, timing.Timing] = {}
    checks: dict[str, dict] = {}
    errors: dict[str, str] = {}
    skipped: list[str] = []

    def over_budget(name: str) -> bool:
        if time.perf_counter() - T0 > args.budget_s:
            log(f"{name}: SKIPPED, past the {args.budget_s:.0f}s budget")
            skipped.append(name)
            return True
        return False

    def run_optc(name: str, compile_fn, patch: dict | None):
        log(f"{name}: building decoder")
        ctx = torch._inductor.config.patch(patch) if patch else _null()
        with ctx:
            dec = StaticCacheDecoder(prefill, decode, compile=compile_fn, compile_prefill=False)
            setup_s = dec.warm_up(prompt)
            log(f"{name}: compile + capture {setup_s:.1f}s (cuda_graph={dec.use_cuda_graph})")
            chk = reference_check(model, dec, prompt, K, eager_tokens, dtype)
            log(f"{name}: check {'OK' if chk['ok'] else 'FAILED'}: tokens {chk['tokens']} "
                f"(equal to eager: {chk['tokens_equal_eager']}), logits rel-norm {chk['logits_rel_norm']:.2e} "
                f"(shifted-position control {chk['control_rel_norm_shifted']:.2f}), "
                f"max argmax gap {chk['max_argmax_gap_in_std']:.3f} std")
            replays_before = dec.graph_replays
            tm = dec.measure_decode(prompt, N - 1, repeats=args.repeats)
            if dec.use_cuda_graph and dec.graph_replays - replays_before != (N - 1) * (args.repeats + 1):
                raise RuntimeError("decode steps did not all go through the CUDA graph")
        tm = tm.with_extra(compile_s=setup_s, cuda_graph=dec.use_cuda_graph, graph_replays=dec.graph_replays)
        return tm, chk

    optc_variants = {
        "optc": (None, None),
        "optc-inductor": (lambda m: torch.compile(m, mode="default", fullgraph=True), None),
        "optc-max": (
            lambda m: torch.compile(m, mode="max-autotune-no-cudagraphs", fullgraph=True),
            {"coordinate_descent_tuning": True},
        ),
    }
    baseline_rows = {
        "eager": lambda: baselines.hf_generate_eager(model, prompt, N, repeats=args.repeats),
        "hf-static": lambda: baselines.hf_generate_static(model, prompt, N, repeats=args.repeats),
        "inductor": lambda: baselines.inductor_decode(model, prompt, N, "default", repeats=args.repeats),
        "inductor-max": lambda: baselines.inductor_decode(model, prompt, N, "max-autotune", repeats=args.repeats),
    }
    # Most informative first, so that a budget cut loses the least.
    order = ["optc", "eager", "hf-static", "optc-max", "inductor-max", "optc-inductor", "inductor"]
    for name in [r for r in order if r in wanted]:
        if over_budget(name):
            continue
        t = time.perf_counter()
        try:
            if name in optc_variants:
                tm, chk = run_optc(name, *optc_variants[name])
                checks[name] = chk
                if not chk["ok"]:
                    errors[name] = "reference check failed"
            else:
                log(f"{name}: running baseline")
                tm = baseline_rows[name]()
                ft = tm.info.get("first_tokens", [])[:K]
                tm = tm.with_extra(n_equal_eager=sum(a == b for a, b in zip(ft, eager_tokens)))
            results[name] = tm
            log(f"{name}: {tm.median_ms:.3f} ms/token (p20 {tm.p20_ms:.3f}, p80 {tm.p80_ms:.3f}), "
                f"compile {tm.compile_s or 0:.1f}s, stage {time.perf_counter() - t:.1f}s, "
                f"info { {k: v for k, v in tm.info.items() if k not in ('definition', 'first_tokens')} }")
        except Exception as e:  # a failed stage is reported, never silently dropped
            errors[name] = f"{type(e).__name__}: {e}"
            log(f"{name}: FAILED: {errors[name]}")
            traceback.print_exc(file=sys.stderr)
        finally:
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    base = results.get("hf-static")
    base_ms = base.median_ms if base is not None else None
    rows = [results[n].as_row(n, base_ms) for n in all_rows if n in results]
    doc = {
        "model": "tiny-llama" if args.tiny else "llama-3.2-1b-shape",
        "dtype": str(dtype).replace("torch.", ""),
        "batch": 1,
        "prompt_len": T,
        "new_tokens": N,
        "repeats": args.repeats,
        "definition": "ms/token = decode steps only (prefill excluded): time from first new token "
        "to last / (new_tokens - 1); CUDA events on CUDA",
        "baseline": "hf-static",
        "export_s": export_s,
        "rows": rows,
        "details": {n: results[n].to_dict() for n in results},
        "checks": checks,
        "errors": errors,
        "skipped": skipped,
        "wall_s": time.perf_counter() - T0,
    }
    write_result(out_path, doc, info)
    log(f"wrote {out_path}")

    print(f"\ndecode, batch 1, prompt {T}, {N} new tokens, {doc['dtype']}, {info['device']}")
    print(f"{'name':<15}{'ms/token':>10}{'p20':>10}{'p80':>10}{'compile_s':>11}{'vs hf-static':>14}")
    for n in all_rows:
        if n in results:
            r = results[n]
            row = r.as_row(n, base_ms)
            ratio = f"{row['ratio_vs_baseline']:.2f}x" if row["ratio_vs_baseline"] else "-"
            print(f"{n:<15}{r.median_ms:>10.3f}{r.p20_ms:>10.3f}{r.p80_ms:>10.3f}{r.compile_s or 0:>11.1f}{ratio:>14}")
        elif n in errors:
            print(f"{n:<15}{'FAILED':>10}  {errors[n][:70]}")
        elif n in skipped:
            print(f"{n:<15}{'skipped':>10}  (time budget)")
    for n, c in checks.items():
        print(f"check {n}: {'OK' if c['ok'] else 'FAILED'} (tokens equal eager: {c['tokens_equal_eager']}, "
              f"rel-norm {c['logits_rel_norm']:.2e}, max gap {c['max_argmax_gap_in_std']:.3f} std)")
    status = 1 if (errors or skipped) else 0
    print(f"status: {'OK' if status == 0 else 'NOT OK'} (errors: {sorted(errors)}, skipped: {skipped}), "
          f"wall {doc['wall_s']:.0f}s")
    return status


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    sys.exit(main())
