"""Every kernel, with the tiles configs.py gives the H100, compiles for sm_90 to a cubin
here, without a GPU. The interpreter runs the kernels' Python and accepts code that the
compiler rejects (a loop-carried variable whose shape changes in the loop, for one), so
this catches what would otherwise fail only on the device. Triton here may be newer
than the GPU machine's; both must accept the kernels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("hopper_compile.py")
# sparse_linear: 3 tiles x EVEN_N x DIRECT_OUT; compacting GEMV x prefetch; CATS x 2 tiles; decode attention x 2 splits;
# dense GEMV x 3 shapes (one split); norm + q/k/v + rotary x 2 head widths x cache write;
# encoder attention x 2 head widths x 2 sequence lengths x 3 mask forms; linear + GELU x 2 tiles x 2 forms
EXPECTED = 3 * 2 * 2 + 2 + 2 + 2 + 3 + 2 * 2 + 2 * 2 * 3 + 2 * 2


@pytest.fixture(scope="module")
def results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_kernel_compiles_for_sm90(results):
    assert len(results) == EXPECTED, sorted(results)
    failed = {case: err for case, err in results.items() if err != "ok"}
    assert not failed, json.dumps(failed, indent=1)[:4000]
