"""An artifact's parameters in one member, read and moved to the device in one piece.

torch.export.save stores each weight as a record of its program's archive, and a load
copies every record out of the archive and, on a GPU, moves each to the device on its own
(the "state dict" part of torch.export.load: seconds of a llama-1b load on an H100,
benchmarks/NOTES.md). Since format 3 the parameters that are dense and contiguous leave
the programs before they are saved (a meta tensor stands in, as for shared weights,
runtime/shared_weights.py) and their bytes go into one member, BLOB_MEMBER, each at an
ALIGN-ed offset; the manifest's "weights_blob" record says where each entry's bytes are.
A load reads that member once (straight from its offset, its chunk digests checked as any
member's), copies it to each device the entries were saved on once, and gives every entry
a view of that copy (`Blob`). Buffers (a KV cache a program writes in place) stay in the programs.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch

from optc.errors import ArtifactError
from optc.runtime.shared_weights import meta_like, parameter_names, storage_key

BLOB_MEMBER = "weights/parameters.bin"
# Inductor's kernels assume 16-byte aligned inputs; 256 bytes keeps every entry at the
# alignment of a fresh allocation's vector loads too.
ALIGN = 256
_RECOMPILE = "recompile the model with `optc compile`"


def strip_to_blob(programs: dict) -> tuple[dict, dict | None, bytearray | None]:
    """(the programs to save, the manifest's "weights_blob" record, the member's bytes):
    every dense, contiguous parameter with data leaves its program for the blob (entries
    of one tensor share their bytes); (programs, None, None) where none does. The
    programs passed in are left as they are."""
    offsets: dict[tuple, int] = {}
    pieces: list[tuple[int, torch.Tensor]] = []  # (offset, tensor) of each distinct weight
    size = 0
    entries, out = {}, {}
    for name, ep in programs.items():
        if any(t.numel() == 0 for t in ep.state_dict.values()):
            # torch.export.save groups tensors by storage pointer, and a zero-size tensor's
            # (0) is a meta stand-in's too (shared_weights.strip_shared): stored whole.
            out[name] = ep
            continue
        parameters = parameter_names(ep)
        moved = {}
        for entry, t in ep.state_dict.items():
            # Dense data the blob can hold as bytes: not meta, zero-size, a subclass or a lazy
            # view (key None), not quantized, and contiguous (an entry comes back laid out so).
            key = storage_key(t) if entry in parameters else None
            if key is None or t.is_quantized or not t.is_contiguous():
                continue
            if key not in offsets:
                size = -(-size // ALIGN) * ALIGN
                offsets[key] = size
                pieces.append((size, t))
                size += t.numel() * t.dtype.itemsize
            moved[entry] = [offsets[key], t.numel() * t.dtype.itemsize, str(t.dtype).removeprefix("torch."),
                            list(t.shape), str(t.device)]
        if moved:
            ep = copy.copy(ep)  # shallow: the graph and every other entry stay the original's
            ep._state_dict = {k: meta_like(v) if k in moved else v for k, v in ep.state_dict.items()}
            entries[name] = moved
        out[name] = ep
    if not entries:
        return programs, None, None
    blob = bytearray(size)
    view = torch.frombuffer(blob, dtype=torch.uint8)
    for offset, t in pieces:
        nbytes = t.numel() * t.dtype.itemsize
        view[offset:offset + nbytes].copy_(t.detach().reshape(-1).view(torch.uint8).cpu())
    return out, {"member": BLOB_MEMBER, "align": ALIGN, "entries": entries}, blob


class Blob:
    """The blob of an artifact being read: `restore(name, program)` gives the program's
    entries their views as soon as it is deserialised (the stand-ins torch made for them
    freed program by program, so a load holds at most one program's stand-ins beside the
    weights). A record of None (an artifact before format 3) restores nothing."""

    def __init__(self, record: dict | None, data, path):
        self.path = path
        self.spans: dict[str, list] = {}
        for span in [] if record is None else _spans(record, len(data), path):
            self.spans.setdefault(span[0], []).append(span[1:])
        with warnings.catch_warnings():  # bytes a reader returned: nothing writes parameters
            warnings.filterwarnings("ignore", message=".*buffer is not writable.*")
            self.raw = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
        self.on_device: dict[str, torch.Tensor] = {}

    def restore(self, name: str, program) -> None:
        state = program.state_dict
        for entry, offset, nbytes, dtype, shape, device in self.spans.pop(name, ()):
            stand_in = state.get(entry)
            if stand_in is None or tuple(stand_in.shape) != shape or stand_in.dtype != dtype:
                raise ArtifactError(f"artifact {self.path}: its weights_blob record names {name}'s {entry!r} "
                                    f"as {dtype} {list(shape)}, which the program does not hold; {_RECOMPILE}")
            if device not in self.on_device:
                self.on_device[device] = self.raw.to(device)  # one copy per device, not one per weight
            t = self.on_device[device][offset:offset + nbytes].view(dtype).view(shape)
            state[entry] = torch.nn.Parameter(t, requires_grad=False) if isinstance(stand_in, torch.nn.Parameter) else t

    def check_restored(self) -> None:
        """Refuse a record naming programs the file does not hold (all others restored)."""
        if self.spans:
            names = ", ".join(repr(n) for n in sorted(self.spans))
            raise ArtifactError(f"artifact {self.path}: its weights_blob record names {names}, "
                                f"which the file does not hold; {_RECOMPILE}")


def _spans(record, size: int, path) -> list[tuple]:
    """(program, entry, offset, nbytes, dtype, shape, device) of each entry, checked
    against the record's own rules and the blob's size."""
    bad = f"artifact {path}: its manifest's weights_blob is not a record of the blob's entries; {_RECOMPILE}"
    if (not isinstance(record, dict) or record.get("member") != BLOB_MEMBER
            or not isinstance(record.get("entries"), dict)):
        raise ArtifactError(bad)
    out = []
    for name, entries in record["entries"].items():
        if not isinstance(entries, dict):
            raise ArtifactError(bad)
        for entry, span in entries.items():
            if not (isinstance(span, list) and len(span) == 5):
                raise ArtifactError(bad)
            offset, nbytes, dtype_name, shape, device = span
            dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
            ints = all(type(v) is int and v >= 0 for v in (offset, nbytes))
            dims = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
            if not (ints and dims and isinstance(dtype, torch.dtype) and isinstance(device, str)):
                raise ArtifactError(bad)
            if (math.prod(shape) * dtype.itemsize != nbytes or offset % max(1, dtype.itemsize)
                    or offset + nbytes > size):
                raise ArtifactError(f"artifact {path}: its weights_blob record places {name}'s {entry!r} "
                                    f"outside the {size}-byte blob or misaligned; {_RECOMPILE}")
            out.append((name, entry, offset, nbytes, dtype, tuple(shape), device))
    return out
