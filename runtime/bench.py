"""`optc bench`: optc and the torch baselines, in one process, on one device.

Decoder LMs are timed in ms per decoded token (prefill excluded) through optc's
StaticCacheDecoder (one CUDA graph per token on the GPU); encoders and ViTs in ms per
forward of a batch. Every optc row gets its ratio against the fastest baseline of the
same run (`baseline` in the JSON names it), so a ratio > 1 means optc beat the best
torch configuration measured there.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from optc.errors import CompileError, UsageError


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench(args) -> dict:
    import optc
    from optc.cli import dynamic_dims
    from optc.compiler import targets
    from optc.models.user import resolve
    from optc.runtime import baselines
    from optc.runtime.timing import device_info, device_probe

    if args.model.endswith(".optc"):
        raise UsageError("bench takes a model (zoo name, HF directory or file.py:factory); "
                         "an artifact is benchmarked through the model it was compiled from")
    target = targets.get(args.target)
    if not targets.available(target):
        raise UsageError(f"target {target.name} is not present on this machine; run bench where it is, or use --target cpu")
    device = target.device
    dtype = None if device == "cpu" else target.dtype
    variants = _variants(args)  # bad settings are refused before anything is loaded
    rounds = getattr(args, "rounds", 1)
    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {rounds}")
    _log(f"loading {args.model} on {device} ...")
    entry, model, example_inputs = resolve(args.model, device=device, dtype=dtype)
    names = [n.strip() for n in args.baselines.split(",") if n.strip()]
    is_lm = type(model).__name__.endswith("ForCausalLM")
    autotune = is_lm and not getattr(args, "no_autotune", False)
    timings, notes, failed = {}, {}, {}
    again: dict = {}  # label -> time the compiled row once more (later rounds)
    info = device_info(device)  # once: the JSON is rewritten after every row
    probe = device_probe(device)  # the GPU's own copy and GEMV speed in this process
    if probe:
        _log(f"device probe: copy {probe['copy_tbs']} TB/s, cuBLAS GEMV 8192x2048 {probe['gemv_8192x2048_us']} us")

    def summary() -> dict:
        base_names = [n for n in names if n in timings]
        best = min(base_names, key=lambda n: timings[n].median_ms) if base_names else None
        best_ms = timings[best].median_ms if best else None
        rows = [t.as_row(n, best_ms) for n, t in timings.items()]
        for row in rows:
            row["compile_s"] = timings[row["name"]].compile_s
            row.update({k: v for k, v in timings[row["name"]].info.items() if k in ("rounds", "round_medians_ms")})
            row.update(notes.get(row["name"], {}))
        result = {
            "model": args.model,
            "target": target.name,
            "unit": "ms/token (decode, prefill excluded)" if is_lm else "ms/forward",
            "tokens": args.tokens if is_lm else None,
            "batch": int(example_inputs[0].shape[0]) if not is_lm else (args.batch or 1),
            "baseline": best,
            **info,
            "probe": probe,
            "versions": {k: info[k] for k in ("torch", "triton", "transformers", "cuda")},
            "optc_lowering": "inductor max-autotune" if autotune else "inductor",
            "rows": rows,
            "failed": failed,
        }
        result["partial"] = True  # until every row and round is in
        return result

    def write(result: dict) -> None:
        if args.out:  # atomic: a reader never sees half a file
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=2, default=str))
            tmp.replace(out)

    def run_variant(label, time_it):
        try:
            timings[label], notes[label], remeasure = time_it()
            if rounds > 1 and remeasure is not None:
                again[label] = remeasure
        except UsageError:
            raise
        except Exception as exc:  # one broken variant must not lose the others' numbers
            _log(f"{label}: FAILED\n{traceback.format_exc()}")
            failed[label] = f"{type(exc).__name__}: {exc}"[:2000]
            return
        _log(f"{label}: {timings[label].median_ms:.3f} ms {notes[label].get('agreement', '')}")
        write(summary())  # a run cut short still leaves the rows it measured

    if is_lm:
        prompt = example_inputs[0][:, :16].contiguous()
        if args.batch:
            prompt = prompt[:1].expand(args.batch, -1).contiguous()
        for name in names:
            if name not in baselines.LM_BASELINES:
                raise UsageError(f"unknown baseline '{name}'; known for LMs: {', '.join(baselines.LM_BASELINES)}")
            _log(f"baseline {name} ...")
            with _cold_inductor():
                timings[name] = baselines.LM_BASELINES[name](model, prompt, args.tokens)
            _log(f"baseline {name}: {timings[name].median_ms:.3f} ms/token")
            write(summary())
        for label, pipe, passes in variants:
            _log(f"{label}: compiling ...")

            def time_it(pipe=pipe, passes=passes):
                art = optc.compile(model, (prompt,), target=target.name, pipeline_name=pipe, passes=passes,
                                   entry=entry, max_cache_len=args.max_cache_len, verify=False, log=_log)
                return _time_lm(art, prompt, args.tokens, target, model, autotune=autotune)

            run_variant(label, time_it)
        _more_rounds(timings, again, rounds, failed)
    else:
        inputs = example_inputs
        for name in names:
            if name not in baselines.FORWARD_BASELINES:
                raise UsageError(f"unknown baseline '{name}'; known for this model: {', '.join(baselines.FORWARD_BASELINES)}")
            _log(f"baseline {name} ...")
            with _cold_inductor():
                timings[name] = baselines.FORWARD_BASELINES[name](model, inputs)
            write(summary())
        for label, pipe, passes in variants:
            _log(f"{label}: compiling ...")

            def time_it(pipe=pipe, passes=passes):
                art = optc.compile(model, inputs, target=target.name, pipeline_name=pipe, passes=passes,
                                   entry=entry, dynamic=dynamic_dims(args), verify=False, log=_log)
                return (*_time_forward(art, inputs, target), None)

            run_variant(label, time_it)
    result = summary()
    result.pop("partial")
    _print_table(result)
    write(result)
    if failed:
        err = CompileError(f"bench: {len(failed)} optc variant(s) failed (the others were timed"
                           f"{' and written to ' + args.out if args.out else ''}): "
                           + "; ".join(f"{k}: {v[:300]}" for k, v in failed.items()))
        err.result = result  # the CLI still prints the rows that were measured
        raise err
    return result


def _variants(args) -> list[tuple[str, str, dict]]:
    """(label, pipeline, settings) of each optc row: the pipeline with its defaults
    first (lossless passes only: the dense row), then --set/--config, then each --variant."""
    from optc.cli import pass_settings
    from optc.compiler.config import parse_sets
    from optc.compiler.pipeline import resolve as resolve_pipeline

    all_sets = [pass_settings(args)]
    for text in getattr(args, "variant", []) or []:
        try:
            items = shlex.split(text)  # quote a value with spaces: "skip_layers.layers='[1, 2]'"
        except ValueError as exc:
            raise UsageError(f"--variant {text!r}: {exc}") from None
        if not items:
            raise UsageError("--variant needs at least one PASS.KEY=VALUE setting")
        all_sets.append(parse_sets(items))
    variants = [("optc", args.pipeline, {})]
    for sets in all_sets:
        if sets:
            resolve_pipeline(args.pipeline, sets)  # unknown pass, key or value: exit 2 now
            label = "optc " + " ".join(f"{p}.{k}={json.dumps(v)}" for p, vals in sets.items() for k, v in vals.items())
            if any(label == v[0] for v in variants):
                raise UsageError(f"two optc rows have the same settings: {label}")
            variants.append((label, args.pipeline, sets))
    return variants


def _cold_inductor():
    """Baselines compile cold, as optc's lowering does when it tunes (lowering.lower):
    a graph served from Inductor's FX cache can lose its runtime-tuned kernel configs, so
    a warm baseline against a cold optc row would not be a like-for-like comparison."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(fx_graph_cache=False)


def decode_timer(art, compile_fn, device: str):
    """A StaticCacheDecoder over an artifact's programs for timing decode steps: the
    decode step lowered by `compile_fn`, the prefill program run as exported (compiling
    and autotuning its dynamic-length graph would cost minutes and change no number)."""
    from optc.runtime.decode import StaticCacheDecoder

    meta = art.manifest["model"]
    return StaticCacheDecoder(art.module("prefill", device=device, compiled=False),
                              art.module("decode", device=device, compiled=False),
                              compile=compile_fn, compile_prefill=False, device=device,
                              max_cache_len=meta["max_cache_len"], batch_size=meta["batch_size"])


def _time_lm(art, prompt, n, target, model, autotune: bool = True):
    from optc.compiler.codegen.lowering import lower

    compile_fn = lambda m: lower(m, target, autotune=autotune and target.device == "cuda")  # noqa: E731
    dec = decode_timer(art, compile_fn, str(prompt.device))
    start = time.perf_counter()
    dec.warm_up(prompt)
    warm = time.perf_counter() - start
    _log(f"lowered and warmed up in {warm:.0f} s; timing {n} decode steps ...")
    timing = dec.measure_decode(prompt, n)
    # The resolved settings (pipeline, every pass's config, hash): defaults change between
    # versions, and a row must say what it measured without them.
    notes = {"params": art.manifest["params"], "setup_s": round(warm, 1), "config": art.manifest["config"]}
    applied = [p for p in art.manifest["passes"] if p.get("applied")]
    for p in applied:
        if p["name"] == "skip_layers":
            notes["removed"] = p.get("plan", {}).get("units")
        # What each pass did to the timed program (e.g. which units got sparse kernels).
        notes.setdefault("decode_program", {})[p["name"]] = p.get("programs", {}).get("decode")
    # A lossy variant is compared with its own program only: the eager model differs.
    lossy = any(p.get("lossy") for p in applied)
    notes["agreement"] = _agreement(dec, art, None if lossy else model, prompt)
    return timing.with_extra(compile_s=warm), notes, lambda: dec.measure_decode(prompt, n)


def _more_rounds(timings: dict, again: dict, rounds: int, failed: dict) -> None:
    """Time every compiled optc row again, round-robin, and pool each row's runs over
    all rounds. The same program measured minutes apart on a lent GPU has differed by
    more than the effects compared here; interleaving spreads such drift over every
    row (it shows as p20-p80 spread) instead of between rows."""
    from optc.runtime.timing import summarise

    if rounds < 2 or not again:
        return
    runs = {label: [timings[label]] for label in again}
    for r in range(2, rounds + 1):
        _log(f"round {r} of {rounds}: timing the {len(again)} optc rows again ...")
        for label, remeasure in again.items():
            if label in failed:
                continue
            try:
                runs[label].append(remeasure())
            except Exception as exc:
                _log(f"{label}: FAILED in round {r}\n{traceback.format_exc()}")
                failed[label] = f"round {r}: {type(exc).__name__}: {exc}"[:2000]
    for label, ts in runs.items():
        if label in failed:
            timings.pop(label, None)
            continue
        pooled = summarise([ms for t in ts for ms in t.info["samples_ms"]])
        timings[label] = pooled.with_extra(compile_s=ts[0].compile_s, **{
            k: v for k, v in ts[0].info.items() if k != "samples_ms"},
            rounds=len(ts), round_medians_ms=[round(t.median_ms, 4) for t in ts])


def _agreement(dec, art, model, prompt) -> dict:
    """Teacher-forced logits of the compiled decode loop against the variant's own
    uncompiled prefill program over the whole sequence (and against the eager model for
    lossless variants), so a fast number cannot come from a broken program."""
    from optc.compiler.capture import graph_module

    ids = torch.cat([prompt, prompt[:, :8]], dim=1)
    start = prompt.shape[1] - 1
    with torch.no_grad():
        out = dec.forced_logits(ids, prompt.shape[1]).float()
        program = graph_module(art.programs["prefill"])  # a fresh copy: its own cache
        refs = {"program": program(input_ids=ids, cache_position=torch.arange(ids.shape[1], device=ids.device))}
        if model is not None:
            refs["eager"] = model(ids, use_cache=False).logits
    result = {}
    for name, ref in refs.items():
        ref = ref[:, start:].float()
        result[f"rel_err_vs_{name}"] = ((out - ref).norm() / ref.norm()).item()
        result[f"argmax_match_vs_{name}"] = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return result


def _time_forward(art, inputs, target):
    from optc.runtime.timing import measure

    device = str(inputs[0].device)
    compiled = art.module("forward", device=device, compiled=True)

    def module(*args):
        if device.startswith("cuda"):
            torch.compiler.cudagraph_mark_step_begin()  # Inductor's CUDA graphs reuse outputs
        return compiled(*args)

    start = time.perf_counter()
    with torch.no_grad():
        module(*inputs)
    warm = time.perf_counter() - start
    with torch.no_grad():
        timing = measure(module, [inputs], device=device)
    return timing.with_extra(compile_s=warm), {"params": art.manifest["params"], "config": art.manifest["config"]}


def _print_table(result: dict) -> None:
    _log(f"{result['model']} on {result['device']} ({result['unit']}); ratio vs the fastest baseline, {result['baseline']}")
    print(f"{'name':<44} {'median':>9} {'p20':>9} {'p80':>9} {'ratio':>7}", file=sys.stderr)
    for r in result["rows"]:
        ratio = f"{r['ratio_vs_baseline']:.2f}x" if r["ratio_vs_baseline"] else "-"
        print(f"{r['name'][:44]:<44} {r['median_ms']:>9.3f} {r['p20_ms']:>9.3f} {r['p80_ms']:>9.3f} {ratio:>7}", file=sys.stderr)
