"""The KV cache of exported decoder programs: finding its tensors and sharing them.

What the cache looks like inside `ep.module()` (checked on torch 2.13 / transformers
5.23 and the same code in transformers 5.17): the module registers buffers
`key_cache_{i}`, `value_cache_{i}`, `cumulative_length_{i}`, but the exported graph does
not write them as mutable buffers; the cache tensors are reached through the
`StaticCache` object, so export lifts them as constants (`lifted_tensor_N`,
`model.model.layers.i.self_attn.lifted_tensor_N`) that alias the registered buffers'
storage and are written in place (`index_copy_`, `copy_`). Two programs exported from
one module instance therefore start out sharing the cache; programs loaded separately
do not. `cache_buffer_names` finds every tensor attribute that holds cache state (the
named buffers, whatever the graph mutates in place, and their aliases) and
`tie_buffers` rebinds them, so both layouts work; the decoder then checks that every
tensor either program mutates is shared, and refuses to run otherwise.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from optc.compiler.capture import is_state_buffer
from optc.compiler.rewrite import mutated_attr_names, set_tensor_attribute, tensor_attributes
from optc.errors import CompileError, UsageError


# ----------------------------------------------------------------------------------------
# Finding and sharing cache tensors
# ----------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor):
    ptr = t.untyped_storage().data_ptr()
    # Zero-size tensors have no storage worth tracking (and all share pointer 0).
    return None if ptr == 0 else (t.device, ptr)


def cache_buffer_names(module: nn.Module) -> list[str]:
    """Names of every tensor attribute that holds KV-cache state: the buffers named
    `key_cache_i` / `value_cache_i` / `cumulative_length_i`, whatever a GraphModule
    writes in place, and any attribute aliasing the storage of those."""
    tensors = tensor_attributes(module)
    seeds = {n for n in tensors if is_state_buffer(n)}
    seeds |= {n for n in mutated_attr_names(module) if n in tensors}
    storages = {_storage_key(tensors[n]) for n in seeds} - {None}
    names = set(seeds)
    names |= {n for n, t in tensors.items() if _storage_key(t) in storages}
    return sorted(names)


def tie_buffers(src_module: nn.Module, dst_module: nn.Module, names: Iterable[str]) -> list[str]:
    """Make `dst_module` use `src_module`'s tensors for `names`.

    Each name must resolve to a tensor attribute (buffer or GraphModule constant) in both
    modules with the same shape, dtype and device. Every attribute of `dst_module` that
    aliased the replaced tensor (the same view of the same storage) is rebound too, so a
    lifted constant follows its buffer. Returns the names rebound in `dst_module`.
    """
    src_t = tensor_attributes(src_module)
    dst_t = tensor_attributes(dst_module)
    rebound: list[str] = []
    for name in names:
        if name not in src_t:
            raise UsageError(f"tie_buffers: source module has no tensor attribute {name!r}")
        if name not in dst_t:
            raise UsageError(f"tie_buffers: destination module has no tensor attribute {name!r}")
        s, d = src_t[name], dst_t[name]
        if (s.shape, s.dtype, s.device) != (d.shape, d.dtype, d.device):
            raise UsageError(
                f"tie_buffers: {name!r} differs: source {tuple(s.shape)} {s.dtype} {s.device}, "
                f"destination {tuple(d.shape)} {d.dtype} {d.device}"
            )
        if s is d:
            continue
        key = _storage_key(d)
        for other, t in list(dst_t.items()):
            same = t is d or (
                key is not None
                and _storage_key(t) == key
                and t.dtype == d.dtype
                and t.shape == d.shape
                and t.stride() == d.stride()
                and t.storage_offset() == d.storage_offset()
            )
            if same:
                set_tensor_attribute(dst_module, other, s)
                dst_t[other] = s
                rebound.append(other)
            elif key is not None and _storage_key(t) == key:
                raise UsageError(
                    f"tie_buffers: {other!r} is a different view of {name!r}'s storage; "
                    "cannot rebind it faithfully"
                )
    return sorted(set(rebound))


def _check_shared(a: nn.Module, b: nn.Module) -> None:
    """Every tensor that either program writes in place must be one both programs see."""
    a_t, b_t = tensor_attributes(a), tensor_attributes(b)
    a_s = {_storage_key(t) for t in a_t.values()} - {None}
    b_s = {_storage_key(t) for t in b_t.values()} - {None}
    for mod, tensors, other, label in ((a, a_t, b_s, "prefill"), (b, b_t, a_s, "decode")):
        written = set(mutated_attr_names(mod)) | {n for n in tensors if is_state_buffer(n)}
        missing = [n for n in sorted(written) if n in tensors and _storage_key(tensors[n]) not in other and _storage_key(tensors[n]) is not None]
        if missing:
            raise CompileError(
                f"the {label} program writes state the other program does not share: "
                f"{missing[:6]}{' ...' if len(missing) > 6 else ''}; prefill and decode "
                "would see different KV caches"
            )
