"""A Hugging Face causal LM directory with its tokenizer gets calibration and held-out
data, so lossy passes and --eval work on it from the command line."""

import json

import pytest
import torch
import transformers
from tokenizers import ByteLevelBPETokenizer

from optc.errors import UsageError
from optc.models import data, user

from cli_process import optc_cli


def _tokenizer(vocab_size: int):
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([data.text_split("calibration")[:20000]], vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|eos|>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|eos|>")


def _llama_dir(path, model_vocab: int, tokenizer=None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=model_vocab, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok():
    return _tokenizer(300)


def test_causal_lm_directory_with_tokenizer_gets_disjoint_splits(tmp_path, tok):
    folder = _llama_dir(tmp_path / "m", len(tok), tok)
    entry, module, _ = user.resolve(str(folder))
    assert isinstance(entry, user.TextData) and entry.metric == "perplexity" and entry.name == "m"
    cal, ev = entry.calibration_batches(4, 64), entry.evaluation_batches(4, 64)
    assert [tuple(b[0].shape) for b in cal] == [(1, 64)] * 4
    # The model's own tokenizer: ids equal its encoding of the split, all within the vocabulary.
    assert cal[0][0].max() < len(tok)
    assert tok.decode(cal[0][0][0]) in data.text_split("calibration")
    cal_rows = {tuple(b[0][0].tolist()) for b in cal}
    assert not cal_rows & {tuple(b[0][0].tolist()) for b in ev}


def test_a_tokenizer_beyond_the_vocabulary_is_refused(tmp_path, tok):
    entry, _, _ = user.resolve(str(_llama_dir(tmp_path / "m", 200, tok)))  # tokenizer has 300 ids
    with pytest.raises(UsageError, match="does not belong to this model"):
        entry.calibration_batches(2, 64)


def optc(*args):
    proc = optc_cli(*args, timeout=900)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_sparsifies_a_user_directory_and_reports_held_out_quality(tmp_path, tok):
    folder = _llama_dir(tmp_path / "m", len(tok), tok)
    rc, out, err = optc("compile", str(folder), "--target", "cpu", "--set", "sparsify_activations.method=cats",
                        "--set", "sparsify_activations.sparsity=0.5", "--eval", "--no-verify", "--json",
                        "--package", "none", "-o", str(tmp_path / "m.optc"))
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["quality"]["metric"] == "perplexity" and doc["quality"]["split"] == "evaluation"
    assert 0.4 < doc["quality"]["sparsify_activations"]["sparsity"] < 0.6


def test_a_lossy_pass_without_data_is_refused_saying_what_to_add(tmp_path, tok):
    import optc

    entry, module, inputs = user.resolve(str(_llama_dir(tmp_path / "m", len(tok))))
    assert entry is None
    with pytest.raises(UsageError, match="tokenizer"):
        optc.compile(module, inputs, target="cpu", entry=entry, verify=False, log=lambda msg: None,
                     passes={"sparsify_activations.method": "teal", "sparsify_activations.sparsity": 0.5})


def test_tokenizer_files_that_do_not_load_are_named_with_the_error(tmp_path, tok):
    import optc

    folder = _llama_dir(tmp_path / "m", len(tok), tok)
    (folder / "tokenizer.json").write_text("{ not json")
    entry, module, inputs = user.resolve(str(folder))
    assert isinstance(entry, user.UnreadableTokenizer) and entry.name == "m"
    with pytest.raises(UsageError, match="has tokenizer files, but transformers cannot load them") as info:
        optc.compile(module, inputs, target="cpu", entry=entry, verify=False, log=lambda msg: None,
                     passes={"sparsify_activations.method": "teal", "sparsify_activations.sparsity": 0.5})
    assert "re-save the tokenizer" in str(info.value) and info.value.exit_code == 2
