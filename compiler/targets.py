"""Target profiles: the device a compile is for, its ceilings, and its Inductor settings.

Ceilings marked `measured` were measured on the lent machines (2026-11-23): a large
device-to-device copy counting bytes read plus written, and a large bf16 GEMM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import torch

from optc.errors import UsageError


@dataclass(frozen=True)
class Target:
    name: str
    device: str  # "cpu" | "cuda"
    dtype: torch.dtype  # the dtype shape-only models run in
    copy_tbs: float | None = None  # measured copy bandwidth, TB/s
    bf16_tflops: float | None = None  # measured dense bf16 GEMM rate
    gpu_names: tuple = ()  # substrings of torch.cuda.get_device_name()
    inductor: dict = field(default_factory=dict)  # torch.compile options for optc's lowering
    # Channel counts that structured pruning keeps are multiples of this: GPU GEMM tiles
    # (tensor cores) run partial tiles at the cost of a full one; a CPU has no such step.
    align: int = 1
    # Decode GEMVs read their input from a buffer instead of recomputing it per row
    # block (codegen/gemv_inputs): where Inductor lowers one-row matmuls as reductions.
    realize_gemv_inputs: bool = False
    # Decode-step attention (a few query rows over the KV cache) runs optc's one-launch
    # Triton kernel instead of Inductor's SDPA (codegen/decode_sdpa): on where measured
    # faster (benchmarks/NOTES.md, "Decode attention on the H200").
    decode_attention: bool = False
    # Decode GEMVs whose input is in memory anyway run optc's GEMV with a tile stored per
    # target and shape instead of Inductor's per-process tuned reduction (codegen/decode_gemv).
    decode_gemv: bool = False
    # A decode step's RMSNorm, q/k/v projections and rotary run as one optc kernel instead
    # of Inductor's several (codegen/decode_qkv).
    decode_qkv: bool = False
    # decode_qkv's kernel also writes the new k and v into the KV cache, one launch less a
    # layer than Inductor's write after it; implies decode_qkv (codegen/decode_qkv).
    decode_qkv_cache: bool = False
    # A forward program's dense linears that read one input (q/k/v) run as one GEMM
    # (codegen/merge_gemms): on where measured faster than apart.
    merge_gemms: bool = False
    # Masked encoder self-attention (a padding mask, merge_tokens' size bias) runs optc's
    # flash kernel that reads the mask in tiles instead of SDPA's masked path
    # (codegen/encoder_sdpa): on where measured faster.
    encoder_attention: bool = False
    # The same kernel for encoder self-attention without a mask too (ViT's, once its
    # constant mask is dropped), instead of SDPA's flash kernel: at batch 1 cuDNN's flash
    # call came with a memset and an idle gap before it. Off: on the H100 the kernel won at
    # batch 1 and lost to cuDNN at ViT-B/16's 197 tokens and batch 64 (benchmarks/NOTES.md).
    encoder_attention_unmasked: bool = False
    # A convolution that tiles its input (a ViT's patch embedding) runs as one GEMM over the
    # image cut into patches instead of a convolution kernel (codegen/patch_gemm).
    patch_gemm: bool = False
    # An MLP's first linear and its GELU run as one optc kernel that applies the GELU before
    # its store, instead of cuBLAS's GEMM and Inductor's pointwise GELU after it
    # (codegen/linear_gelu). Off: on the H100 the kernel's GEMM ran at half cuBLAS's speed,
    # and ViT-B/16's forward at batch 64 was slower with it (benchmarks/NOTES.md).
    linear_gelu: bool = False
    # SDPA masks computed from constants that keep every score are dropped, so SDPA may
    # pick a fused kernel (codegen/constant_masks): the same function on every target.
    drop_constant_masks: bool = True
    # What optc's sparse kernels cost per byte they read beyond the dense rate, as a share of
    # it: the cost model's prior for its sparse term (search/cost_model.py), before measured
    # trials fit one. On the H100 and H200 they streamed their active rows at about half the
    # dense reductions' rate (benchmarks/NOTES.md, "The lossy passes on the H100's faster dense
    # step"); 0 (the dense rate) where not measured.
    sparse_read_cost: float = 0.0
    # Inductor options a decoder LM's programs (prefill and decode) add to `inductor`
    # (which wins where both set one): measured on a decode step, not on encoders.
    decoder_inductor: dict = field(default_factory=dict)


TARGETS = {
    # The patch embedding as a GEMM: 2.2x faster than Inductor's convolution on ViT-B/16's at
    # batch 1 in fp32 on a 2-core machine (benchmarks/NOTES.md, "The patch embedding as a GEMM").
    "cpu": Target("cpu", "cpu", torch.float32, patch_gemm=True),
    # Programmatic dependent launch (triton.enable_pdl) lets a kernel's launch overlap the
    # tail of the one before: measured with decode_attention on Llama-1B's decode step, on
    # the H200 and (with combo kernels) on the H100; on encoders it is not measured (the one
    # BERT-base row never reached the lowering: benchmarks/NOTES.md).
    "h100": Target(
        "h100", "cuda", torch.bfloat16, copy_tbs=2.94, bf16_tflops=769.0, gpu_names=("H100",),
        inductor={"coordinate_descent_tuning": True, "triton.enable_pdl": True}, align=64,
        realize_gemv_inputs=True, decode_attention=True, sparse_read_cost=1.0,
        # Horizontal fusion of the step's independent small kernels (each layer's cache
        # counter write, the rotary halves): measured on Llama-1B's decode step
        # (benchmarks/NOTES.md, "Combo kernels in the decode step").
        decoder_inductor={"combo_kernels": True},
        # One q/k/v GEMM in encoders: faster than three at batch 1 in the same process
        # (BERT-base, ViT-B/16; benchmarks/NOTES.md).
        merge_gemms=True,
        # The patch embedding as a GEMM: 7.9x faster than cuDNN's convolution alone at batch 1,
        # ViT-B/16's forward 1.37x in the same process (benchmarks/NOTES.md, "The patch embedding
        # as a GEMM").
        patch_gemm=True,
        # optc's kernel for masked encoder attention: faster than SDPA's masked path on
        # BERT-base (batch 1 and 32) and merged ViT-B/16 (batch 64) in the same process
        # (benchmarks/NOTES.md, "The encoder attention kernel measured"); not yet on the H200.
        encoder_attention=True,
    ),
    "h200": Target(
        "h200", "cuda", torch.bfloat16, copy_tbs=4.3, bf16_tflops=788.0, gpu_names=("H200",),
        inductor={"coordinate_descent_tuning": True, "triton.enable_pdl": True}, align=64,
        realize_gemv_inputs=True, decode_attention=True, sparse_read_cost=1.0,
        # As on the H100: BERT-base at batch 1 ran faster with one q/k/v GEMM in the same
        # process (benchmarks/NOTES.md, "The search on a lowering that merges q/k/v").
        merge_gemms=True,
        # Measured on the H100 only: the same sm_90 convolution kernel of cuDNN is what it
        # replaces; proof_runs.sh times the H200's ViT rows with it switched off too.
        patch_gemm=True,
    ),
    "a100": Target("a100", "cuda", torch.bfloat16, gpu_names=("A100",), inductor={"coordinate_descent_tuning": True},
                   align=64, realize_gemv_inputs=True),
}


# The fields of a profile that only change how programs are lowered (not what the passes
# do): a measurement may change them for one row (`with_overrides`).
LOWERING_FIELDS = ("realize_gemv_inputs", "decode_attention", "decode_gemv", "decode_qkv", "decode_qkv_cache",
                   "merge_gemms", "drop_constant_masks", "encoder_attention", "encoder_attention_unmasked",
                   "patch_gemm", "linear_gelu")

# Rewrites that came after devices' histories were recorded: named in lowering_words only
# when on, so what was measured before them (with them off) still matches.
_NAMED_WHEN_ON = ("decode_qkv", "decode_qkv_cache", "encoder_attention", "encoder_attention_unmasked", "patch_gemm",
                  "linear_gelu")


# The targets' dicts of Inductor options, which with_overrides changes option by option.
OPTION_DICTS = ("inductor", "decoder_inductor")


def with_overrides(target: Target, words) -> Target:
    """`target` with lowering settings changed, for measuring one variant: `FIELD=true|false`
    for a field of LOWERING_FIELDS, `inductor.OPTION=VALUE` for one of the Inductor options
    of its lowering (`decoder_inductor.OPTION=VALUE`: of its decoder programs' only; VALUE
    read as JSON: true, 4, "name"; a bare word is a string). Anything else is a usage error
    naming what is known."""
    fields = {}
    options = {name: dict(getattr(target, name)) for name in OPTION_DICTS}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"target setting {word!r}: expected FIELD=VALUE")
        name, dot, option = key.partition(".")
        if name in OPTION_DICTS and dot and option:
            try:
                options[name][option] = json.loads(value)
            except json.JSONDecodeError:
                options[name][option] = value
        elif key in LOWERING_FIELDS:
            if value.lower() not in ("true", "false"):
                raise UsageError(f"target.{key}={value}: expected true or false")
            fields[key] = value.lower() == "true"
        else:
            raise UsageError(f"target.{key}: not a lowering setting of a target; known: "
                             f"{', '.join(LOWERING_FIELDS)}, inductor.OPTION, decoder_inductor.OPTION")
    return replace(target, **options, **fields)


def changes_nothing(target: Target, words) -> bool:
    """Whether lowering `words` (with_overrides') only repeat `target`'s own settings."""
    return with_overrides(target, words) == target


def split_words(words) -> tuple[list[str], list[str]]:
    """(the pass settings, the lowering words) of a variant's words: `target.FIELD=VALUE`
    words are lowering words (without their `target.` prefix, as with_overrides takes
    them), the others PASS.KEY=VALUE settings."""
    prefix = "target."
    return [w for w in words if not w.startswith(prefix)], [w[len(prefix):] for w in words if w.startswith(prefix)]


def lowering_words(target: Target) -> str:
    """How `target` lowers programs, in with_overrides' words ("decode_attention=true
    inductor.triton.enable_pdl=true ..."): what a latency measured under it depends on
    beyond the device, so the device's history keeps measurements of one lowering apart
    from another's."""
    words = [f"{f}={json.dumps(getattr(target, f))}" for f in LOWERING_FIELDS
             if f not in _NAMED_WHEN_ON or getattr(target, f)]
    words += [f"{name}.{k}={json.dumps(v)}" for name in OPTION_DICTS for k, v in sorted(getattr(target, name).items())]
    return " ".join(words)


def detect() -> str:
    """The target of the device present: a known GPU, else cpu."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for target in TARGETS.values():
            if any(s in name for s in target.gpu_names):
                return target.name
    return "cpu"


def get(name: str) -> Target:
    if name in (None, "auto"):
        name = detect()
    if name not in TARGETS:
        raise UsageError(f"unknown target '{name}'; known: auto, {', '.join(TARGETS)}")
    return TARGETS[name]


def available(target: Target) -> bool:
    """Whether this machine can run code for `target`."""
    if target.device == "cpu":
        return True
    return torch.cuda.is_available() and any(s in torch.cuda.get_device_name() for s in target.gpu_names)
