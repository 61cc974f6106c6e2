"""The rule around optc.compiler.torch_private: every name it exports has a smoke test in
tests/compiler/test_torch_private.py or test_torch_private_inductor.py (test_torch_fixes.py
for the workarounds), importing it loads neither Inductor nor Dynamo, and package code
uses no private torch API anywhere else (a scan of the source)."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from optc.compiler import torch_private as tp

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("optc", "compiler", "runtime", "models")
OWNERS = (ROOT / "compiler" / "torch_private.py", ROOT / "compiler" / "torch_fixes.py")


def test_every_wrapper_has_a_smoke_test():
    tests = {n.name for f in ("test_torch_private.py", "test_torch_private_inductor.py", "test_torch_fixes.py")
             for n in ast.parse((Path(__file__).parent / f).read_text()).body
             if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    missing = [name for name in tp.__all__ if f"test_{name}" not in tests]
    assert not missing, f"torch_private names without a smoke test here: {missing}"
    # and __all__ lists everything the module defines for the package
    own = {name for name, value in vars(tp).items()
           if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))}
    assert own <= set(tp.__all__), f"not in torch_private.__all__: {sorted(own - set(tp.__all__))}"


def test_importing_it_leaves_inductor_and_dynamo_unloaded():
    code = ("import sys, optc.compiler.torch_private; "
            "bad = [k for k in ('torch._inductor', 'torch._dynamo') if k in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# A private torch API in source text: a `torch._x` name (torch._check, documented for
# export, and torch.__version__ excepted), an underscored module or name imported from
# torch (`from torch.utils import _pytree`, `from torch.fx.graph import _PyTreeCodeGen`),
# a dotted path through one (`torch.fx._pytree`; aten's `torch.ops.aten._to_copy` is an
# operator name, not Python API), and the private attributes of torch objects optc reads
# (`mod._buffers`, `graph._codegen`, `gm._in_spec`, `op._schema`, ...).
_PRIVATE_ATTRS = ("_buffers", "_non_persistent_buffers_set", "_parameters", "_modules", "_codegen",
                  "_in_spec", "_out_spec", "_schema", "_graph_module", "_PyTreeCodeGen")
PRIVATE = [
    re.compile(r"\btorch\._(?!check\b)[A-Za-z]\w*"),
    re.compile(r"\btorch\.(?!ops\.)(?:[A-Za-z]\w*\.)+_[A-Za-z]\w*"),
    re.compile(r"^\s*from\s+torch(?:\.\w+)*\s+import\s+(?:\(\s*)?(?:[\w\s,]*,\s*)?_[A-Za-z]"),
    re.compile(r"^\s*import\s+torch\._"),
    re.compile(r"(?<!\bself)\.(?:" + "|".join(_PRIVATE_ATTRS) + r")\b"),
    re.compile(r"""["'](?:""" + "|".join(_PRIVATE_ATTRS) + r""")["']"""),
]


def private_uses(text: str) -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)
            if any(p.search(line) for p in PRIVATE)]


@pytest.mark.parametrize("line", [
    "from torch._inductor.compile_fx import compile_fx",
    "import torch._inductor.config as inductor_config",
    "return torch._inductor.aoti_load_package(path)",
    "isinstance(node.target, torch._ops.OpOverload)",
    "version = torch._C._cuda_getDriverVersion()",
    "from torch.utils import _pytree as pytree",
    "from torch.fx.graph import CodeGen, _PyTreeCodeGen",
    "flat = torch.fx._pytree.tree_flatten_spec(x, spec)",
    "for k, v in mod._buffers.items():",
    "graph._codegen = gm.graph._codegen",
    "spec = self.gm._in_spec",
    "mutates = getattr(n.target, '_schema', None)",
])
def test_the_scan_catches(line):
    assert private_uses(line)


@pytest.mark.parametrize("line", [
    "torch._check(n > 0)",
    'env = {"torch": torch.__version__}',
    "aten._to_copy.default, torch.ops.aten._unsafe_view.default",
    "from torch.fx import traceback as fx_traceback",
    "from optc.compiler.torch_private import tree_flatten, tree_unflatten",
    "self._modules: dict = {}",
    "study._storage.get_trial(t._trial_id)",
])
def test_the_scan_passes(line):
    assert not private_uses(line)


def test_private_torch_apis_only_in_torch_private():
    files = [p for d in PACKAGE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert set(OWNERS) <= set(files) and len(files) > 50  # the walk sees the package
    bad = [f"{path.relative_to(ROOT)}:{i}: {line}"
           for path in files if path not in OWNERS
           for i, line in private_uses(path.read_text())]
    assert not bad, ("private torch APIs outside compiler/torch_private.py and torch_fixes.py (wrap them "
                     "there, with a smoke test in tests/compiler/test_torch_private.py):\n" + "\n".join(bad))
