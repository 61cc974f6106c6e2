"""A compiled model in memory: its programs, its manifest, and how to run them."""

from __future__ import annotations

import warnings
import weakref
from pathlib import Path

import torch
from torch.export import ExportedProgram

from optc.errors import UsageError


def _held_elsewhere(ep: ExportedProgram, device) -> bool:
    """Whether any of the program's tensors is not on `device` ("cuda" and "cuda:0"
    count as different: moving then costs a no-op pass, never a missed move)."""
    device = torch.device(device)
    tensors = [*ep.state_dict.values(), *ep.constants.values()]
    return any(isinstance(t, torch.Tensor) and t.device != device for t in tensors)


def indexed(device) -> str:
    """`device` with its index ("cuda" -> "cuda:0", the current device): the programs'
    device arguments are rewritten to this (move_to_device_pass), and Dynamo refuses a
    graph that asserts "cuda" of a tensor on "cuda:0"."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def _move_shared(ep: ExportedProgram, device: torch.device) -> None:
    """Move the program's state and constants to `device`, one copy per tensor view: a
    KV cache is held as a buffer and as a lifted constant over one storage, which the
    program writes through one name and the decoder ties through the other, so the two
    must stay one tensor (move_to_device_pass alone copies each entry on its own; it
    then finds them on the device and leaves them)."""
    from optc.compiler.rewrite import view_key

    moved: dict = {}

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            return t
        key = (view_key(t), isinstance(t, torch.nn.Parameter))
        if key[0] is None or key not in moved:
            out = t.to(device)
            moved[key] = torch.nn.Parameter(out, requires_grad=t.requires_grad) if key[1] else out
        return moved[key]

    for table in (ep.state_dict, ep.constants):
        for name, t in list(table.items()):
            if isinstance(t, torch.Tensor):
                table[name] = move(t)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or a.stride() != b.stride():
        return False
    return a.data_ptr() == b.data_ptr() or bool(torch.equal(a, b))


class Artifact:
    """What `optc.compile` returns and `optc.load` reads back.

    A program runs as its AOTInductor package when the artifact carries one that fits
    this target and environment (runtime/packages.py; `packages=False` never uses them);
    otherwise it is lowered through Inductor on first use, for the target the manifest
    names (target_for) with the options load_lowering gives (`compiled=False` runs the
    exported graph as it is, for checks), from the artifact's kernel cache where it fits
    (codegen/kernel_cache.py; `kernel_cache=False` never uses it).
    """

    def __init__(self, programs: dict[str, ExportedProgram], manifest: dict, extra_files: dict | None = None,
                 *, packages: bool = True, kernel_cache: bool = True):
        self.programs = programs
        self.manifest = manifest
        self.extra_files = extra_files or {}
        self.use_packages = packages
        self.use_kernel_cache = kernel_cache
        self.kernel_cache_status: dict | None = None  # set on the first lowering (see _kernel_cache)
        self._modules: dict = {}
        self._placed: dict = {}  # device -> weights already placed there (see _place_weights)
        self._moved: dict = {}  # device -> {id(tensor as read): (weak ref to it, its copy there)}
        self._decoders: dict = {}  # (device, compiled) -> StaticCacheDecoder (see decoder)
        self._warned: set = set()  # target mismatches already warned about

    @property
    def task(self) -> str:
        return self.manifest["model"]["task"]

    def save(self, path: str | Path) -> Path:
        from optc.runtime.artifact import write_artifact

        return write_artifact(path, self.programs, self.manifest, self.extra_files)

    def module(self, name: str, *, device: str = "cpu", compiled: bool = True, autotune: bool | None = None,
               target=None):
        """The program `name` as a callable module on `device`. `autotune=False` lowers it
        without max-autotune (a quicker benchmark of a program that is not what ships).
        `target`: a Target to lower with instead of the manifest's (a bench row's
        `target.FIELD=VALUE` words); the packages and the kernel cache hold the
        manifest target's lowering, so they serve only a target equal to it."""
        device = indexed(device)
        # The manifest's own target is no override: one module for both ways of asking.
        override = None if target is None or target == self.target_for(device) else target
        key = (name, device, compiled, autotune, repr(override))  # a Target holds dicts: not hashable
        if key not in self._modules:
            if name not in self.programs:
                raise UsageError(f"the artifact has no program '{name}'; it has {sorted(self.programs)}")
            from optc.compiler.capture import graph_module
            from optc.compiler.codegen.lowering import load_lowering, lower
            from optc.compiler.rewrite import unify_aliases

            ep = self.programs[name]
            elsewhere = _held_elsewhere(ep, device)
            ep = self._place_weights(ep, device)
            if elsewhere:
                # The rest (KV caches, lifted constants, device arguments in the graph);
                # GraphModule.to() would leave the KV-cache constants behind.
                from torch.export.passes import move_to_device_pass

                _move_shared(ep, torch.device(device))
                # A device object, not a string: the pass writes it into every device
                # argument, and the graph must read as at compile time (the kernel cache
                # is keyed by its code), where those are device objects.
                ep = move_to_device_pass(ep, torch.device(device))
            gm = graph_module(ep)
            # Read from a file, a KV cache is two objects over one storage; as one object
            # the program lowers to the graph the compile checked (the kernel cache's keys).
            unify_aliases(gm)
            if compiled:
                target = override or self.target_for(device)
                options = load_lowering(target, name, gm.graph)
                if autotune is not None:
                    options["autotune"] = autotune
                shipped = autotune is not False and override is None
                packaged = self._packaged(name, target, gm, device) if shipped else None
                # The kernel cache holds the load lowering's kernels; another lowering would miss it.
                cached = autotune is None and override is None and self._kernel_cache(target, device)
                gm = packaged or lower(gm, target, **options, kernel_cache=cached)
            self._modules[key] = gm
        return self._modules[key]

    def _packaged(self, name: str, target, gm, device):
        """The program's AOTInductor package over `gm`'s weights and state, or None."""
        if not self.use_packages:
            return None
        from optc.runtime.packages import packaged_module

        return packaged_module(self.manifest, self.extra_files, name, target, gm, device, self._warned)

    def _kernel_cache(self, target, device) -> bool:
        """Install the artifact's kernel cache into this process's Inductor caches (once)
        when it was built for `target` in this environment; whether lowerings read it.
        Where it does not fit, warns once why and the programs are compiled here."""
        if self.kernel_cache_status is None:
            from optc.compiler.codegen import kernel_cache

            data, reason = (kernel_cache.usable(self.manifest, self.extra_files, target) if self.use_kernel_cache
                            else (None, None))
            self.kernel_cache_status = {"used": data is not None, "reason": reason}
            if data is not None:
                installed = kernel_cache.install(data)
                installed.update(kernel_cache.install_triton_kernels(self.manifest, self.extra_files,
                                                                     torch.device(device).index or 0))
                self.kernel_cache_status.update(installed=installed,
                                                counts_before=kernel_cache.hit_counts())
            elif reason is not None:
                warnings.warn(f"{reason}; Inductor compiles and tunes the portable programs here (slower to load, "
                              "and not the kernels the compile verified)", stacklevel=4)
        return self.kernel_cache_status["used"]

    def kernel_cache_hits(self) -> dict | None:
        """FX graph cache hits and misses since the kernel cache was installed (None: it
        was not): every lowering of a load should hit."""
        status = self.kernel_cache_status or {}
        if not status.get("used"):
            return None
        from optc.compiler.codegen import kernel_cache

        now, before = kernel_cache.hit_counts(), status["counts_before"]
        return {k: now[k] - before[k] for k in now}

    def target_for(self, device):
        """The target whose Inductor options lower the programs on `device`: the one the
        manifest names when it is a device of that kind (not what this machine would
        detect), else the device's own, with a warning that says so."""
        from optc.compiler import targets

        kind = torch.device(device).type
        name = self.manifest.get("target")
        recorded = targets.TARGETS.get(name)
        if recorded is not None and recorded.device == kind:
            if kind == "cuda" and not targets.available(recorded) and name not in self._warned:
                self._warned.add(name)
                warnings.warn(f"this artifact was compiled for {name}; this GPU is not one, so its programs are "
                              f"lowered with {name}'s options but were never checked here", stacklevel=3)
            return recorded
        here = targets.get("cpu" if kind == "cpu" else "auto")
        if name is not None and (name, kind) not in self._warned:  # None: a manifest that names none
            self._warned.add((name, kind))
            warnings.warn(f"this artifact was compiled for {name}; on {device} its programs are lowered for "
                          f"{here.name} instead, a lowering the compile did not check", stacklevel=3)
        return here

    def _place_weights(self, ep: ExportedProgram, device) -> ExportedProgram:
        """Put the program's weights on `device`, taking each one that a program placed
        before holds under the same name with the same values from that program. The
        prefill and decode programs share most weights: read from disk they hold one tensor
        (runtime/shared_weights.py) or, from an artifact of format 1, a copy per program,
        and placing each program's own would put an 8B model on the GPU twice. Only
        parameters and buffers are shared (their names are the model's, the same in every
        program); lifted constants (numbered per program) and the state the programs
        mutate (KV caches) are left to move_to_device_pass and the decoder, which ties the
        caches itself."""
        from optc.compiler.capture import is_state_buffer
        from optc.compiler.rewrite import view_key

        placed = self._placed.setdefault(str(torch.device(device)), {})  # name -> tensor on the device
        moved = self._moved.setdefault(str(torch.device(device)), {})
        # A view as read -> its tensor on the device: tied weights (an LM head that is the
        # embedding), read from a file as two tensors over one storage, move once, or the
        # device would hold two copies and the program two weights (rewrite.unify_aliases).
        tied: dict = {}
        mutated = set(ep.graph_signature.buffers_to_mutate.values())
        for name, tensor in list(ep.state_dict.items()):
            if name in mutated or is_state_buffer(name):
                continue
            key = view_key(tensor)
            key = None if key is None else (key, isinstance(tensor, torch.nn.Parameter))
            if key in tied:
                ep.state_dict[name] = placed[name] = tied[key]
                continue
            held = moved.get(id(tensor))
            if held is not None and held[0]() is tensor:  # one tensor as read, already there
                ep.state_dict[name] = placed[name] = held[1]
                continue
            # Compared on the device, one tensor at a time: keeping the copies as read
            # for the comparison would hold the whole model in host memory.
            on_device = tensor.to(device)
            hit = placed.get(name)
            if hit is not None and _same_values(hit, on_device):
                on_device = hit
            elif isinstance(tensor, torch.nn.Parameter) and not isinstance(on_device, torch.nn.Parameter):
                on_device = torch.nn.Parameter(on_device, requires_grad=tensor.requires_grad)
            ep.state_dict[name] = placed[name] = on_device
            # A weak reference: the tensor as read is freed once no program holds it, and
            # an id reused after that must not match.
            moved[id(tensor)] = (weakref.ref(tensor), on_device)
            if key is not None:
                tied[key] = on_device
        return ep

    def __call__(self, *args, compiled: bool = True):
        """Run a forward program (encoders, ViT) on positional inputs."""
        if "forward" not in self.programs:
            raise UsageError("this artifact is a decoder LM: use .generate() or .decoder()")
        device = str(args[0].device) if args and isinstance(args[0], torch.Tensor) else "cpu"
        with torch.no_grad():
            return self.module("forward", device=device, compiled=compiled)(*args)

    def decoder(self, *, device: str = "cpu", compiled: bool = True):
        """The StaticCacheDecoder over the prefill and decode programs (one shared KV
        cache), built on the first call for a device and reused after: building one
        lowers both programs and (on CUDA) captures the decode step, seconds to minutes
        that a second generate must not pay again. Every decoder of an artifact writes
        the same cache tensors, so a second one would not be independent anyway."""
        if self.task != "causal-lm":
            raise UsageError("only decoder-LM artifacts have a decode loop")
        device = indexed(device)
        key = (device, compiled)
        if key not in self._decoders:
            self._decoders[key] = self._new_decoder(device, compiled)
        return self._decoders[key]

    def _new_decoder(self, device: str, compiled: bool):
        from optc.runtime.decode import StaticCacheDecoder

        from optc.compiler.codegen.lowering import load_lowering, lower

        # The decoder ties the two programs' caches first, then compiles each.
        prefill = self.module("prefill", device=device, compiled=False)
        decode = self.module("decode", device=device, compiled=False)
        compile_fn = None
        if compiled:
            target = self.target_for(device)
            # Packages run only as a pair: they take the cache as inputs, which the
            # decoder ties on the GraphModules they hold (as on uncompiled programs).
            pair = [self._packaged(n, target, m, device) for n, m in (("prefill", prefill), ("decode", decode))]
            if all(p is not None for p in pair):
                prefill, decode = pair
            else:
                cached = self._kernel_cache(target, device)
                compile_fn = lambda m: lower(m, target, **load_lowering(target, "decode", m.graph),  # noqa: E731
                                             kernel_cache=cached)
        meta = self.manifest["model"]
        # Every prompt runs through the prefill program at the length it was checked (and
        # its kernels cached) for, in chunks: no new prompt length compiles again.
        checked = self.manifest["example_inputs"]["prefill"]["kwargs"]["input_ids"]["shape"][1]
        return StaticCacheDecoder(prefill, decode, compile=compile_fn, device=device, prefill_len=checked,
                                  max_cache_len=meta["max_cache_len"], batch_size=meta["batch_size"])

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, *, compiled: bool = True) -> torch.Tensor:
        """Greedy decoding through the artifact's decoder for the prompt's device (reused)."""
        return self.decoder(device=str(prompt_ids.device), compiled=compiled).generate(prompt_ids, max_new_tokens)
