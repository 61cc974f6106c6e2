"""A compile and its load assemble Triton kernels with one ptxas: in a fresh process, once
optc chose Inductor's ptxas (torch_private.use_inductors_ptxas, run before a GPU compile's
first kernel and by every lowering), the ptxas Triton resolves, and the version it keys its
kernels on, are those of the ptxas Inductor's compile workers use (TRITON_PTXAS_PATH as
torch sets it there, or Triton's own where torch ships none). Before, a compile's main
process keyed its kernels on Triton's bundled ptxas and a load on torch's, and the
artifact's Triton pack missed (benchmarks/NOTES.md, "One ptxas")."""

import json
import subprocess
import sys

import pytest

from bf16_checks import _needs_cuda  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu

CHILD = """
import json, os, subprocess
import torch, triton
from triton.backends.nvidia.compiler import get_ptxas_version
from torch._inductor.runtime import compile_tasks
from optc.compiler.codegen.aoti_probe import ptxas_version
from optc.compiler.torch_private import use_inductors_ptxas
os.environ.pop("TRITON_PTXAS_PATH", None)
use_inductors_ptxas()
chosen = triton.knobs.nvidia.ptxas.path
compile_tasks._set_triton_ptxas_path.cache_clear()
compile_tasks._set_triton_ptxas_path()  # what a compile worker does first: keeps what is set
workers = os.environ.get("TRITON_PTXAS_PATH") or chosen
print(json.dumps({"chosen": chosen, "workers": workers, "keyed": get_ptxas_version(),
                  "binary": subprocess.check_output([workers, "--version"], text=True),
                  "recorded": ptxas_version()}))
"""


def test_the_ptxas_triton_keys_kernels_on_is_the_workers():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["chosen"] == seen["workers"]
    assert seen["keyed"] == seen["binary"]
    assert seen["recorded"] and seen["recorded"] in seen["binary"]
