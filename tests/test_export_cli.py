"""`optc export` of a compiled decoder LM, from a zoo model and from an .optc file, in
every format: the KV cache the programs write in place becomes arguments and results."""

import json
import re

import pytest
import torch

from cli_process import optc_cli


def optc(*args):
    proc = optc_cli(*args, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr

pytest.importorskip("torch_mlir.fx", reason="torch-mlir not installed (CPU-only, optional)")

L = 32  # a short cache keeps the files and the run small
STATE = [f"cumulative_length_{i}" for i in range(4)] + [
    f"{kind}_cache_{i}" for i in range(4) for kind in ("key", "value")]
DIALECT = {"mlir-torch": "torch.aten.", "mlir-linalg": "linalg.", "stablehlo": "stablehlo."}
TYPES = {  # input_ids of the prefill (dynamic length) / decode (one token), and one cache tensor
    "mlir-torch": (r"!torch\.vtensor<\[1,\?\],si64>", r"!torch\.vtensor<\[1,1\],si64>",
                   rf"!torch\.vtensor<\[1,2,{L},16\],f32>"),
    "mlir-linalg": (r"tensor<1x\?xi64>", r"tensor<1x1xi64>", rf"tensor<1x2x{L}x16xf32>"),
    "stablehlo": (r"tensor<1x\?xi64>", r"tensor<1x1xi64>", rf"tensor<1x2x{L}x16xf32>"),
}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    import optc
    from optc.models import zoo

    entry = zoo.get("tiny-llama")
    art = optc.compile(entry.load(), entry.example_inputs(seq_len=8), target="cpu", entry=entry,
                       max_cache_len=L, verify=False, log=lambda m: None)
    return art.save(tmp_path_factory.mktemp("art") / "tiny.optc")


def _signature(text: str) -> tuple[list[str], list[str]]:
    m = re.search(r"func\.func @main\((.*?)\) -> \((.*?)\) \{", text)
    assert m, text[:2000]
    args = [a.split(": ", 1)[1] for a in re.split(r", (?=%arg)", m.group(1))]
    return args, m.group(2).split(", ")


@pytest.mark.parametrize("source", ["zoo", "optc"])
@pytest.mark.parametrize("fmt", list(DIALECT))
def test_export_lm_each_format(fmt, source, artifact, tmp_path):
    out = tmp_path / f"{source}.mlir"
    if source == "zoo":  # the prefill program, the default
        rc, doc, err = optc("export", "tiny-llama", "--target", "cpu", "--max-cache-len", str(L),
                            "--format", fmt, "-o", str(out), "--json")
    else:
        rc, doc, err = optc("export", str(artifact), "--program", "decode", "--format", fmt, "-o", str(out), "--json")
    assert rc == 0, err
    doc = json.loads(doc)
    program = "prefill" if source == "zoo" else "decode"
    assert doc == {"output": str(out), "format": fmt, "program": program, "state": STATE}
    text = out.read_text()
    for other, marker in DIALECT.items():
        assert (marker in text) == (other == fmt), f"{marker!r} in {fmt} output"
    args, results = _signature(text)
    # input_ids, cache_position, then the 12 state tensors; returned updated, then the logits.
    assert len(args) == 2 + len(STATE) and len(results) == len(STATE) + 1, (args, results)
    ids_type = TYPES[fmt][0] if program == "prefill" else TYPES[fmt][1]
    assert re.fullmatch(ids_type, args[0]), args[0]
    assert re.fullmatch(TYPES[fmt][2], args[2 + 4]) and re.fullmatch(TYPES[fmt][2], results[4]), (args, results)
    assert "its state (12 tensors" in err


def test_export_unknown_program_is_usage_error(artifact, tmp_path):
    rc, _, err = optc("export", str(artifact), "--program", "forward", "--format", "stablehlo",
                      "-o", str(tmp_path / "x.mlir"))
    assert rc == 2 and "has no such program" in err and "decode, prefill" in err
    assert not (tmp_path / "x.mlir").exists()


def test_state_as_inputs_computes_the_decode_loop(artifact):
    """What torch-mlir imports: prefill then decode steps over explicit state give the
    runtime's teacher-forced logits (the state is bound in the order state_names says)."""
    import optc
    from optc.compiler.codegen.mlir_state import export_call

    art = optc.load(artifact)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    expected = art.decoder(compiled=False).forced_logits(ids, 8)
    prefill = export_call(art.programs["prefill"], art.programs["prefill"].example_inputs)
    decode = export_call(art.programs["decode"], art.programs["decode"].example_inputs)
    assert prefill.state == decode.state == STATE
    state = [torch.zeros_like(t) for t in prefill.args[2:]]
    with torch.no_grad():
        rows = [prefill.module(ids[:, :8], torch.arange(8), *state)[:, -1]]
        for j in range(8, 12):
            rows.append(decode.module(ids[:, j:j + 1], torch.tensor([j]), *state)[:, -1])
    assert torch.allclose(torch.stack(rows, 1), expected, atol=1e-5)
