"""A compile session: capture once, read the anatomy once, and compile any number of
pass configurations on cheap copies of the captured programs.

`optc.compile` is one session run; `optc search` runs a session per worker for every
trial, so a trial costs the passes, the re-export and the lowering, not a new capture.
Plans and calibration statistics are cached per (pass, its settings, the settings of the
passes before it); the held-out split is tokenised and the original model's figures on
it are measured once.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from optc.compiler import capture as cap
from optc.compiler import lossy_estimate, pipeline, targets
from optc.compiler.anatomy import analyze
from optc.compiler.calibration import CalibrationContext
from optc.compiler.codegen import kernel_cache, lowering
from optc.compiler.config import config_hash, flat_to_nested
from optc.compiler.heldout import HeldOut
from optc.compiler.torch_private import use_inductors_ptxas
from optc.errors import UsageError
from optc.progress import working

# Held-out windows of 128 tokens for an LM's --eval and a search's full measurement
# (the split holds about 880 of them); a search scores candidates on the first
# SUBSAMPLE first. Encoders and classifiers: batches of ENCODER_BATCH samples.
EVAL_WINDOWS = {"causal-lm": 64, "other": 16}
SUBSAMPLE = {"causal-lm": 16, "other": 4}
DEFAULT_CALIBRATION_SAMPLES = 4
ENCODER_BATCH = 4  # samples per calibration / held-out batch of an encoder or classifier


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Compiled:
    """One configuration compiled in a session: the re-exported programs, the rewritten
    primary graph (for quality) and the manifest an artifact is written with."""

    programs: Mapping  # name -> ExportedProgram (an ExportOnUse for a search trial)
    manifest: dict
    primary_gm: torch.fx.GraphModule
    extra_files: dict = field(default_factory=dict)  # member -> bytes (the kernel cache)


class ExportOnUse(Mapping):
    """A configuration's programs, each re-exported from its rewritten graph when first
    read. A search trial that is only estimated reads its decode program (the cost model's
    features) and never pays for exporting its prefill program. Exporting later changes
    nothing: the state the programs write in place (a decoder's KV cache) is the captured
    program's tensors, which every run's graphs and programs share, not a copy."""

    def __init__(self, gms: dict, export):
        self._gms, self._export, self._done = gms, export, {}
        self.seconds = 0.0  # spent exporting so far

    def __getitem__(self, name: str):
        if name not in self._done:
            start = time.perf_counter()
            self._done[name] = self._export(name, self._gms[name])
            self.seconds += time.perf_counter() - start
        return self._done[name]

    def __contains__(self, name) -> bool:  # Mapping's would export the program to answer
        return name in self._gms

    def __iter__(self):
        return iter(self._gms)

    def __len__(self) -> int:
        return len(self._gms)


class CompileSession:
    def __init__(self, model: torch.nn.Module, example_inputs: tuple, *, target: str = "auto", entry=None,
                 calibration: list | None = None, evaluation: list | None = None, max_cache_len: int = 256,
                 dynamic: tuple[str, ...] = (), prefill_len: int = cap.PREFILL_LEN, log=_log):
        self.target = targets.get(target)
        self.model_name = getattr(entry, "name", None) or type(model).__name__
        self.model_class = type(model).__name__
        self.entry, self.log = entry, log
        self.max_cache_len, self.dynamic, self.prefill_len = max_cache_len, tuple(dynamic), int(prefill_len)
        self._calibration, self._evaluation = calibration, evaluation
        self.device = _device_of(model)
        if self.device.type == "cuda":
            use_inductors_ptxas()  # before the first Triton kernel: one ptxas for the compile and the load
        start = time.perf_counter()
        log(f"[optc] capturing {type(model).__name__} with torch.export ...")
        self.captured = cap.capture(model, example_inputs, max_cache_len=max_cache_len, dynamic=dynamic,
                                    prefill_len=self.prefill_len)
        self.capture_s = time.perf_counter() - start
        self.task = self.captured.task
        self.is_lm = self.task == "causal-lm"
        self.primary = cap.PREFILL if self.is_lm else cap.FORWARD
        self.original = cap.graph_module(self.captured.programs[self.primary])
        self.anatomy = analyze(self.original)
        self.params_before = pipeline.count(self.original)["params"]
        self.cache = pipeline.PlanCache()
        self._calibration_inputs: dict[int, list] = {}
        self._heldout: HeldOut | None = None

    # -- configuration ---------------------------------------------------------------

    def resolve(self, passes: dict | None = None, pipeline_name: str = "default") -> dict:
        """The full resolved config: pipeline, every pass's settings, and what else
        decides the compiled programs (target, cache length, dynamic dims, calibration
        data), all in its hash."""
        config = pipeline.resolve(pipeline_name, _nested(passes or {}))
        for values in config["passes"].values():
            if values.get("align") == 0:  # structured widths follow the target's tiles
                values["align"] = self.target.align
        config["compile"] = {
            "target": self.target.name,
            "max_cache_len": self.max_cache_len if self.is_lm else None,
            "prefill_len": self.prefill_len if self.is_lm else None,
            "dynamic": list(self.dynamic),
            "calibration": self.calibration_source(),
        }
        config["hash"] = config_hash(config)
        return config

    def calibration_source(self) -> str:
        if self._calibration is not None:
            digest = hashlib.sha256()
            for batch in self._calibration:
                for t in batch if isinstance(batch, (tuple, list)) else (batch,):
                    if isinstance(t, torch.Tensor):
                        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
            return f"user:{digest.hexdigest()[:16]}"
        return f"zoo:{self.model_name}:calibration" if self.entry is not None else "none"

    # -- running -----------------------------------------------------------------------

    def run(self, config: dict, *, verify: bool = False, evaluate: bool = False,
            export_on_use: bool = False, estimate: bool = False) -> Compiled:
        """Compile `config` (from `resolve`) on fresh copies of the captured programs.
        `export_on_use`: re-export each program when it is first read (ExportOnUse), for a
        search trial that may need only its decode program. `estimate`: say whether the
        lossy passes are estimated to pay on the target (lossy_estimate; a search prices
        its trials itself)."""
        timings = {"capture": self.capture_s}
        gms = {name: cap.graph_module(ep) for name, ep in self.captured.programs.items()}
        samples = _calibration_samples(config)

        def make_context(gm):
            return CalibrationContext(self.task, gm, self.calibration_inputs(samples))

        start = time.perf_counter()
        report = pipeline.run(gms, self.primary, config, make_context, log=self.log,
                              check_inputs=self.captured.example_inputs, cache=self.cache)
        timings["passes"] = time.perf_counter() - start
        programs = ExportOnUse(gms, lambda name, gm: cap.reexport(
            gm, self.captured.example_inputs[name], self.captured.dynamic_shapes[name],
            what=f"the rewritten {name} program"))
        if not export_on_use:
            exported = dict(programs.items())
            timings["reexport"] = programs.seconds
            programs = exported
        timed = cap.DECODE if self.is_lm else self.primary  # re-exported: every node has its shapes
        against_dense = lossy_estimate.against_dense(self.captured.programs[timed], programs[timed], report,
                                                     self.target, timed) if estimate else None
        if (warning := lossy_estimate.warning(against_dense)) is not None:
            self.log(warning)
        verification, files, cache_record = {}, {}, None
        if verify and targets.available(self.target):
            start = time.perf_counter()
            # The check lowers as a load does, with the FX graph cache on, and what
            # Inductor compiled and tuned for it ships as the artifact's kernel cache.
            with kernel_cache.recording() as recorded:
                for name, ep in programs.items():
                    self.log(f"[optc] lowering {name} through Inductor for {self.target.name} and verifying ...")
                    with working(f"lowering {name}"):
                        verification[name] = lowering.lower_and_verify(
                            ep, self.captured.example_inputs[name], self.target, name, kernel_cache=True,
                            # decode starts where decoding does: from the cache its prefill fills
                            start_state=lowering.decode_start(programs, self.captured.example_inputs)
                            if name == cap.DECODE else None)
            files, cache_record = kernel_cache.package(recorded, self.target, list(programs))
            timings["lowering"] = time.perf_counter() - start
        elif verify:
            verification = {"skipped": f"no {self.target.name} device here; the artifact is lowered when loaded there"}
        quality = None
        if evaluate:
            start = time.perf_counter()
            quality = self.quality(gms[self.primary])
            quality.update(self._pass_reports(report, gms[self.primary]))
            timings["evaluation"] = time.perf_counter() - start
        manifest = {
            "target": self.target.name,
            "config": config,
            "passes": report,
            "quality": quality,
            "estimate": against_dense,
            "model": {"name": self.model_name, "task": self.task, "class": self.model_class, **self.captured.meta},
            "params": {"before": self.params_before, "after": pipeline.count(gms[self.primary])["params"]},
            "anatomy": self.anatomy.summary(),
            "verification": verification,
            "lowering": self._lowering_record(gms, checked=bool(verification) and "skipped" not in verification,
                                              cached="member" in (cache_record or {})),
            "kernel_cache": cache_record,
            "example_inputs": {name: _describe(inputs) for name, inputs in self.captured.example_inputs.items()},
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }
        return Compiled(programs, manifest, gms[self.primary], files)

    def _lowering_record(self, gms: dict, *, checked: bool, cached: bool) -> dict:
        """How a load on the target lowers each program and (None: it did not lower)
        how the compile-time check did: the same, so the kernels checked are the ones
        that run. With a kernel cache both read Inductor's FX graph cache. (Read from the
        rewritten graphs, which the re-exported programs hold node for node.)"""
        load = {name: lowering.lowering_record(self.target, **lowering.load_lowering(self.target, name, gm.graph),
                                               kernel_cache=cached)
                for name, gm in gms.items()}
        return {"target": self.target.name, "check": dict(load) if checked else None, "load": load}

    # -- data --------------------------------------------------------------------------

    def calibration_inputs(self, n: int) -> list:
        """The first `n` calibration batches as program inputs (the zoo's, or the user's)."""
        if n not in self._calibration_inputs:
            if self._calibration is not None:
                batches = self._calibration[:n]
                if len(batches) < n:
                    self.log(f"[optc] the calibration data has {len(batches)} batches; a pass asks for {n}: "
                             f"using all {len(batches)}")
            else:
                batches = self._zoo_batches("calibration", n)
            self._calibration_inputs[n] = [_as_program_inputs(b, self.is_lm, self.device) for b in batches]
        return self._calibration_inputs[n]

    def heldout(self) -> HeldOut:
        """The held-out split with the original model's figures on it (measured once)."""
        if self._heldout is None:
            kind = "causal-lm" if self.is_lm else "other"
            batches = self._evaluation if self._evaluation is not None else self._zoo_batches(
                "evaluation", EVAL_WINDOWS[kind])
            batches = [b if isinstance(b, (tuple, list)) else (b,) for b in batches]
            metric = "perplexity" if self.is_lm else (getattr(self.entry, "metric", None) or "embedding-cosine")
            self.log(f"[optc] measuring the original model on {len(batches)} held-out batches ...")
            self._heldout = HeldOut(self.task, metric, batches, self.original, self.device)
        return self._heldout

    def quality(self, gm, n: int | None = None) -> dict:
        """Quality of a rewritten primary graph against the original, on the first `n`
        held-out batches (all by default)."""
        held = self.heldout()
        self.log(f"[optc] evaluating quality on {min(n or held.size, held.size)} of {held.size} held-out batches ...")
        result = held.loss(gm, n)
        result["split"] = "evaluation"
        result["n"] = result.get("tokens", result.get("samples"))
        return result

    def _zoo_batches(self, which: str, n: int):
        if self.entry is None:
            how = ("give --calibration PATH (a text file, or a .pt list of input tuples), "
                   if which == "calibration" else "")
            raise UsageError(
                f"a lossy pass (and --eval) needs {which} data: compile a zoo model, a Hugging Face causal LM "
                f"directory that holds its tokenizer (tokenizer.save_pretrained(DIR) adds it), {how}or pass "
                f"{which}=[...] to optc.compile from Python"
            )
        fn = self.entry.calibration_batches if which == "calibration" else self.entry.evaluation_batches
        if self.is_lm:
            return fn(n, 128, batch=1)
        # The program was captured at the example's batch and length (unless declared
        # dynamic) and refuses others: batches of that shape, as many samples as n batches
        # of ENCODER_BATCH hold (at least one batch), whatever the captured batch: counting
        # batches of the captured size multiplied the samples by it, past what a GPU holds
        # for a pass that keeps activations (prune_mlp's fit; benchmarks/NOTES.md).
        first = self.captured.example_inputs[self.primary][0][0]
        batch = ENCODER_BATCH if "batch" in self.dynamic else int(first.shape[0])
        seq = 32 if "seq" in self.dynamic or first.dim() != 2 else int(first.shape[1])
        return fn(encoder_batches(n, batch), seq, batch=batch)

    def _pass_reports(self, report: list[dict], gm) -> dict:
        """Each applied pass's own measurements on the held-out batches (e.g. sparsity)."""
        from optc.compiler import passes

        out, inputs = {}, None
        for entry in report:
            spec = passes.get(entry["name"])
            if entry["applied"] and spec.report is not None:
                if inputs is None:
                    inputs = [_as_program_inputs(b, self.is_lm, self.device) for b in self.heldout().batches]
                out[entry["name"]] = spec.report(gm, entry["plan"], inputs)
        return out


def encoder_batches(n: int, batch: int) -> int:
    """Batches of `batch` samples that hold the samples of `n` batches of ENCODER_BATCH."""
    return max(1, -(-n * ENCODER_BATCH // batch))


def _calibration_samples(config: dict) -> int:
    """As many calibration batches as the most any active pass asks for."""
    from optc.compiler import passes

    asked = [values.get("calibration_samples") for name, values in config["passes"].items()
             if passes.get(name).config_cls.from_dict(name, values).active()]
    return max([DEFAULT_CALIBRATION_SAMPLES] + [n for n in asked if isinstance(n, int)])


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
