"""A Triton kernel compiled for sm_90 on this CPU inside triton_kernels.recording(), packed,
installed into an empty Triton cache and compiled again from there: prints what happened
as JSON. Run as a script in a process without TRITON_INTERPRET (test_triton_kernels.py
does): the interpreter patches triton.language and real compilation fails under it."""

from __future__ import annotations

import json
import os
import sys
import tempfile

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from optc.compiler.codegen import triton_kernels  # noqa: E402


@triton.jit
def double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)


def compile_double(block: int):
    src = triton.compiler.ASTSource(fn=double, signature={"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32",
                                                          "BLOCK": "constexpr"}, constexprs={"BLOCK": block})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32))


def main() -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as compile_cache, tempfile.TemporaryDirectory() as fresh_cache:
        knobs.cache.dir = compile_cache
        compile_double(128)  # before the recording: not shipped
        with triton_kernels.recording() as groups:
            compiled = compile_double(1024)
            compile_double(1024)  # a cache hit is recorded too, once
        out["listener_restored"] = knobs.compilation.listener is None
        data, out["packed"] = triton_kernels.pack(groups)
        out["shipped_files"] = sorted({name.rpartition(".")[2] for g in groups.values() for name in g})

        knobs.cache.dir = fresh_cache
        out["written"] = triton_kernels.install(data)
        out["written_again"] = triton_kernels.install(data)
        hits = []
        knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
        again = compile_double(1024)
        out["hit_in_fresh_cache"] = hits == [True]
        out["same_binary"] = again.asm["cubin"] == compiled.asm["cubin"]
        hits.clear()
        compile_double(128)  # never shipped: compiled here
        out["unshipped_compiled"] = hits == [False]
    return out


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
