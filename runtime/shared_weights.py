"""Weights shared between an artifact's programs are stored once.

An LM's prefill and decode programs hold the same parameters: saved as they are, every
weight would be in the file twice (and read twice at every load). Before saving, a
program's state-dict tensor that is the very tensor an earlier program already holds is
replaced by a meta tensor of the same kind (no data); the manifest's "shared_weights"
says where each such entry comes from, and a load puts the earlier program's tensor back
in its place, so both programs hold one tensor again. Only parameters are shared: a
buffer (a KV cache the programs write in place) stays each program's own.
"""

from __future__ import annotations

import copy

import torch

from optc.compiler.rewrite import view_key
from optc.errors import ArtifactError


def storage_key(t: torch.Tensor) -> tuple | None:
    """Which memory a tensor views: two entries with the same key are the same weight.
    None for what is never shared: a tensor subclass (its storage is not its data), a
    tensor without memory (zero-size, meta), a lazily conjugated or negated view."""
    if type(t.data) is not torch.Tensor or t.is_conj() or t.is_neg():
        return None
    return view_key(t)


def parameter_names(ep) -> set[str]:
    """The entries that are parameters: weights. Buffers (a KV cache the program writes in
    place, small tables) keep an entry per program."""
    return set(ep.graph_signature.inputs_to_parameters.values())


def meta_like(t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta


def strip_shared(programs: dict) -> tuple[dict, dict]:
    """(the programs to save, the manifest's "shared_weights" record): each program after
    the first that holds a tensor an earlier one holds gets a copy whose entry is a meta
    tensor, recorded as {program: {entry: [source program, source entry]}}. The programs
    passed in are left as they are."""
    seen: dict[tuple, tuple[str, str]] = {}
    out, shared = {}, {}
    for name, ep in programs.items():
        parameters = parameter_names(ep)
        links = {}
        for entry, t in ep.state_dict.items():
            key = storage_key(t) if entry in parameters else None
            if key is None:
                continue
            if key in seen:
                links[entry] = list(seen[key])
            else:
                seen[key] = (name, entry)
        if any(t.numel() == 0 for t in ep.state_dict.values()):
            # torch.export.save groups a program's tensors by storage pointer, and a zero-size
            # tensor's (0) is a meta stand-in's too: they would come back as one. Stored whole.
            links = {}
        if links:
            ep = copy.copy(ep)  # shallow: the graph and every other entry stay the original's
            ep._state_dict = {k: meta_like(v) if k in links else v for k, v in ep.state_dict.items()}
            shared[name] = links
        out[name] = ep
    return out, shared


def restore_shared(programs: dict, shared: dict, path) -> None:
    """Put each shared entry's source tensor back in its place (in place, in `programs`);
    refuse (ArtifactError) a record naming what the file lacks, or a program left holding
    a weight without data."""
    for name, entry, source, source_entry in _links(shared, path):
        try:
            target = programs[name].state_dict
            tensor = programs[source].state_dict[source_entry]
        except KeyError:
            raise ArtifactError(f"artifact {path}: its manifest shares {name}'s {entry!r} with {source}'s "
                                f"{source_entry!r}; the file holds no such program or entry; recompile the model "
                                "with `optc compile`") from None
        if entry not in target or target[entry].shape != tensor.shape or target[entry].dtype != tensor.dtype:
            raise ArtifactError(f"artifact {path}: {name}'s {entry!r} does not match {source}'s "
                                f"{source_entry!r} that its manifest shares with it; recompile the model "
                                "with `optc compile`")
        target[entry] = tensor
    for name, ep in programs.items():
        empty = [k for k, v in ep.state_dict.items() if v.device.type == "meta"]
        if empty:
            raise ArtifactError(f"artifact {path}: program {name!r} holds {len(empty)} weight(s) without data "
                                f"({', '.join(empty[:3])}) and no source for them; recompile the model with "
                                "`optc compile`")


def _links(shared, path) -> list[tuple[str, str, str, str]]:
    """(program, entry, source program, source entry) of each shared entry; a record of
    another shape is refused (ArtifactError)."""
    shared = {} if shared is None else shared
    out = []
    well_formed = isinstance(shared, dict)
    for name, links in shared.items() if well_formed else ():
        well_formed = well_formed and isinstance(links, dict)
        for entry, pair in links.items() if well_formed else ():
            well_formed = well_formed and isinstance(pair, list) and len(pair) == 2
            if well_formed:
                out.append((name, entry, *pair))
    if not well_formed or not all(isinstance(s, str) for link in out for s in link):
        raise ArtifactError(f"artifact {path}: its manifest's shared_weights is not a record of shared "
                            "entries; recompile the model with `optc compile`")
    return out


def stored_once(programs: dict, shared: dict | None) -> tuple[int, int]:
    """(entries linked, bytes a copy per program would have added): what `optc inspect`
    reports of a loaded artifact's "shared_weights" record. Ties within one program do not
    count: an archive stores a tensor held under two names once anyway."""
    entries = _links(shared, "")
    other = {id(t): t for name, _, src, ent in entries if name != src for t in [programs[src].state_dict[ent]]}
    return len(entries), sum(t.nbytes for t in other.values())
