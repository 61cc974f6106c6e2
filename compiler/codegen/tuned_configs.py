"""Kernel configurations carried from one compile into the next (`--tuning-from`).

Inductor's coordinate descent picks each Triton kernel's launch configuration by timing
it on the device, and two compiles of the same program can pick differently, so the same
decode step compiled in two processes decodes at different speeds (benchmarks/NOTES.md,
"The spread is coordinate descent's"). An artifact's kernel cache (kernel_cache.py) holds
the configurations its compile chose: Inductor's autotune cache entries, each keyed by
its kernel's source, the torch build and optc's op sources (sources_tag). `install`
writes only those entries into this machine's autotune cache. A compile after it still
generates and compiles every program afresh (unlike a load, which installs the compiled
graphs too), but each kernel whose source matches an entry starts from the stored choice
and keeps it (torch_fixes.cached_choice_not_tuned_again); any other kernel is tuned as
before. So a model compiled again, or with other pass settings, runs the configurations
of the unchanged kernels that the first compile chose.
"""

from __future__ import annotations

import torch

from optc.errors import ArtifactError


def install(data: bytes) -> int:
    """Write the autotune entries among an artifact's kernel cache bytes (already
    checked by kernel_cache.usable) into this machine's autotune cache; how many."""
    from optc.compiler.torch_private import autotune_cache_artifacts

    entries = autotune_cache_artifacts(data)
    if entries is None:
        raise ArtifactError(f"the artifact's kernel cache could not be read by torch {torch.__version__}; "
                            "recompile the model with `optc compile`")
    for entry in entries:
        entry.populate_cache()
    return len(entries)
