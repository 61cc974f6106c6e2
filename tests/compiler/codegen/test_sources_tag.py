"""codegen/sources_tag: Inductor's caches key on optc's op sources through the tag.

The first test shows the failure the tag exists for: with the FX graph and AOTAutograd
caches on, a graph that calls a Triton op compiles once, and after the op's body changes
the same graph is served from the cache, old body and all, until the tag changes."""

from __future__ import annotations

import torch
import torch.compiler.config as compiler_config
import torch.fx as fx
from torch.library import triton_op

from optc.compiler.codegen import sources_tag
from optc.compiler.codegen.direct import DirectLowering

_OFFSET = {"value": 1.0}


@triton_op("optc_test::offset_probe", mutates_args=())
def _offset_probe(x: torch.Tensor) -> torch.Tensor:
    return x + _OFFSET["value"]  # Inductor traces this body into the graph it compiles


@_offset_probe.register_fake
def _(x):
    return torch.empty_like(x)


def _compiled_once(x):
    gm = fx.symbolic_trace(lambda a: torch.ops.optc_test.offset_probe(a) * 2)
    return DirectLowering(gm, {"fx_graph_cache": True})(x)


def test_the_tag_is_what_rebuilds_a_cached_graph_after_an_op_body_changes(tmp_path, monkeypatch):
    # (The config module's own patch: monkeypatch's undo would delete the key.)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(_OFFSET, "value", 1.0)
    x = torch.arange(4.0)
    with compiler_config.patch(cache_key_tag="before"):
        assert torch.equal(_compiled_once(x), (x + 1) * 2)
        _OFFSET["value"] = 5.0
        assert torch.equal(_compiled_once(x), (x + 1) * 2)  # the cache's old body, under the same tag
    with compiler_config.patch(cache_key_tag="after"):
        assert torch.equal(_compiled_once(x), (x + 5) * 2)


def test_digest_follows_every_source_file(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "ops.py").write_text("A = 1\n")
    (tmp_path / "kernels" / "k.py").write_text("B = 1\n")
    first = sources_tag.sources_digest(tmp_path)
    assert sources_tag.sources_digest(tmp_path) == first
    (tmp_path / "kernels" / "k.py").write_text("B = 2\n")
    assert sources_tag.sources_digest(tmp_path) != first
    (tmp_path / "kernels" / "notes.txt").write_text("not code")
    (tmp_path / "kernels" / "k.py").write_text("B = 1\n")
    assert sources_tag.sources_digest(tmp_path) == first


def test_tag_is_appended_once_after_the_users():
    with compiler_config.patch(cache_key_tag=""):
        sources_tag.tag_cache_keys()
        sources_tag.tag_cache_keys()
        assert compiler_config.cache_key_tag == sources_tag.optc_tag()
    with compiler_config.patch(cache_key_tag="mine"):
        sources_tag.tag_cache_keys()
        assert compiler_config.cache_key_tag == f"mine+{sources_tag.optc_tag()}"
    assert sources_tag.optc_tag() == f"optc-{sources_tag.sources_digest()}"


def test_lowering_sets_the_tag():
    from optc.compiler import targets
    from optc.compiler.codegen.lowering import lower

    with compiler_config.patch(cache_key_tag=""):
        lower(fx.symbolic_trace(lambda a: a + 1), targets.get("cpu"))
        assert compiler_config.cache_key_tag == sources_tag.optc_tag()
