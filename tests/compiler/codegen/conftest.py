"""Kernel tests run on CPU under Triton's interpreter (fp32/fp16 only: it has no bf16).

TRITON_INTERPRET must be set before any @triton.jit kernel of optc is defined, i.e.
before optc.compiler.codegen.kernels is first imported; pytest loads this file before
it imports the test modules of this folder. A session that imports optc's kernels
earlier (another folder's test importing ops.py first) would get GPU-compiled
kernels: the fixture below then fails loudly instead of crashing inside Triton. GPU
runs of the same kernels belong in tests/gpu/, in a separate pytest process.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _kernels_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    from optc.compiler.codegen.kernels import cats_mlp, sparse_linear

    for kernel in (sparse_linear.sparse_linear_kernel, cats_mlp.cats_gate_up_kernel):
        if not isinstance(kernel, InterpretedFunction):
            pytest.fail(
                "optc's Triton kernels were imported before TRITON_INTERPRET=1 was set; "
                "run tests/compiler/codegen in its own pytest process"
            )


@pytest.fixture
def poison_empty(monkeypatch):
    """Every torch.empty during the test returns NaN-filled memory, so an output or
    split-K workspace element that a kernel forgets to write shows up as NaN."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    return empty


class LoadRecorder:
    """Addresses of the elements an interpreted kernel loaded (mask true only)."""

    def __init__(self):
        self.chunks = []

    def rows_read(self, t: torch.Tensor) -> torch.Tensor:
        """Bool per row of a contiguous 2-D tensor: was any element of it loaded?"""
        import numpy as np

        assert t.dim() == 2 and t.is_contiguous()
        addrs = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.uint64)
        base, row_bytes = t.data_ptr(), t.stride(0) * t.element_size()
        inside = addrs[(addrs >= base) & (addrs < base + t.shape[0] * row_bytes)]
        rows = torch.zeros(t.shape[0], dtype=torch.bool)
        rows[torch.from_numpy(((inside - base) // row_bytes).astype(np.int64))] = True
        return rows


@pytest.fixture
def record_loads(monkeypatch):
    """Records what the interpreter's masked loads actually read: the direct check that
    inactive weight rows cost no loads. Relies on the interpreter's builder (triton
    3.x: InterpreterBuilder.create_masked_load); skips if that internal moved."""
    import numpy as np
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    real = getattr(builder, "create_masked_load", None)
    if real is None:
        pytest.skip("triton interpreter has no InterpreterBuilder.create_masked_load")
    recorder = LoadRecorder()

    def create_masked_load(self, ptrs, mask, *args, **kwargs):
        m = np.broadcast_to(mask.data, ptrs.data.shape)
        recorder.chunks.append(np.asarray(ptrs.data)[m].astype(np.uint64).ravel())
        return real(self, ptrs, mask, *args, **kwargs)

    monkeypatch.setattr(builder, "create_masked_load", create_masked_load)
    return recorder


@pytest.fixture(scope="session")
def tiny_llama_art():
    """tiny-llama compiled for the CPU (unverified) and its zoo entry: the decode program
    the lowering's rewrites are tested on (codegen/gemv_inputs, codegen/decode_sdpa)."""
    import optc
    from optc.models import zoo

    entry = zoo.get("tiny-llama")
    art = optc.compile(entry.load(), entry.example_inputs(), target="cpu", entry=entry, log=lambda msg: None,
                       verify=False)
    return art, entry


@pytest.fixture
def decode_with(tiny_llama_art):
    """decode_with(rewrite) -> (tokens of a decoder whose decode program runs as
    rewrite(program), the uncompiled artifact's tokens for the same prompt)."""
    from optc.runtime.decode import StaticCacheDecoder

    def run(rewrite):
        art, entry = tiny_llama_art
        prompt = entry.example_inputs()[0][:, :8]
        art.decoder(compiled=False).reset()
        expected = art.generate(prompt, 6, compiled=False)
        prefill, decode = art.module("prefill", compiled=False), art.module("decode", compiled=False)
        dec = StaticCacheDecoder(prefill, decode, compile=lambda m: rewrite(m) if m is decode else m, device="cpu")
        return dec.generate(prompt, 6), expected

    return run
