"""Every Triton kernel under compiler/codegen/kernels/ is executed by a test here: each
test module of tests/gpu names the kernels it launches in KERNELS (and asserts the
launch with the `launched` fixture). Runs everywhere, GPU or not, so a new kernel
without a bf16 GPU test fails on CPU CI too."""

import ast
from pathlib import Path

HERE = Path(__file__).parent
KERNEL_DIR = HERE.parents[1] / "compiler" / "codegen" / "kernels"


def _jit_kernels() -> set[str]:
    """Names of the @triton.jit functions named *_kernel (the launched ones; helper
    jit functions such as cats_mlp._rows_dot are inlined into them)."""
    names = set()
    for path in KERNEL_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def _tested() -> set[str]:
    names = set()
    for path in HERE.glob("test_*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "KERNELS" for t in node.targets):
                names.update(ast.literal_eval(node.value))
    return names


def test_every_kernel_has_a_gpu_test():
    kernels = _jit_kernels()
    assert {"sparse_linear_kernel", "sparse_gemv_kernel", "cats_gate_up_kernel"} <= kernels  # the scan works
    assert kernels <= _tested(), f"no bf16 GPU test in tests/gpu for: {sorted(kernels - _tested())}"
    assert _tested() <= kernels, f"tests/gpu names kernels that no longer exist: {sorted(_tested() - kernels)}"
