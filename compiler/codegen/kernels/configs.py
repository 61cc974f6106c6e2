"""Launch configurations of optc's sparse kernels, per target, as plain data.

Nothing here launches anything or touches global state; the host wrappers in
``sparse_linear.py`` and ``cats_mlp.py`` look their tiles up here, and the
``sparsify_activations`` pass asks ``ops.use_sparse_kernel`` (token crossover and
minimum weight size, below) whether the sparse kernel beats dense at a given shape.

Targets are the names of ``compiler/targets.py``: ``h100``, ``h200``, ``a100`` and
``cpu`` (the Triton interpreter, ``TRITON_INTERPRET=1``, used by the tests: its tiles
are tiny so that small test shapes still cover several tiles and split-K).

Status of the numbers: the ``h100`` tiles, split-K policy, crossover and minimum
weight size were measured on an H100 80GB HBM3 (torch 2.11, triton 3.6, bf16,
2026-11-23) with ``benchmarks/kernels_sparse_linear.py --tune`` and
``benchmarks/gemv_sweep.py`` (CUDA-graph timing, cold L2, random data); the decode
profiles behind the choices are in ``benchmarks/NOTES.md``. ``h200`` and ``a100`` reuse
them and are PROVISIONAL until measured there.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "LaunchConfig",
    "GemvConfig",
    "SparseLinearTarget",
    "CatsTarget",
    "SPARSE_LINEAR",
    "CATS_GATE_UP",
    "CROSSOVER_TOKENS",
    "MIN_SPARSE_WEIGHT",
    "KNOWN_TARGETS",
    "target_for_device",
    "sparse_linear_target",
    "cats_target",
    "pick_bucket",
    "pick_tile",
    "choose_split_k",
    "choose_slice",
    "crossover_tokens",
]


@dataclass(frozen=True)
class LaunchConfig:
    """One tile shape. For sparse_linear: BLOCK_M tokens x BLOCK_K input channels x
    BLOCK_N outputs. For cats_gate_up: BLOCK_M tokens x BLOCK_N intermediate channels
    (rows of W_gate/W_up) x BLOCK_K hidden features. BLOCK_M is 1 (a GEMV on CUDA
    cores, software-pipelined by hand) or >= 16 (tl.dot on tensor cores, fewer tokens
    padded to 16; pipelined by Triton with num_stages). An outer-product path for
    2..8 tokens was measured on the H100 and dropped: its [M, K, N] accumulator
    spills registers and ran 3-25x slower than the padded tl.dot."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class SparseLinearTarget:
    num_sms: int
    # Split K until the grid has about waves * num_sms programs ...
    waves: float
    # At most this many slices: Inductor unrolls a sum over <= 8 (its
    # unroll_reductions_threshold) into the consumer of y, so the split costs no launch.
    max_split_k: int
    # ... but never let the fp32 partials (written once, read once) exceed this
    # fraction of the weight bytes, which is what the kernel is there to save.
    workspace_fraction: float
    # ... and give every slice at least this many BLOCK_K chunks (short loops pay the
    # prologue of the hand-pipelined GEMV without amortising it).
    min_chunks_per_split: int
    # (max tokens, tile) in ascending order; more tokens than the last bucket are
    # tiled over the grid's third axis with the last bucket's tile.
    buckets: tuple[tuple[int, LaunchConfig], ...]
    # One token: the compacting GEMV (None: the masked tile of buckets[0]).
    gemv: GemvConfig | None = None
    # One token on a weight of at least this many elements (K * N): this tile instead
    # of buckets[0]'s. None: buckets[0] everywhere.
    large_gemv: tuple[int, LaunchConfig] | None = None


@dataclass(frozen=True)
class GemvConfig:
    """The compacting one-token kernel (sparse_gemv.py): BLOCK_N outputs per program,
    BLOCK_K listed rows gathered per trip, and K cut into power-of-two slices of
    ``min_slice``..``max_slice`` channels so the grid has about ``waves * num_sms``
    programs (more slices: more parallelism, more fp32 partials to sum)."""

    block_n: int
    block_k: int
    num_warps: int
    min_slice: int
    max_slice: int
    # Software-pipeline the gather loop (the next trip's rows in flight while one is
    # multiplied); False: one trip at a time, list load then weight load.
    prefetch: bool = True


@dataclass(frozen=True)
class CatsTarget:
    buckets: tuple[tuple[int, LaunchConfig], ...]


_HOPPER_SPARSE_LINEAR = (
    # benchmarks/gemv_sweep.py, H100, 18 masked tiles x splits 2/4/8 at sparsity 0.5: this
    # tile won on all four Llama-1B shapes (with the split choose_split_k gives).
    (1, LaunchConfig(block_m=1, block_n=32, block_k=128, num_warps=8, num_stages=1)),
    (16, LaunchConfig(block_m=16, block_n=128, block_k=32, num_warps=4, num_stages=3)),
)
# The compacting GEMV is not used on Hopper: in the same sweep its best tile per shape was
# 3-14% slower than the masked tile above at sparsity 0.5 (the list round trip through
# L1 and the barrier cost more than the full loads gain at these sizes). On Llama-3.1-8B's
# shapes it is within a few percent of the masked tile at 0.5 and 16-22% faster at 0.7
# (gemv_llama8b_compacting_h100.json), with or without its gather loop pipelined. It stays
# selectable (sparse_linear(..., gemv=GemvConfig(...))) for measuring other targets.
_HOPPER_GEMV = None
# benchmarks/gemv_sweep.py --rank-by-kernel, H100, s=0.5, Llama-3.1-8B shapes
# (gemv_llama8b_shapes_h100.json): 64 x 64 with 8 warps was best or within 5% of the best on
# 4096->14336, 14336->4096 and 4096->28672 (27.8 / 26.2 / 52.9 us, 72-79% of copy bandwidth on
# the bytes read), where the 32 x 128 tile took 29.8 / 27.0 / 57.7; on Llama-1B's 2048 x 8192
# weights the 32 x 128 tile stays ahead (10.0 vs 10.3-12.1 us). 32M elements lies between.
_HOPPER_LARGE_GEMV = (32 * 2**20, LaunchConfig(block_m=1, block_n=64, block_k=64, num_warps=8, num_stages=1))
_HOPPER_CATS = (
    (1, LaunchConfig(block_m=1, block_n=8, block_k=256, num_warps=4, num_stages=1)),
    (16, LaunchConfig(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=4)),
)

SPARSE_LINEAR: dict[str, SparseLinearTarget] = {
    "h100": SparseLinearTarget(
        num_sms=132, waves=4.0, max_split_k=8, workspace_fraction=0.125, min_chunks_per_split=2,
        buckets=_HOPPER_SPARSE_LINEAR, gemv=_HOPPER_GEMV, large_gemv=_HOPPER_LARGE_GEMV,
    ),
    # PROVISIONAL: H100 tiles (same SMs and core, faster HBM); not measured on H200.
    "h200": SparseLinearTarget(
        num_sms=132, waves=4.0, max_split_k=8, workspace_fraction=0.125, min_chunks_per_split=2,
        buckets=_HOPPER_SPARSE_LINEAR, gemv=_HOPPER_GEMV, large_gemv=_HOPPER_LARGE_GEMV,
    ),
    # PROVISIONAL: H100 tiles with the A100's SM count; not measured.
    "a100": SparseLinearTarget(
        num_sms=108, waves=4.0, max_split_k=8, workspace_fraction=0.125, min_chunks_per_split=2,
        buckets=_HOPPER_SPARSE_LINEAR, gemv=_HOPPER_GEMV, large_gemv=_HOPPER_LARGE_GEMV,
    ),
    # The interpreter: tiny tiles so that small test shapes span several tiles and
    # split K (num_sms is a pretend value that only drives the split-K choice).
    "cpu": SparseLinearTarget(
        num_sms=4, waves=2.0, max_split_k=4, workspace_fraction=1.0, min_chunks_per_split=1,
        buckets=(
            (1, LaunchConfig(block_m=1, block_n=16, block_k=16, num_warps=1, num_stages=1)),
            (16, LaunchConfig(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1)),
        ),
    ),
}

CATS_GATE_UP: dict[str, CatsTarget] = {
    "h100": CatsTarget(buckets=_HOPPER_CATS),
    "h200": CatsTarget(buckets=_HOPPER_CATS),  # PROVISIONAL (H100 tiles)
    "a100": CatsTarget(buckets=_HOPPER_CATS),  # PROVISIONAL (H100 tiles)
    "cpu": CatsTarget(
        buckets=(
            (1, LaunchConfig(block_m=1, block_n=16, block_k=16, num_warps=1, num_stages=1)),
            (16, LaunchConfig(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1)),
        ),
    ),
}

# Largest token count (rows of x after flattening) at which the sparse kernel is used;
# above it dense cuBLAS wins because the union of active channels over the tokens
# approaches all channels, while dense GEMM cost is flat in M at these sizes.
# h100, measured (benchmark "crossover", Llama-1B shapes, independent random tokens):
# at sparsity 0.25-0.5 the sparse kernel beats cuBLAS only at 1 token, and only on
# the large projections (2048->8192: 1.13x, 8192->2048: 1.21x at s=0.5); at s=0.7 up
# to 2-3 tokens. The small projections (2048->2048, 2048->512) lose even at 1 token
# (fixed launch and split-K costs dominate a 1-4 MB read). Real activations are
# correlated across tokens, so this is the pessimistic value. h200/a100: PROVISIONAL.
# On "cpu" the op runs the dense torch reference, which never beats plain dense: 0.
CROSSOVER_TOKENS: dict[str, int] = {"h100": 1, "h200": 1, "a100": 1, "cpu": 0}

# Smallest weight (K * N elements) worth the sparse kernel at one token. Below it the
# pass keeps a dense linear after the threshold mask, which Inductor fuses into its own
# GEMV (the mask costs no launch). h100, measured (benchmarks/gemv_sweep.py, bf16, cold
# L2): 2048x2048 and 2048x512 lose to cuBLAS at every sparsity up to 0.7 (0.75-0.79x:
# at 1-8 MB the fixed cost of a launch dominates), the 16.8M-element MLP projections
# win from sparsity ~0.5. h200/a100: PROVISIONAL (H100 value). cpu: no sparse kernel.
MIN_SPARSE_WEIGHT: dict[str, int] = {"h100": 8 * 2**20, "h200": 8 * 2**20, "a100": 8 * 2**20, "cpu": 0}

KNOWN_TARGETS = tuple(SPARSE_LINEAR)


def _check_target(target: str) -> str:
    if target not in SPARSE_LINEAR:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(KNOWN_TARGETS)}")
    return target


def target_for_device(device) -> str:
    """Map a torch device to a target name. An unrecognised CUDA GPU gets the H100
    tiles (the closest measured profile)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).upper()
    for key in ("H200", "H100", "A100"):
        if key in name:
            return key.lower()
    return "h100"


def sparse_linear_target(target: str) -> SparseLinearTarget:
    return SPARSE_LINEAR[_check_target(target)]


def cats_target(target: str) -> CatsTarget:
    return CATS_GATE_UP[_check_target(target)]


def pick_tile(tgt: SparseLinearTarget, num_tokens: int, k: int, n: int) -> LaunchConfig:
    """The target's tile for an M x K @ K x N product: ``large_gemv`` for one token on a
    large weight, else the token bucket's."""
    if num_tokens == 1 and tgt.large_gemv is not None and k * n >= tgt.large_gemv[0]:
        return tgt.large_gemv[1]
    return pick_bucket(tgt.buckets, num_tokens)


def pick_bucket(buckets: tuple[tuple[int, LaunchConfig], ...], num_tokens: int) -> LaunchConfig:
    """The tile of the smallest bucket holding num_tokens (the last one otherwise)."""
    for max_tokens, cfg in buckets:
        if num_tokens <= max_tokens:
            return cfg
    return buckets[-1][1]


def _slices_wanted(tgt: SparseLinearTarget, n_tiles: int, m: int, k: int, elem_size: int) -> int:
    """Slices of K for about ``waves * num_sms`` programs, at most ``max_split_k``, and
    few enough that the fp32 partials (slices * M * N * 4 bytes, written and read back)
    stay under ``workspace_fraction`` of the weight bytes."""
    split = max(1, round(tgt.waves * tgt.num_sms / n_tiles))
    # partial traffic: split*m*n*4*2 bytes <= fraction * k*n*elem_size
    ws_cap = int(tgt.workspace_fraction * k * elem_size / (8 * max(m, 1)))
    return max(1, min(split, tgt.max_split_k, ws_cap))


def choose_split_k(
    tgt: SparseLinearTarget, cfg: LaunchConfig, m: int, n: int, k: int, elem_size: int
) -> int:
    """How many slices of K run as separate programs (their partials summed by torch
    ops): ``_slices_wanted``, with at least ``min_chunks_per_split`` BLOCK_K chunks each."""
    n_tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m)
    k_chunks = max(1, -(-k // cfg.block_k))
    return max(1, min(_slices_wanted(tgt, n_tiles, m, k, elem_size), k_chunks // tgt.min_chunks_per_split))


def choose_slice(tgt: SparseLinearTarget, cfg: GemvConfig, n: int, k: int, elem_size: int = 2) -> int:
    """Channels per program of the compacting GEMV: a power of two giving
    ``_slices_wanted`` slices, within the config's bounds."""
    want = _slices_wanted(tgt, -(-n // cfg.block_n), 1, k, elem_size)
    slice_ = 1 << max(0, (-(-k // want) - 1).bit_length())
    return max(cfg.min_slice, min(cfg.max_slice, slice_))


def crossover_tokens(target: str) -> int:
    return CROSSOVER_TOKENS[_check_target(target)]
