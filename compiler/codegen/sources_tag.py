"""The tag optc adds to Inductor's cache keys: a digest of the sources of optc's
kernels and custom ops (this package).

Inductor's FX graph and AOTAutograd caches key on the graph, its inputs and Inductor's
own configuration. A graph that calls one of optc's ops hashes the same after the
Python behind the op changes (a Triton op's launch code, a reference Inductor traces
into the graph), so a warm cache hands back code built from the old body: a lowering
that fails on an empty cache passed on a warm one (benchmarks/NOTES.md, "Merging in
fewer launches"). `torch.compiler.config.cache_key_tag` is the part of those keys a
user sets; optc appends this digest to it before it lowers anything, so a change to any
file here is a cache miss, and an unchanged tree still hits (the artifact's stored
entries included, which were written under the same tag).

The tag is set for the process, not around each compile: `torch.compile` (the lowering
where Inductor captures its own CUDA graphs) compiles inside its first call, which no
context around `lower()` reaches. A tag only splits cache entries; graphs without
optc's ops compile to the same code under it.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def sources_digest(root: Path = _HERE) -> str:
    """sha256 (16 hex digits) over the relative path and bytes of every .py under root."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def optc_tag() -> str:
    return f"optc-{sources_digest()}"


def tag_cache_keys() -> None:
    """Append optc's tag to `torch.compiler.config.cache_key_tag` (once: a tag that
    already ends with it is left as it is)."""
    import torch.compiler.config as compiler_config

    user = compiler_config.cache_key_tag
    if not user.endswith(optc_tag()):
        compiler_config.cache_key_tag = f"{user}+{optc_tag()}" if user else optc_tag()
