"""A compiled model in memory: its programs, its manifest, and how to run them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.export import ExportedProgram

from optc.errors import UsageError


def _program_device(ep: ExportedProgram) -> torch.device:
    for tensor in ep.state_dict.values():
        return tensor.device
    return torch.device("cpu")


class Artifact:
    """What `optc.compile` returns and `optc.load` reads back.

    Programs are lowered through Inductor for the running device on first use
    (`compiled=False` runs the exported graph as it is, for checks).
    """

    def __init__(self, programs: dict[str, ExportedProgram], manifest: dict, extra_files: dict | None = None):
        self.programs = programs
        self.manifest = manifest
        self.extra_files = extra_files or {}
        self._modules: dict = {}

    @property
    def task(self) -> str:
        return self.manifest["model"]["task"]

    def save(self, path: str | Path) -> Path:
        from optc.runtime.artifact import write_artifact

        return write_artifact(path, self.programs, self.manifest, self.extra_files)

    def module(self, name: str, *, device: str = "cpu", compiled: bool = True):
        """The program `name` as a callable module on `device`."""
        key = (name, device, compiled)
        if key not in self._modules:
            if name not in self.programs:
                raise UsageError(f"the artifact has no program '{name}'; it has {sorted(self.programs)}")
            from optc.compiler.capture import graph_module
            from optc.compiler.codegen.lowering import lower
            from optc.compiler.targets import get

            ep = self.programs[name]
            if torch.device(device) != _program_device(ep):
                # GraphModule.to() would leave the KV-cache constants behind.
                from torch.export.passes import move_to_device_pass

                ep = move_to_device_pass(ep, device)
            gm = graph_module(ep)
            target = get("cpu" if device == "cpu" else "auto")
            on_gpu = target.device == "cuda"
            # Forward programs let Inductor capture CUDA graphs; decoder programs do not,
            # because StaticCacheDecoder captures the whole decode step itself.
            self._modules[key] = (
                lower(gm, target, autotune=on_gpu, cudagraphs=on_gpu and name == "forward") if compiled else gm
            )
        return self._modules[key]

    def __call__(self, *args, compiled: bool = True):
        """Run a forward program (encoders, ViT) on positional inputs."""
        if "forward" not in self.programs:
            raise UsageError("this artifact is a decoder LM: use .generate() or .decoder()")
        device = str(args[0].device) if args and isinstance(args[0], torch.Tensor) else "cpu"
        with torch.no_grad():
            return self.module("forward", device=device, compiled=compiled)(*args)

    def decoder(self, *, device: str = "cpu", compiled: bool = True):
        """A StaticCacheDecoder over the prefill and decode programs (one shared KV cache)."""
        if self.task != "causal-lm":
            raise UsageError("only decoder-LM artifacts have a decode loop")
        from optc.runtime.decode import StaticCacheDecoder

        from optc.compiler.codegen.lowering import lower
        from optc.compiler.targets import get

        # The decoder ties the two programs' caches first, then compiles each.
        prefill = self.module("prefill", device=device, compiled=False)
        decode = self.module("decode", device=device, compiled=False)
        target = get("cpu" if device == "cpu" else "auto")
        compile_fn = (lambda m: lower(m, target, autotune=target.device == "cuda")) if compiled else None
        meta = self.manifest["model"]
        return StaticCacheDecoder(prefill, decode, compile=compile_fn, device=device,
                                  max_cache_len=meta["max_cache_len"], batch_size=meta["batch_size"])

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, *, compiled: bool = True) -> torch.Tensor:
        return self.decoder(device=str(prompt_ids.device), compiled=compiled).generate(prompt_ids, max_new_tokens)
