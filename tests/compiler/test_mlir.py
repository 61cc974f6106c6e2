"""MLIR emission through torch-mlir: each format, the non-persistent-buffer workaround,
and the errors (unknown format, torch-mlir missing, an op torch-mlir cannot lower)."""

import builtins
import os
import re

import pytest
import torch

from optc.compiler.codegen.mlir import FORMATS, export_mlir
from optc.errors import CompileError, UsageError


def _needs_torch_mlir():
    pytest.importorskip("torch_mlir.fx", reason="torch-mlir not installed (CPU-only, optional)")


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class WithNonPersistent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("inv_freq", torch.arange(4, dtype=torch.float32), persistent=False)

    def forward(self, x):
        return self.lin(x) * self.inv_freq


MARKERS = {
    "mlir-torch": (r"torch\.aten\.mm\b", r"!torch\.vtensor<\[2,4\],f32>"),
    "mlir-linalg": (r"linalg\.matmul\b", r"tensor<2x4xf32>"),
    "stablehlo": (r"stablehlo\.dot_general\b", r"tensor<2x4xf32>"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_mlp_each_format(fmt, tmp_path):
    _needs_torch_mlir()
    torch.manual_seed(0)
    out = export_mlir(MLP().eval(), (torch.randn(2, 8),), fmt, tmp_path / f"mlp.{fmt}.mlir")
    assert out == tmp_path / f"mlp.{fmt}.mlir"
    text = out.read_text()
    assert text.lstrip().startswith(("module", "#map"))
    assert "func.func @main" in text
    for pattern in MARKERS[fmt]:
        assert re.search(pattern, text), f"{pattern!r} not in {fmt} output"
    dialects = {"mlir-torch": "torch.aten.", "mlir-linalg": "linalg.", "stablehlo": "stablehlo."}
    for other, marker in dialects.items():  # lowered to the one dialect asked for, only
        assert (marker in text) == (other == fmt), f"{marker!r} in {fmt} output: {other == fmt}"
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_non_persistent_buffer_module_restored_and_ep_input(tmp_path):
    _needs_torch_mlir()
    m = WithNonPersistent().eval()
    x = torch.randn(2, 4)
    out = export_mlir(m, (x,), "mlir-linalg", tmp_path / "m.mlir")
    assert "linalg.generic" in out.read_text()
    # The workaround is undone: the user's module is as it was.
    assert "inv_freq" not in m.state_dict() and "inv_freq" in dict(m.named_buffers())

    ep = torch.export.export(m, (x,), strict=False)
    assert any(not s.persistent for s in ep.graph_signature.input_specs if s.kind.name == "BUFFER")
    out2 = export_mlir(ep, None, "stablehlo", tmp_path / "ep.mlir")
    assert "stablehlo.multiply" in out2.read_text()


def test_tiny_llama_to_linalg(tmp_path):
    _needs_torch_mlir()
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 8))
    out = export_mlir(model, {"input_ids": ids, "use_cache": False}, "mlir-linalg",
                      tmp_path / "llama.mlir")
    text = out.read_text()
    assert re.search(r"func\.func @main\(%arg0: tensor<1x8xi64>.*-> tensor<1x8x256xf32>", text)
    assert "linalg.batch_matmul" in text or "linalg.matmul" in text
    assert "torch.aten" not in text
    # The rotary buffer stays non-persistent on the user's model afterwards.
    assert not any("inv_freq" in k for k in model.state_dict())


def test_unknown_format_lists_formats(tmp_path):
    with pytest.raises(UsageError) as ei:
        export_mlir(MLP(), (torch.randn(2, 8),), "tosa", tmp_path / "x.mlir")
    for fmt in FORMATS:
        assert fmt in str(ei.value)
    assert not (tmp_path / "x.mlir").exists()


def test_missing_torch_mlir_is_usage_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_torch_mlir(name, *a, **k):
        if name == "torch_mlir" or name.startswith("torch_mlir."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torch_mlir)
    with pytest.raises(UsageError, match=r"pip install torch-mlir.*CPU-only"):
        export_mlir(MLP(), (torch.randn(2, 8),), "mlir-torch", tmp_path / "x.mlir")


class Svd(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x)[1]


def test_unlowerable_op_is_short_compile_error(tmp_path):
    _needs_torch_mlir()
    target = tmp_path / "svd.mlir"
    target.write_text("previous")
    with pytest.raises(CompileError) as ei:
        export_mlir(Svd(), (torch.randn(4, 4),), "stablehlo", target)
    msg = str(ei.value)
    assert "_linalg_svd" in msg and "stablehlo" in msg
    assert "\n" not in msg and len(msg) < 1200
    assert "test_mlir.py" in msg  # points at the user's source line
    assert target.read_text() == "previous"
    assert sorted(os.listdir(tmp_path)) == ["svd.mlir"]


class Rfft(torch.nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x).abs()


def test_backend_lowering_failure_points_to_mlir_torch(tmp_path):
    _needs_torch_mlir()
    x = torch.randn(4, 4)
    with pytest.raises(CompileError) as ei:
        export_mlir(Rfft(), (x,), "stablehlo", tmp_path / "fft.mlir")
    msg = str(ei.value)
    assert "view_as_complex" in msg and "StableHLO" in msg and "mlir-torch" in msg
    assert not (tmp_path / "fft.mlir").exists()
    # ...and the suggested format does work.
    assert "torch.aten" in export_mlir(Rfft(), (x,), "mlir-torch", tmp_path / "fft.mlir").read_text()
