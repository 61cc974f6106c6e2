"""The Python API the CLI is built on: `optc.compile` and `optc.load`.

compile: capture -> passes (lossy ones plan on calibration data) -> re-export ->
lowering through Inductor, verified against the uncompiled programs -> optional
quality evaluation on the held-out split -> an Artifact that saves to `.optc`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from optc.compiler import capture as cap
from optc.compiler import pipeline, targets
from optc.compiler.anatomy import analyze
from optc.compiler.calibration import CalibrationContext
from optc.compiler.codegen import lowering
from optc.compiler.config import flat_to_nested
from optc.errors import UsageError
from optc.runtime.loaded import Artifact


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def compile(
    model: torch.nn.Module,
    example_inputs: tuple,
    *,
    target: str = "auto",
    pipeline_name: str = "default",
    passes: dict | None = None,
    calibration: list | None = None,
    evaluation: list | None = None,
    entry=None,
    max_cache_len: int = 256,
    dynamic: tuple[str, ...] = (),
    verify: bool = True,
    evaluate: bool = False,
    log=_log,
) -> Artifact:
    """Compile `model` for `target` with the pipeline's passes.

    passes: {"skip_layers.count": 2} or {"skip_layers": {"count": 2}}.
    calibration / evaluation: lists of input tuples like `example_inputs` (token ids
    for LMs); a zoo `entry` supplies both from its data splits when they are None.
    evaluate: measure quality before/after on the evaluation data (held out).
    """
    tgt = targets.get(target)
    sets = _nested(passes or {})
    config = pipeline.resolve(pipeline_name, sets)
    timings = {}
    start = time.perf_counter()
    log(f"[optc] capturing {type(model).__name__} with torch.export ...")
    captured = cap.capture(model, example_inputs, max_cache_len=max_cache_len, dynamic=dynamic)
    timings["capture"] = time.perf_counter() - start
    is_lm = captured.task == "causal-lm"
    primary = cap.PREFILL if is_lm else cap.FORWARD
    gms = {name: cap.graph_module(ep) for name, ep in captured.programs.items()}
    anatomy = analyze(gms[primary])
    original = {name: cap.graph_module(ep) for name, ep in captured.programs.items()}
    before_params = pipeline.count(gms[primary])["params"]

    device = _device_of(model)

    def make_context(gm):
        batches = calibration if calibration is not None else _zoo_batches(entry, "calibration", is_lm)
        return CalibrationContext(captured.task, gm, [_as_program_inputs(b, is_lm, device) for b in batches])

    report = pipeline.run(gms, primary, config, make_context, log=log, check_inputs=captured.example_inputs)
    start = time.perf_counter()
    programs = {
        name: cap.reexport(gm, captured.example_inputs[name], captured.dynamic_shapes[name], what=f"the rewritten {name} program")
        for name, gm in gms.items()
    }
    timings["passes_and_reexport"] = time.perf_counter() - start
    verification = {}
    if verify and targets.available(tgt):
        start = time.perf_counter()
        for name, ep in programs.items():
            log(f"[optc] lowering {name} through Inductor for {tgt.name} and verifying ...")
            verification[name] = lowering.lower_and_verify(ep, captured.example_inputs[name], tgt)
        timings["lowering"] = time.perf_counter() - start
    elif verify:
        verification = {"skipped": f"no {tgt.name} device here; the artifact is lowered when loaded there"}
    quality = None
    if evaluate:
        # The held-out batches are built once, for the quality and every pass's own report.
        held_out = evaluation if evaluation is not None else _zoo_batches(entry, "evaluation", is_lm)
        quality = evaluate_quality(entry, captured.task, original[primary], gms[primary], held_out, log, device)
        quality.update(_pass_reports(report, gms[primary], held_out, is_lm, device))
    manifest = {
        "target": tgt.name,
        "config": config,
        "passes": report,
        "quality": quality,
        "model": {
            "name": getattr(entry, "name", None) or type(model).__name__,
            "task": captured.task,
            "class": type(model).__name__,
            **captured.meta,
        },
        "params": {"before": before_params, "after": pipeline.count(gms[primary])["params"]},
        "anatomy": anatomy.summary(),
        "verification": verification,
        "example_inputs": {name: _describe(inputs) for name, inputs in captured.example_inputs.items()},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    return Artifact(programs, manifest)


def evaluate_quality(entry, task, reference_gm, candidate_gm, evaluation, log, device="cpu") -> dict:
    """Quality of the rewritten program against the original on the held-out batches."""
    from optc.models import quality

    is_lm = task == "causal-lm"
    batches = [_as_program_inputs(b, False, device)[0] for b in evaluation]
    log(f"[optc] evaluating quality on {len(batches)} held-out batches ...")
    ref_fn, cand_fn = _forward_fn(reference_gm, is_lm), _forward_fn(candidate_gm, is_lm)
    if is_lm:
        before = quality.perplexity(ref_fn, [b[0] for b in batches])
        after = quality.perplexity(cand_fn, [b[0] for b in batches])
        metric = "perplexity"
        n = sum(b[0].numel() for b in batches)
    else:
        metric = entry.metric if entry is not None else "output-cosine"
        fn = quality.top1_agreement if metric == "top1-agreement" else quality.embedding_cosine
        before = 1.0
        after = fn(ref_fn, cand_fn, batches)
        n = sum(b[0].shape[0] for b in batches)
    return {"metric": metric, "before": before, "after": after, "split": "evaluation", "n": n}


def _pass_reports(report: list[dict], gm, evaluation, is_lm, device) -> dict:
    """Each applied pass's own measurements on the held-out batches (e.g. sparsity)."""
    from optc.compiler import passes

    out, inputs = {}, None
    for entry_ in report:
        spec = passes.get(entry_["name"])
        if entry_["applied"] and spec.report is not None:
            if inputs is None:
                inputs = [_as_program_inputs(b, is_lm, device) for b in evaluation]
            out[entry_["name"]] = spec.report(gm, entry_["plan"], inputs)
    return out


def _forward_fn(gm, is_lm):
    if is_lm:
        def run(input_ids):
            with torch.no_grad():
                return gm(input_ids=input_ids, cache_position=torch.arange(input_ids.shape[1], device=input_ids.device))
        return run

    def run_forward(*args):
        with torch.no_grad():
            return gm(*args)

    return run_forward


def _zoo_batches(entry, which: str, is_lm: bool):
    if entry is None:
        raise UsageError(
            f"a lossy pass (and --eval) needs {which} data: compile a zoo model, a Hugging Face causal LM "
            "directory that holds its tokenizer (tokenizer.save_pretrained(DIR) adds it), or pass "
            f"{which}=[...] to optc.compile from Python"
        )
    n, seq = (4, 128) if which == "calibration" else (16, 128)
    if not is_lm:
        n = 4 if which == "calibration" else 8
    fn = entry.calibration_batches if which == "calibration" else entry.evaluation_batches
    return fn(n, seq, batch=1) if is_lm else fn(n, 32, batch=4)


def _as_program_inputs(batch, is_lm, device) -> tuple[tuple, dict]:
    """A data batch as (args, kwargs) of the program, on the model's device."""
    batch = batch if isinstance(batch, (tuple, list)) else (batch,)
    batch = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in batch)
    if is_lm:
        ids = batch[0]
        return (), {"input_ids": ids, "cache_position": torch.arange(ids.shape[1], device=device)}
    return batch, {}


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _nested(passes: dict) -> dict:
    if all(isinstance(v, dict) for v in passes.values()):
        return passes
    return flat_to_nested(passes)


def _describe(inputs) -> dict:
    args, kwargs = inputs
    shape = lambda t: {"shape": list(t.shape), "dtype": str(t.dtype)} if isinstance(t, torch.Tensor) else repr(t)
    return {"args": [shape(a) for a in args], "kwargs": {k: shape(v) for k, v in kwargs.items()}}


def load(path: str | Path, *, check_versions: bool = True) -> Artifact:
    """Load a `.optc` artifact; refuses truncated, tampered or mismatched files (exit 2)."""
    from optc.runtime.artifact import read_artifact

    loaded = read_artifact(path, check_versions=check_versions)
    return Artifact(loaded.programs, loaded.manifest, loaded.extra_files)
