#!/usr/bin/env python
"""Which AOTInductor load settings crash on CUDA: a small model with a buffer, packaged
with and without its constants in the .so, loaded with device_index -1 and 0, each in
its own process (a segfault ends only that one). Prints one line per case.

    python benchmarks/experiments/aoti_cuda_probe.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

CASE = r'''
import sys, torch
in_so, index, user_managed = sys.argv[1] == "1", int(sys.argv[2]), sys.argv[3] == "1"

class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64, dtype=torch.bfloat16)
        self.register_buffer("cache", torch.zeros(4, 64, dtype=torch.bfloat16))
    def forward(self, x, pos):
        self.cache.index_copy_(0, pos, x)
        return self.lin(self.cache).sum(0, keepdim=True)

m = M().cuda()
x, pos = torch.randn(1, 64, dtype=torch.bfloat16, device="cuda"), torch.tensor([1], device="cuda")
ep = torch.export.export(m, (x, pos), strict=False)
path = torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[4],
          inductor_configs={"aot_inductor.package_constants_in_so": in_so})
print("compiled", flush=True)
runner = torch._inductor.aoti_load_package(path, device_index=index)
print("loaded", flush=True)
if not in_so:
    sd = {k: v for k, v in {**dict(m.named_parameters()), **dict(m.named_buffers())}.items()}
    fqns = runner.get_constant_fqns()
    runner.load_constants({f: sd[f] for f in fqns}, check_full_update=True, user_managed=user_managed)
    print("constants", fqns, flush=True)
out = runner(x, pos)
ref = m(x, pos)
print("ran", float((out.float() - ref.float()).abs().max()), flush=True)
'''


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "case.py")
        with open(script, "w") as fh:
            fh.write(CASE)
        for in_so, index, user in ((1, -1, 0), (1, 0, 0), (0, -1, 1), (0, 0, 1), (0, 0, 0)):
            proc = subprocess.run([sys.executable, script, str(in_so), str(index), str(user),
                                   os.path.join(tmp, f"p{in_so}{index}{user}.pt2")],
                                  capture_output=True, text=True, timeout=240)
            steps = [l for l in proc.stdout.splitlines() if l]
            err = [l for l in proc.stderr.splitlines() if "Error" in l or "error" in l][-2:]
            print(f"constants_in_so={in_so} device_index={index} user_managed={user}: exit {proc.returncode}, "
                  f"reached {steps}, {err}", flush=True)


if __name__ == "__main__":
    main()
