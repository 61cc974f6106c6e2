"""The environment a package is compiled for, and whether AOTInductor packages load
in it, asked of a child process.

On the H200 machines optc is measured on (torch 2.11, CUDA), `aoti_load_package`
ends the process with a segmentation fault for every CUDA package, a one-linear model
included (benchmarks/experiments/aoti_cuda_probe.py, benchmarks/NOTES.md). A crash
cannot be caught, so before optc builds or loads a CUDA package it compiles and loads
a tiny one in a child process: a child that crashes or fails says packages do not work
here, and optc ships (or runs) the portable programs instead, with that reason, rather
than dying mid-compile. The answer is kept per environment (`environment`) under
aoti_probe/ in the optc cache directory (delete a file there to ask again), so the
probe's cost (a small AOTInductor compile, about 90 s on the H200) is paid once.

Run as a module it is that child: `python -m optc.compiler.codegen.aoti_probe DEVICE`
exits 0 when a package compiled here loads, runs and matches eager.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
from importlib import metadata

import torch

from optc.compiler.targets import Target
from optc.compiler.torch_private import pick_vec_isa, use_inductors_ptxas
from optc.progress import working

PROBE_TIMEOUT_S = 600


def triton_version() -> str | None:
    """The installed triton's version, from its distribution's metadata: importing triton
    is slow and initialises drivers, and only the string is needed."""
    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-windows"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def ptxas_version() -> str | None:
    """The version ("V13.0.88") of the ptxas this process's Triton kernels are assembled
    with, chosen first as Inductor chooses it (torch_private.use_inductors_ptxas): Triton
    keys its compiled kernels on it, and two ptxas make two binaries of one kernel. None
    where Triton or its CUDA backend cannot say."""
    use_inductors_ptxas()
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        found = re.search(r"V\d+(?:\.\d+)+", get_ptxas_version())
    except Exception:  # noqa: BLE001 - no CUDA backend or no ptxas: nothing to record
        return None
    return found.group(0) if found else None


def environment(target: Target) -> dict:
    """What compiled code depends on beyond the target's name: the exact torch build
    (a +cpu and a +cu128 wheel of one release differ), triton and the ptxas it
    assembles with (GPU kernels), and the instruction set the code was generated for
    (CPU vector ISA, GPU model). A package or kernel cache runs only where all of these
    are equal."""
    env = {"target": target.name, "torch": torch.__version__, "machine": platform.machine()}
    if target.device == "cuda":
        env["triton"] = triton_version()
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
            env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
            env["ptxas"] = ptxas_version()
    else:
        env["cpu_isa"] = str(pick_vec_isa()) or "none"
    return env


def load_failure(target: Target, log=lambda m: None) -> str | None:
    """None when AOTInductor packages for `target` load and run here; otherwise why not.
    Only CUDA targets are probed: CPU packages are exercised by the test suite."""
    if target.device != "cuda":
        return None
    from optc.compiler.search.device_db import cache_dir

    env = environment(target)
    digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "aoti_probe" / f"{target.name}-{digest}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())["failure"]
        except (ValueError, KeyError):
            pass  # a damaged record: probe again
    log(f"[optc] checking that AOTInductor packages load on {target.name} here (once per environment) ...")
    with working("checking AOTInductor packages"):
        failure = _probe(target.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"environment": env, "failure": failure}, indent=1))
    tmp.replace(path)
    return failure


def _probe(device: str, command: list[str] | None = None) -> str | None:
    """Run the child (or `command`, for tests); None when it exits 0, else why not."""
    command = command or [sys.executable, "-m", "optc.compiler.codegen.aoti_probe", device]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"a minimal AOTInductor package did not compile and load within {PROBE_TIMEOUT_S} s"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        try:
            how = f"killed by {signal.Signals(-proc.returncode).name}"
        except ValueError:
            how = f"killed by signal {-proc.returncode}"
    else:
        errors = [line.strip() for line in proc.stderr.splitlines() if "Error" in line or "error:" in line]
        how = f"exit {proc.returncode}" + (f": {errors[-1][:200]}" if errors else "")
    return f"a minimal AOTInductor package failed to load and run here ({how}; torch {torch.__version__})"


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.lin(x).relu()


def _child(device: str) -> int:
    from optc.compiler.torch_private import aoti_compile_and_package, aoti_load_package

    torch.manual_seed(0)
    model = _Tiny().to(device)
    x = torch.randn(2, 64, device=device)
    ep = torch.export.export(model, (x,), strict=False)
    with tempfile.TemporaryDirectory(prefix="optc-aoti-probe-") as tmp:
        path = aoti_compile_and_package(ep, package_path=os.path.join(tmp, "probe.pt2"))
        runner = aoti_load_package(path)
        with torch.no_grad():
            ok = torch.allclose(runner(x), model(x), rtol=1e-3, atol=1e-3)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
