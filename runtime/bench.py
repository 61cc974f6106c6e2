"""`optc bench`: optc and the torch baselines, in one process, on one device.

Decoder LMs are timed in ms per decoded token (prefill excluded) through optc's
StaticCacheDecoder (one CUDA graph per token on the GPU); encoders and ViTs in ms per
forward of a batch. Every optc row is timed by optc.runtime.measure (the search times
its trials there too) and gets its ratio against the fastest baseline of the same run
(`baseline` in the JSON names it), so a ratio > 1 means optc beat the best torch
configuration measured there.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

from optc.errors import CompileError, UsageError
from optc.fileio import atomic_open
from optc.runtime.measure import (  # noqa: F401 (decode_timer: benchmarks/ import it from here)
    Workload, agreement, decode_timer, forward_agreement, measure)

DEFAULT_BASELINES = ("eager", "hf-static", "inductor", "inductor-max")
# Facts of how a row's time was obtained that its JSON row keeps: optc's rounds, and for an
# Inductor baseline the graphs Dynamo made and the CUDA graphs Inductor skipped (a baseline
# that ran without its graphs is slower than the same baseline elsewhere).
ROW_FACTS = ("rounds", "round_medians_ms", "dynamo_graphs", "cudagraph_skips")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench(
    model: str,
    *,
    target: str = "auto",
    baselines: Sequence[str] = DEFAULT_BASELINES,
    tokens: int = 64,
    batch: int | None = None,
    seq: int | None = None,
    variants: Sequence[tuple[str, str, dict, tuple]] = (("optc", "default", {}, ()),),
    autotune: bool = True,
    rounds: int = 1,
    out: str | Path | None = None,
    max_cache_len: int = 256,
    dynamic: tuple[str, ...] = (),
    calibration: str | Path | None = None,
    artifacts: Sequence[str | Path] = (),
    tuning_from: str | Path | None = None,
) -> dict:
    """Time `model` (a zoo name, HF directory or file.py:factory) under each baseline and
    each optc variant, (label, pipeline name, pass settings as optc.compile takes them,
    lowering words as targets.with_overrides takes them), and return the result JSON (also
    written to `out` after every row). `batch` applies
    to LMs (default 1); `rounds` > 1 times the compiled LM rows again round-robin.
    `calibration`: a file for the lossy rows' passes (models/calibration_file.py).
    `artifacts`: saved .optc files of `model`, each a row timed as a load runs it
    (`_time_artifact`), after the compiled rows. `tuning_from`: an artifact whose chosen
    kernel configurations the compiled rows start from (runtime/tuning.py)."""
    import optc
    from optc.compiler import targets
    from optc.compiler.capture import is_causal_lm
    from optc.models.calibration_file import read_calibration
    from optc.models.user import resolve
    from optc.runtime import baselines as torch_baselines
    from optc.runtime.timing import device_probe, result_envelope
    from optc.runtime.tuning import carry_tuning

    if str(model).endswith(".optc"):
        raise UsageError("bench takes a model (zoo name, HF directory or file.py:factory); time a saved artifact "
                         f"beside it with --artifact: optc bench MODEL --artifact {model}")
    manifests = {str(a): _artifact_manifest(a) for a in artifacts}  # a bad file fails before minutes of timing
    tgt = targets.get(target)
    if not targets.available(tgt):
        raise UsageError(f"target {tgt.name} is not present on this machine; "
                         "run bench where it is, or use --target cpu")
    carried = None if tuning_from is None else carry_tuning(tuning_from, tgt, log=_log)
    labels = [v[0] for v in variants] + [Path(a).name for a in artifacts]
    if len(set(labels)) != len(labels):
        raise UsageError(f"two optc rows have the same label: {labels}")
    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {rounds}")
    _check_sizes(batch, seq)
    device = tgt.device
    dtype = None if device == "cpu" else tgt.dtype
    _log(f"loading {model} on {device} ...")
    entry, eager, example_inputs = resolve(model, device=device, dtype=dtype)
    names = list(baselines)
    is_lm = is_causal_lm(eager)
    for path, man in manifests.items():
        _check_artifact_fits(path, man, eager, is_lm, batch)
    if seq is not None and is_lm:
        raise UsageError("--seq is for encoders; a causal LM decodes after a fixed prompt (--tokens sets how many)")
    calib = None if calibration is None else read_calibration(
        calibration, entry=entry, example_inputs=example_inputs, is_lm=is_lm,
        vocab_size=getattr(getattr(eager, "config", None), "vocab_size", None))
    timings, notes, failed = {}, {}, {}
    again: dict = {}  # label -> time the compiled row once more (later rounds)
    info = result_envelope(device)  # once: the JSON is rewritten after every row
    probe = device_probe(device)  # the GPU's own copy and GEMV speed in this process
    if probe:
        _log(f"device probe: copy {probe['copy_tbs']} TB/s, cuBLAS GEMV 8192x2048 {probe['gemv_8192x2048_us']} us")
    if is_lm:
        prompt = example_inputs[0][:, :16].contiguous()
        if batch:
            prompt = prompt[:1].expand(batch, -1).contiguous()
        workload = Workload("decode", batch=prompt.shape[0], tokens=tokens, prompt_len=prompt.shape[1])
    else:
        prompt = None
        if batch or seq:
            example_inputs = _encoder_inputs(entry, example_inputs, batch, seq, device)
        workload = Workload("forward", batch=int(example_inputs[0].shape[0]))

    def summary() -> dict:
        base_names = [n for n in names if n in timings]
        best = min(base_names, key=lambda n: timings[n].median_ms) if base_names else None
        best_ms = timings[best].median_ms if best else None
        rows = [t.as_row(n, best_ms) for n, t in timings.items()]
        for row in rows:
            row["compile_s"] = timings[row["name"]].compile_s
            row.update({k: v for k, v in timings[row["name"]].info.items() if k in ROW_FACTS})
            row.update(notes.get(row["name"], {}))
        against_ideal(rows, "bytes" if is_lm else "flops")
        result = {
            "model": model,
            "target": tgt.name,
            "unit": workload.unit,
            "tokens": tokens if is_lm else None,
            "batch": workload.batch,
            "baseline": best,
            **info,
            "probe": probe,
            "seq": None if is_lm else (int(example_inputs[0].shape[1]) if example_inputs[0].dim() == 2 else None),
            # As a load lowers: max-autotune for forward programs on a GPU, never for the decode step.
            "optc_lowering": "inductor max-autotune" if autotune and device == "cuda" and not is_lm else "inductor",
            "target_lowering": targets.lowering_words(tgt),  # what a row's target.FIELD=VALUE words change
            "tuning_from": carried,
            "rows": rows,
            "failed": failed,
        }
        result["partial"] = True  # until every row and round is in
        return result

    def write(result: dict) -> None:
        if out:  # atomic: a reader never sees half a file
            path = Path(out)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(result, indent=2, default=str))

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

    table = torch_baselines.LM_BASELINES if is_lm else torch_baselines.FORWARD_BASELINES
    for name in names:
        if name not in table:
            known = f"known for {'LMs' if is_lm else 'this model'}: {', '.join(table)}"
            raise UsageError(f"unknown baseline '{name}'; {known}")
        _log(f"baseline {name} ...")
        with _cold_inductor():
            timings[name] = table[name](eager, prompt, tokens) if is_lm else table[name](eager, example_inputs)
        _log(f"baseline {name}: {timings[name].median_ms:.3f} {workload.unit}")
        if timings[name].info.get("cudagraph_skips"):
            _log(f"warning: baseline {name}: Inductor skipped its CUDA graphs {timings[name].info['cudagraph_skips']} "
                 "time(s), so its time may include launch overhead it does not have elsewhere")
        write(summary())
    for label, pipe, passes, lowering in variants:
        _log(f"{label}: compiling ...")
        # The row's lowering: the target's, with the variant's target.FIELD=VALUE words.
        row_tgt = targets.with_overrides(tgt, lowering)
        extra = {"lowering_overrides": list(lowering)} if lowering else {}

        def time_it(pipe=pipe, passes=passes, row_tgt=row_tgt, extra=extra):
            if is_lm:
                art = optc.compile(eager, (prompt,), target=tgt.name, pipeline_name=pipe, passes=passes,
                                   entry=entry, calibration=calib, max_cache_len=max_cache_len, verify=False, log=_log)
                m = measure(art, row_tgt, workload, inputs=prompt, autotune=None if autotune else False, log=_log)
                row_notes = {**_lm_notes(art, m, eager, prompt), "work": _work(art, workload), **extra}
                return m.timing, row_notes, m.remeasure
            art = optc.compile(eager, example_inputs, target=tgt.name, pipeline_name=pipe, passes=passes,
                               entry=entry, calibration=calib, dynamic=dynamic, verify=False, log=_log)
            m = measure(art, row_tgt, workload, inputs=example_inputs, autotune=None if autotune else False, log=_log)
            # Forward rows are timed once: the round-robin rounds are for decode.
            return m.timing, {**_forward_notes(art, m, eager, example_inputs), "work": _work(art, workload),
                              **extra}, None

        run_variant(label, time_it)
    for path in manifests:
        _log(f"{Path(path).name}: loading the artifact ...")
        run_variant(Path(path).name, lambda path=path: _time_artifact(
            path, eager, tgt, workload, prompt if is_lm else example_inputs))
    if is_lm:
        _more_rounds(timings, again, rounds, failed)
    result = summary()
    result.pop("partial")
    _print_table(result)
    write(result)
    if failed:
        err = CompileError(f"bench: {len(failed)} optc variant(s) failed (the others were timed"
                           f"{' and written to ' + str(out) if out else ''}): "
                           + "; ".join(f"{k}: {v[:300]}" for k, v in failed.items()))
        err.result = result  # the CLI still prints the rows that were measured
        raise err
    return result


def against_ideal(rows: list[dict], key: str) -> None:
    """Each row that removed work (`key`: bytes or flops) against the dense optc row of
    the same run (cost_model.mark_against_dense); baseline rows carry no work."""
    from optc.compiler.search.cost_model import mark_against_dense

    mark_against_dense(rows, next((r for r in rows if r["name"] == "optc"), None), key, "median_ms")


def _artifact_manifest(path) -> dict:
    from optc.runtime.artifact import read_manifest

    if not str(path).endswith(".optc") or not Path(path).is_file():
        raise UsageError(f"--artifact {path}: not an .optc file here")
    return read_manifest(path)


def _check_artifact_fits(path: str, man: dict, eager, is_lm: bool, batch: int | None) -> None:
    """An artifact row is timed on the bench's workload and checked against its model:
    refuse one compiled from another model, or for another task or batch."""
    rec = man.get("model", {})
    params = sum(p.numel() for p in eager.parameters())
    before = man.get("params", {}).get("before")
    if rec.get("class") != type(eager).__name__ or before != params:
        raise UsageError(f"--artifact {path} was compiled from a {rec.get('class')} of {before} parameters, not "
                         f"this {type(eager).__name__} of {params}: bench it with the model it came from")
    if (rec.get("task") == "causal-lm") != is_lm:
        raise UsageError(f"--artifact {path} is a {rec.get('task')} artifact; this model is "
                         f"{'a causal LM' if is_lm else 'not a causal LM'}")
    if is_lm and rec.get("batch_size") != (batch or 1):
        raise UsageError(f"--artifact {path} decodes at batch {rec.get('batch_size')}; pass --batch "
                         f"{rec.get('batch_size')} to time it")


def _time_artifact(path: str, eager, tgt, workload, inputs) -> tuple:
    """A saved artifact timed as a user's load runs it: `optc.load`, then its decoder (or
    forward program) lowered as the artifact lowers them, from its kernel cache where
    that applies. Its notes say how long the load and the first call took and whether
    the kernel cache was used (hits and misses)."""
    import optc

    start = time.perf_counter()
    art = optc.load(path)
    load_s = time.perf_counter() - start
    m = measure(art, tgt, workload, inputs=inputs, loaded=True, log=_log)
    status = art.kernel_cache_status or {}
    # The notes a compiled row of the same kind gets (agreement included for LMs), and the load's.
    notes = (_lm_notes(art, m, eager, inputs) if workload.kind == "decode"
             else _forward_notes(art, m, eager, inputs))
    notes.update(artifact=str(path), load_s=round(load_s, 2), setup_s=round(m.setup_s, 1),
                 load_to_ready_s=round(load_s + m.setup_s, 1), work=_work(art, workload),
                 kernel_cache={"used": status.get("used", False), "reason": status.get("reason"),
                               "hits": art.kernel_cache_hits()})
    return m.timing, notes, m.remeasure if workload.kind == "decode" else None


def _check_sizes(batch: int | None, seq: int | None) -> None:
    """None is the model's own size; 0 or less is refused, not read as unset."""
    for name, value in (("batch", batch), ("seq", seq)):
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")


def _encoder_inputs(entry, example_inputs, batch, seq, device) -> tuple:
    """An encoder's inputs at another batch (and, for text, sequence length): built by
    the zoo entry when there is one; a user's model has its example rows repeated."""
    _check_sizes(batch, seq)
    if entry is not None:
        if seq is not None and entry.family == "vit":
            raise UsageError(f"--seq: {entry.name} takes images (its token count is set by the image size)")
        return entry.example_inputs(batch=batch or int(example_inputs[0].shape[0]), seq_len=seq, device=device)
    if seq is not None:
        raise UsageError("--seq needs a zoo model (its tokenizer builds the inputs); time a user's model at the "
                         "length of its example inputs")
    import torch

    n = int(example_inputs[0].shape[0])
    reps = -(-batch // n)
    return tuple(t.repeat(reps, *[1] * (t.dim() - 1))[:batch] if isinstance(t, torch.Tensor) and t.dim() else t
                 for t in example_inputs)


def _work(art, workload) -> dict:
    """Bytes moved, weight bytes, FLOPs and kernels of the timed program per decode step
    or forward (the cost model's count), so a row's speed-up can be set against the work
    a pass removed."""
    from optc.compiler.search.features import program_features

    program = art.programs["decode" if workload.kind == "decode" else "forward"]
    f = program_features(program, art.manifest, batch=workload.batch)
    return {k: f[k] for k in ("bytes", "weight_bytes", "flops", "launches")}


def _lm_notes(art, m, eager, prompt) -> dict:
    # The resolved settings (pipeline, every pass's config, hash): defaults change between
    # versions, and a row must say what it measured without them.
    notes = {"params": art.manifest["params"], "setup_s": round(m.setup_s, 1), "config": art.manifest["config"]}
    applied = [p for p in art.manifest["passes"] if p.get("applied")]
    for p in applied:
        if p["name"] == "skip_layers":
            notes["removed"] = p.get("plan", {}).get("units")
        # What each pass did to the timed program (e.g. which units got sparse kernels).
        notes.setdefault("decode_program", {})[p["name"]] = p.get("programs", {}).get("decode")
    notes["agreement"] = agreement(m.program, art, prompt, None if _lossy(art) else eager)
    return notes


def _forward_notes(art, m, eager, inputs) -> dict:
    notes = {"params": art.manifest["params"], "config": art.manifest["config"]}
    notes["agreement"] = forward_agreement(m.program, art, tuple(inputs), None if _lossy(art) else eager)
    return notes


def _lossy(art) -> bool:
    """Whether a lossy pass changed the artifact's programs: its rows are compared with
    their own programs only, since the eager model computes something else."""
    return any(p.get("lossy") for p in art.manifest["passes"] if p.get("applied"))


def _cold_inductor():
    """Baselines compile cold, as optc's lowering does when it tunes (lowering.lower):
    a graph served from Inductor's FX cache can lose its runtime-tuned kernel configs, so
    a warm baseline against a cold optc row would not be a like-for-like comparison."""
    from optc.compiler.torch_private import inductor_config_patch

    return inductor_config_patch(fx_graph_cache=False)


def _more_rounds(timings: dict, again: dict, rounds: int, failed: dict) -> None:
    """Time every compiled optc row again, round-robin, and pool each row's runs over
    all rounds. The same program measured minutes apart on a lent GPU has differed by
    more than the effects compared here; interleaving spreads such drift over every
    row (it shows as p20-p80 spread) instead of between rows."""
    from optc.runtime.timing import pooled

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
        timings[label] = pooled(ts)


def ideal_note(row: dict) -> str:
    """A row's share of its ideal speed-up (mark_against_dense's fields), as the table shows it."""
    from optc.compiler.search.cost_model import PAYS_SHARE

    if "realised" not in row:
        return ""
    text = f"{100 * row['realised']:.0f}% of {row['ideal_speedup']:.2f}x"
    if row["pays"]:
        return text
    if row["realised"] < 0:
        return text + ": slower than dense optc"
    return text + f": under the {100 * PAYS_SHARE:.0f}% that pays"


def _print_table(result: dict) -> None:
    _log(f"{result['model']} on {result['device']} ({result['unit']}); "
         f"ratio vs the fastest baseline, {result['baseline']}")
    print(f"{'name':<44} {'median':>9} {'p20':>9} {'p80':>9} {'ratio':>7}  of ideal", file=sys.stderr)
    for r in result["rows"]:
        ratio = f"{r['ratio_vs_baseline']:.2f}x" if r["ratio_vs_baseline"] else "-"
        ideal = ideal_note(r)
        print(f"{r['name'][:44]:<44} {r['median_ms']:>9.3f} {r['p20_ms']:>9.3f} {r['p80_ms']:>9.3f} {ratio:>7}"
              f"{'  ' + ideal if ideal else ''}", file=sys.stderr)
