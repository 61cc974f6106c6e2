"""Lowering: Inductor compiles the rewritten programs for the target, and each
lowering is verified numerically against the uncompiled program on fresh random
inputs (a lossless step must not change the function)."""

from __future__ import annotations

import contextlib

import torch
from torch.export import ExportedProgram

from optc.compiler.capture import graph_module, is_state_buffer
from optc.compiler.codegen.check_inputs import (  # noqa: F401  (part of this module's API)
    decode_start, prefilled_state, random_like_inputs, reset_state, vocab_size)
from optc.compiler.codegen.constant_masks import drop_constant_masks
from optc.compiler.codegen.decode_gemv import use_decode_gemv
from optc.compiler.codegen.decode_qkv import use_decode_qkv
from optc.compiler.codegen.decode_sdpa import use_decode_attention
from optc.compiler.codegen.direct import DirectLowering
from optc.compiler.codegen.encoder_sdpa import use_encoder_attention
from optc.compiler.codegen.gemv_inputs import realize_gemv_inputs
from optc.compiler.codegen.linear_gelu import use_linear_gelu
from optc.compiler.codegen.merge_gemms import use_merged_gemms
from optc.compiler.codegen.noisy_twin import HALF as _HALF, noisy_twin
from optc.compiler.codegen.patch_gemm import use_patch_gemms
from optc.compiler.codegen.sources_tag import tag_cache_keys
from optc.compiler.rewrite import view_key
from optc.compiler.targets import LOWERING_FIELDS, Target
from optc.compiler.torch_private import (cached_choice_not_tuned_again, config_pickles_keep_coordesc,
                                        static_autotuner_keeps_coordesc)
from optc.errors import CompileError

# Tolerances of ||out - ref|| / ||ref||: fp32 reorderings land far below 1e-4;
# bf16 operands between 1e-3 and 1e-2 per op. A deep half-precision program compounds its
# ops' rounding (Llama-1B in bf16 on the H100: 0.025 between eager and Inductor, Llama-8B
# 0.048), so for bf16/fp16 outputs the tolerance is the larger of this floor and the
# program's own rounding noise (see rounding_noise: weights and activations moved by one ulp).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# The noise-derived tolerance never exceeds this: at half the output's norm the check could
# no longer tell rounding from a wrong lowering (one that returns zeros has error 1), so an
# input that sensitive fails the check rather than passing anything.
NOISE_TOLERANCE_CAP = 0.5

# Buffers holding activation thresholds carry this prefix (sparsify_activations names
# them), so that verify() can find them in a thresholded program.
THRESHOLD_BUFFER_PREFIX = "sparsify_t_"


# Inductor's on-disk FX graph cache returns a compiled graph without the kernel configs
# that runtime tuning (coordinate descent) chose for it when that choice was not one of
# the precompiled configs (pytorch/pytorch#153565, #172819). On the H100 every cache hit
# decoded slower than a cold compile of the same graph: llama-1b dense 1.395 vs 1.347
# ms/token, TEAL 0.5 graph 1.414 vs 1.308, CATS 1.342 vs 1.301, CHESS 1.422 vs 1.349
# (benchmarks/NOTES.md). optc compiles cold whenever it tunes: tens of seconds more at
# load, a faster decode step. The exception is an artifact's kernel cache
# (codegen/kernel_cache.py): the compile records the entries of the very lowering it
# verified, configurations included, and a load that installs them must hit them; on torch
# 2.11 to 2.13 that needs torch_fixes.static_autotuner_keeps_coordesc, without which
# kernels of a hit are tuned again at the load.


def lower(gm: torch.nn.Module, target: Target, *, autotune: bool = False, cudagraphs: bool = False,
          shape_tuning: bool = True, kernel_cache: bool = False, decoder: bool = False):
    """torch.compile with Inductor and the target's options (applied per call, never
    to the global Inductor config). `autotune` benchmarks GEMM and kernel configs on
    the device (max-autotune); `cudagraphs` lets Inductor capture CUDA graphs itself:
    leave it off where optc's decode loop captures the whole step. `shape_tuning=False`
    drops the target's per-kernel tuning (coordinate descent) too: see load_lowering.
    `kernel_cache` turns Inductor's FX graph cache on whatever the tuning: the compile
    records an artifact's kernel cache with it, and a load that installed one reads it.
    `decoder`: a decoder LM's prefill or decode program (the target's decoder_inductor
    options apply)."""
    tag_cache_keys()  # a cached graph is rebuilt when optc's ops change (sources_tag)
    options = inductor_options(target, autotune=autotune, cudagraphs=cudagraphs, shape_tuning=shape_tuning,
                               kernel_cache=kernel_cache, decoder=decoder)
    prepare_inductor(options)
    gm = target_graph(gm, target, forward=not decoder)
    if isinstance(gm, torch.fx.GraphModule) and frontend(cudagraphs) == DIRECT:
        return DirectLowering(gm, options)
    return torch.compile(gm, backend="inductor", options=options, fullgraph=True, dynamic=False)


def prepare_inductor(options: dict) -> None:
    """What Inductor needs patched before it compiles with `options` (torch_fixes)."""
    if options.get("coordinate_descent_tuning"):
        config_pickles_keep_coordesc()  # a cached choice survives Inductor's compile workers
        # A stored choice (a load's kernel cache, --tuning-from's configurations) is kept, not tuned again.
        cached_choice_not_tuned_again()
        if options.get("fx_graph_cache"):
            static_autotuner_keeps_coordesc()  # a cache hit keeps the compile's choices


DIRECT, DYNAMO = "direct", "dynamo"


def frontend(cudagraphs: bool) -> str:
    """What hands a program's graph to Inductor: DIRECT, no Dynamo in front of a graph
    torch.export already traced (codegen/direct.py), unless Inductor captures its own
    CUDA graphs, whose trees torch.compile (DYNAMO) manages. The manifest records it per
    program, and a kernel cache recorded through the other keys other graphs."""
    return DYNAMO if cudagraphs else DIRECT


def target_graph(gm: torch.nn.Module, target: Target, *, forward: bool) -> torch.nn.Module:
    """The graph `target` compiles: `gm` with the target's rewrites (patch convolutions as
    GEMMs; attention masks that keep every score dropped; a forward program's sibling GEMMs
    merged, and its linear + GELU pairs fused; decode GEMV inputs realised, decode-step
    attention, GEMVs and masked encoder attention on optc's kernels), as a copy sharing its
    parameters, or `gm` itself where none applies.
    `forward`: not a decoder LM's prefill or decode program (DECODER_PROGRAMS). `lower`
    and the AOTInductor packages (codegen/aoti.py) both compile this, so a package runs
    what a lowering runs."""
    if not isinstance(gm, torch.fx.GraphModule):
        return gm
    if target.patch_gemm:
        gm, _ = use_patch_gemms(gm)
    if target.drop_constant_masks:
        gm, _ = drop_constant_masks(gm)
    if forward and target.merge_gemms:
        gm, _ = use_merged_gemms(gm, TOLERANCE)
    if forward and target.linear_gelu:
        gm, _ = use_linear_gelu(gm)
    if target.realize_gemv_inputs:
        gm, _ = realize_gemv_inputs(gm)
    if target.decode_attention:
        gm, _ = use_decode_attention(gm)
    if forward and (target.encoder_attention or target.encoder_attention_unmasked):  # not a decoder's prefill
        # after drop_constant_masks: a mask it drops leaves an unmasked SDPA
        gm, _ = use_encoder_attention(gm, masked=target.encoder_attention,
                                      unmasked=target.encoder_attention_unmasked)
    if target.decode_gemv:
        gm, _ = use_decode_gemv(gm)  # after decode_attention: its outputs are in memory
    if target.decode_qkv or target.decode_qkv_cache:
        # last: the rewrites above read the shapes of what it replaces
        gm, _ = use_decode_qkv(gm, write_cache=target.decode_qkv_cache)
    return gm


def inductor_options(target: Target, *, autotune: bool = False, cudagraphs: bool = False,
                     shape_tuning: bool = True, kernel_cache: bool = False, decoder: bool = False) -> dict:
    """The options `lower` hands torch.compile (the manifest records them)."""
    options = {**target.decoder_inductor, **target.inductor} if decoder else dict(target.inductor)
    if not shape_tuning:
        options.pop("coordinate_descent_tuning", None)
    if kernel_cache:
        options["fx_graph_cache"] = True
    elif options.get("coordinate_descent_tuning") or autotune:
        options.setdefault("fx_graph_cache", False)  # compile cold: see the note above lower()
    if autotune:
        options["max_autotune"] = True
    options["triton.cudagraphs"] = bool(cudagraphs)
    return options


def load_lowering(target: Target, program: str, graph: torch.fx.Graph | None = None) -> dict:
    """How a loaded artifact lowers `program` for `target` (Artifact.module / .decoder),
    and so how the compile-time check lowers it: a forward program autotuned on a GPU,
    with Inductor's own CUDA graphs; a decoder's prefill and decode programs neither,
    because the decode loop captures the whole decode step itself. On the CPU, tuning
    C++ templates costs minutes for nothing.

    A program whose layers each have their own token count (merge_tokens) is not tuned:
    tuning is per shape, so it would cost about one dense model's tuning per layer
    (benchmarks/NOTES.md, ViT-B/16 at batch 64); Inductor's heuristics and cuBLAS
    lower it instead."""
    on_gpu = target.device == "cuda"
    tuned = not (graph is not None and per_layer_shapes(graph))
    # The decode program is all one-row GEMVs, which coordinate descent tunes as
    # reductions; max-autotune on top made llama-1b's step slower on the H200
    # (benchmarks/NOTES.md). The decoder lowers its prefill program with the same
    # options (one lowering per decoder), so only forward programs autotune.
    forward = program not in DECODER_PROGRAMS
    record = {"autotune": on_gpu and tuned and forward, "cudagraphs": on_gpu and forward}
    if not forward:
        record["decoder"] = True
    if not tuned:
        record["shape_tuning"] = False
    return record


# The programs of a decoder LM (runtime/decode.StaticCacheDecoder); others are forward programs.
DECODER_PROGRAMS = ("prefill", "decode")


def per_layer_shapes(graph: torch.fx.Graph) -> bool:
    """Whether the program merges tokens, so that its layers' activations differ in shape."""
    return any(n.op == "call_function" and str(n.target).startswith(TOKEN_MERGE_OP) for n in graph.nodes)


# The op that shortens the token dimension (compiler/codegen/token_ops.py).
TOKEN_MERGE_OP = "optc.token_merge"


def lowering_record(target: Target, *, autotune: bool = False, cudagraphs: bool = False,
                    shape_tuning: bool = True, kernel_cache: bool = False, decoder: bool = False) -> dict:
    """A lowering as the manifest records it: the switches and the exact options."""
    record = {"target": target.name, "autotune": autotune, "cudagraphs": cudagraphs, "frontend": frontend(cudagraphs),
              "inductor_options": inductor_options(target, autotune=autotune, cudagraphs=cudagraphs,
                                                   shape_tuning=shape_tuning, kernel_cache=kernel_cache,
                                                   decoder=decoder),
              **{field: getattr(target, field) for field in LOWERING_FIELDS}}
    # What this program's lowering does: a decoder's programs never merge GEMMs, whatever the
    # target says (target_graph), so their record, and a kernel cache's check, says so.
    record["merge_gemms"] = target.merge_gemms and not decoder
    if kernel_cache:
        record["kernel_cache"] = True
    if not shape_tuning:
        record["shape_tuning"] = False
    return record


def verify(ep: ExportedProgram, compiled, reference: torch.nn.Module, inputs: tuple[tuple, dict], *, trials: int = 2,
           start_state=None) -> dict:
    """Compare `compiled` with the uncompiled `reference` on fresh random inputs (for a
    thresholded program: at both ends of its thresholds, see below). `start_state`: a
    function of a seed giving the decoder state each run starts from (prefilled_state);
    None: a zeroed state."""
    thresholds = threshold_buffers(reference)
    if thresholds:
        result = _compare_thresholded(reference, compiled, inputs, vocab_size(ep), thresholds, trials, start_state)
    else:
        result = compare(reference, compiled, inputs, vocab_size(ep), trials=trials, start_state=start_state)
    if not result["ok"]:
        noise = result.get("rounding_noise_rel_err")
        raise CompileError(
            f"lowering changed the function: relative error {result['max_rel_err']:.3g} > "
            f"{result['tolerance']:.3g} on fresh random inputs"
            + (f" (the tolerance is the larger of the {result['tolerance_floor']:g} floor for its dtype and "
               f"the program's own rounding noise, {noise:.3g})" if noise is not None else "")
            + (" (every threshold at one end of its range: no rounding-level decision flips)" if thresholds else "")
        )
    return result


def threshold_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """The activation-threshold buffers of a program (sparsify_activations' naming)."""
    names = set(threshold_buffer_names(module))
    return [buf for name, buf in module.named_buffers() if name in names]


def threshold_buffer_names(module: torch.nn.Module) -> list[str]:
    return [name for name, _ in module.named_buffers() if name.rsplit(".", 1)[-1].startswith(THRESHOLD_BUFFER_PREFIX)]


def _compare_thresholded(reference, candidate, inputs, vocab, thresholds, trials, start_state=None) -> dict:
    """A thresholded program is discontinuous: a value within rounding of its threshold
    is kept by one program and dropped by the other, and in bf16 the difference cascades
    through the layers (a correct lowering of Llama-1B with TEAL differed by 0.14-0.70
    relative error on the H100). So the lowering is checked where the thresholds decide
    nothing close: every threshold below zero (every channel kept) and at +inf (every
    channel dropped). Both programs run every op the lowering emitted, the kernels' skip
    paths included, and must agree to the dtype's tolerance; the thresholds are restored
    after (the buffers may share storage with the exported program). The error at the
    calibrated thresholds is reported, not judged."""
    saved = [t.detach().clone() for t in thresholds]
    regimes, noise_fn = {}, noise_of(reference)  # its weights and twin are the same in both regimes
    try:
        for regime, value in (("all_kept", -1.0), ("all_dropped", float("inf"))):
            with torch.no_grad():
                for t in thresholds:
                    t.fill_(value)
            regimes[regime] = compare(reference, candidate, inputs, vocab, trials=trials, noise_fn=noise_fn,
                                      start_state=start_state)
    finally:
        with torch.no_grad():
            for t, s in zip(thresholds, saved):
                t.copy_(s)
    calibrated = compare(reference, candidate, inputs, vocab, trials=1, judged=False, start_state=start_state)
    # Each regime is judged by its own tolerance (a half-precision one scales with that
    # regime's rounding noise); the headline numbers are the regime closest to failing.
    closest = max(regimes.values(), key=lambda r: r["max_rel_err"] / r["tolerance"])
    return {**closest, "trials": trials, "ok": all(r["ok"] for r in regimes.values()),
            "regimes": {k: v["max_rel_err"] for k, v in regimes.items()},
            "regime_tolerances": {k: v["tolerance"] for k, v in regimes.items()},
            "at_calibrated_thresholds_rel_err": calibrated["max_rel_err"]}


def compare(reference, candidate, inputs: tuple[tuple, dict], vocab: int | None, *, trials: int = 2,
            judged: bool = True, noise_fn=None, start_state=None) -> dict:
    """Worst ||candidate - reference|| / ||reference|| over fresh random inputs shaped
    like `inputs`, and whether it is within the tolerance of the output dtype (for a
    bf16/fp16 output: or within the reference's own rounding noise, if larger). With
    `judged=False` only the error is wanted: the noise (a forward more per trial) is
    not measured. `noise_fn`: noise_of(reference), shared by calls on one reference.
    `start_state`: see verify; the candidate shares the reference's state buffers."""
    worst, noise = 0.0, 0.0
    dtype = torch.float32
    noise_fn = noise_fn or noise_of(reference)
    for trial in range(trials):
        args, kwargs = random_like_inputs(inputs, vocab, seed=1234 + trial)
        state = start_state(4321 + trial) if start_state is not None else None
        try:
            with torch.no_grad():
                reset_state(reference, state)
                ref = reference(*args, **kwargs)
                reset_state(reference, state)
                out = candidate(*args, **kwargs)
                dtype = ref.dtype
                if judged and dtype in _HALF:
                    noise = max(noise, noise_fn(ref, args, kwargs, state))
        finally:  # the program's cache (shared with what is saved) is left as it was found: zeroed
            reset_state(reference)
        worst = max(worst, rel_err(out, ref))
    floor = TOLERANCE.get(dtype, 1e-2)
    tol = max(floor, min(noise, NOISE_TOLERANCE_CAP))
    result = {"max_rel_err": worst, "tolerance": tol, "trials": trials, "ok": worst <= tol,
              "start_state": "zeroed" if start_state is None else "prefilled"}
    if dtype in _HALF:
        result.update(rounding_noise_rel_err=noise, tolerance_floor=floor)
    return result


def noise_of(reference):
    """rounding_noise of `reference` as a function of (its output, args, kwargs). The
    weights to move and the noisy twin are found on the first call (a half-precision
    output) and kept for the next ones."""
    found = {}

    def noise(ref_out, args, kwargs, state: dict | None = None) -> float:
        if not found:
            found.update(weights=flippable_weights(reference), twin=noisy_twin(reference))
        return rounding_noise(reference, found["weights"], ref_out, args, kwargs, found["twin"], state)

    return noise


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32; a NaN anywhere gives inf (it never passes a tolerance)."""
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    return float("inf") if err != err else err  # NaN never passes


def flippable_weights(reference) -> list[torch.Tensor]:
    """The bf16/fp16 parameters and buffers rounding_noise may move by one ulp. Left
    alone: threshold buffers and any tensor holding an inf or NaN (a flipped inf is a
    NaN: a mask filled with -inf), and state buffers (the KV cache: reset_state sets
    it before each run)."""
    return [t for name, t in _named_tensors(reference)
            if t.dtype in _HALF and t.numel() > 0 and not is_state_buffer(name)
            and not name.rsplit(".", 1)[-1].startswith(THRESHOLD_BUFFER_PREFIX)
            and bool(torch.isfinite(t).all())]


def rounding_noise(reference: torch.nn.Module, weights: list[torch.Tensor], ref_out: torch.Tensor,
                   args, kwargs, twin: torch.nn.Module | None = None, state: dict | None = None) -> float:
    """How far the reference's output moves when every half-precision value it holds or
    computes moves by one unit in the last place: the lowest mantissa bit of each of
    `weights` (flippable_weights) is flipped in place (XOR, so flipping again restores it
    bit for bit) and `twin` (noisy_twin: the reference with each op's rounded result
    moved too; the reference itself if None) runs. A correct lowering only rounds
    differently (fused kernels keep fp32 intermediates, reductions reorder); its
    difference from the reference stays of this order however deep the program, while a
    wrong lowering lands far above it. Weights alone are not enough: an input whose
    output hinges on one activation's rounding (a token driving an outlier channel)
    barely moves when the weights move, yet any other rounding of that activation moves
    it as far as a lowering does."""
    if not weights and twin is None:
        return 0.0
    try:
        with moved_by_one_ulp(weights):
            reset_state(reference, state)  # the state the reference's run started from
            flipped = (reference if twin is None else twin)(*args, **kwargs)
    finally:
        reset_state(reference)
    return rel_err(flipped, ref_out)


@contextlib.contextmanager
def moved_by_one_ulp(weights: list[torch.Tensor]):
    """Within: the lowest mantissa bit of each half-precision tensor of `weights` flipped in
    place (XOR, so the flip on leaving restores it bit for bit, whatever happened inside)."""
    try:
        for t in weights:
            t.view(torch.int16).bitwise_xor_(1)
        yield
    finally:
        for t in weights:
            t.view(torch.int16).bitwise_xor_(1)


def _named_tensors(module):
    if not isinstance(module, torch.nn.Module):
        return
    seen = set()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        key = view_key(t)
        if key is None or key not in seen:  # a weight held twice must be flipped once, not flipped back
            seen.add(key)
            yield name, t.data


def lower_and_verify(ep: ExportedProgram, inputs: tuple[tuple, dict], target: Target, program: str, *,
                     kernel_cache: bool = False, start_state=None) -> dict:
    """Lower `program` as a load lowers it (load_lowering), so the kernels checked are
    the ones that run, and verify it against the uncompiled program (from `start_state`,
    see verify)."""
    gm = graph_module(ep)
    compiled = lower(gm, target, **load_lowering(target, program, gm.graph), kernel_cache=kernel_cache)
    return verify(ep, compiled, gm, inputs, start_state=start_state)
