"""--calibration PATH: a user's text or .pt file calibrates lossy passes on models the
zoo has no data for, and a file that does not fit the model is refused by name."""

import json

import pytest
import torch

import optc
from optc.errors import UsageError
from optc.models import zoo

from cli_process import optc_cli

FACTORY = '''
import torch
from transformers import LlamaConfig, LlamaForCausalLM

def make():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    return model, (torch.randint(0, 256, (1, 16)),)
'''


def _cli(*args):
    proc = optc_cli(*args)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def tiny():
    entry = zoo.get("tiny-llama")
    return entry, entry.load(), entry.example_inputs(seq_len=16)


def test_text_file_is_cut_into_windows_of_the_models_tokens(tiny, tmp_path):
    entry, model, inputs = tiny
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)  # 540 bytes: 4 windows of 128
    batches = optc.read_calibration(text, model, inputs, entry=entry)
    assert len(batches) == 4
    assert all(b[0].shape == (1, 128) and b[0].dtype == torch.long for b in batches)
    expected = entry.tokenizer().encode("The quick brown fox", add_special_tokens=False)
    assert batches[0][0][0, :len(expected)].tolist() == list(expected)


def test_pt_file_round_trips_and_changes_the_config_hash(tiny, tmp_path):
    entry, model, inputs = tiny
    path = tmp_path / "calib.pt"
    torch.save([(torch.randint(0, 256, (1, 64)),) for _ in range(3)], path)
    batches = optc.read_calibration(path, model, inputs, entry=entry)
    assert len(batches) == 3
    passes = {"prune_mlp": {"ratio": 0.5, "align": 1}}
    own = optc.compile(model, inputs, target="cpu", passes=passes, entry=entry, calibration=batches,
                       verify=False, log=lambda m: None)
    zoo_data = optc.compile(model, inputs, target="cpu", passes=passes, entry=entry, verify=False,
                            log=lambda m: None)
    assert own.manifest["config"]["compile"]["calibration"].startswith("user:")
    assert own.manifest["config"]["hash"] != zoo_data.manifest["config"]["hash"]
    kept = [p["plan"]["blocks"] for p in own.manifest["passes"] if p["name"] == "prune_mlp"][0]
    kept_zoo = [p["plan"]["blocks"] for p in zoo_data.manifest["passes"] if p["name"] == "prune_mlp"][0]
    assert kept != kept_zoo  # the channels were chosen on the user's data


@pytest.mark.parametrize("content, message", [
    (lambda: [(torch.randint(0, 999, (1, 32)),)], "outside the model's vocabulary of 256"),
    (lambda: [(torch.randint(0, 256, (1, 32)), torch.ones(1, 32))], "has 2 inputs; the model takes 1"),
    (lambda: [(torch.rand(1, 32),)], "dtype torch.float32, the model takes torch.int64"),
    (lambda: [(torch.randint(0, 256, (32,)),)], "the model takes rank 2"),
    (lambda: [], "non-empty list of input tuples"),
    (lambda: {"ids": torch.zeros(1)}, "non-empty list of input tuples, got dict"),
])
def test_pt_files_that_do_not_fit_are_refused(tiny, tmp_path, content, message):
    entry, model, inputs = tiny
    path = tmp_path / "bad.pt"
    torch.save(content(), path)
    with pytest.raises(UsageError, match=message):
        optc.read_calibration(path, model, inputs, entry=entry)


def test_text_files_that_do_not_fit_are_refused(tiny, tmp_path):
    entry, model, inputs = tiny
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(UsageError, match="9 tokens, fewer than one window of 128"):
        optc.read_calibration(short, model, inputs, entry=entry)
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UsageError, match="not UTF-8 text"):
        optc.read_calibration(binary, model, inputs, entry=entry)
    with pytest.raises(UsageError, match="no such file"):
        optc.read_calibration(tmp_path / "missing.txt", model, inputs, entry=entry)
    with pytest.raises(UsageError, match="needs the model's tokenizer"):
        optc.read_calibration(short, model, inputs, entry=None)
    bert = zoo.get("tiny-bert")
    with pytest.raises(UsageError, match="calibrates causal LMs only"):
        optc.read_calibration(short, bert.load(), bert.example_inputs(), entry=bert)


def test_cli_factory_model_needs_and_takes_calibration(tmp_path):
    factory = tmp_path / "model.py"
    factory.write_text(FACTORY)
    spec = f"{factory}:make"
    rc, _, err = _cli("compile", spec, "--target", "cpu", "--set", "prune_mlp.ratio=0.5", "-o", str(tmp_path / "a.optc"))
    assert rc == 2 and "--calibration PATH" in err
    calib = tmp_path / "calib.pt"
    torch.save([(torch.randint(0, 256, (1, 64)),) for _ in range(4)], calib)
    rc, out, err = _cli("compile", spec, "--target", "cpu", "--set", "prune_mlp.ratio=0.5", "--set",
                        "prune_mlp.align=1", "--calibration", str(calib), "-o", str(tmp_path / "a.optc"), "--json",
                        "--no-verify", "--package", "none")
    assert rc == 0, err
    doc = json.loads(out)
    prune = next(p for p in doc["passes"] if p["name"] == "prune_mlp")
    assert prune["applied"] and doc["config"]["compile"]["calibration"].startswith("user:")
    assert doc["params"]["after"] < doc["params"]["before"]
    bad = tmp_path / "bad.pt"
    torch.save([(torch.randint(300, 400, (1, 64)),)], bad)
    rc, out, err = _cli("compile", spec, "--target", "cpu", "--set", "prune_mlp.ratio=0.5",
                        "--calibration", str(bad), "-o", str(tmp_path / "b.optc"))
    assert rc == 2 and "outside the model's vocabulary" in err and not (tmp_path / "b.optc").exists()


def test_float_inputs_take_the_models_dtype(tmp_path):
    vit = zoo.get("tiny-vit")
    example = tuple(x.to(torch.bfloat16) for x in vit.example_inputs())
    path = tmp_path / "images.pt"
    torch.save([(torch.rand(1, *example[0].shape[1:]),)], path)
    batches = optc.read_calibration(path, vit.load(), example, entry=vit)
    assert batches[0][0].dtype == torch.bfloat16 and batches[0][0].shape == example[0].shape
