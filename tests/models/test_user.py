import textwrap

import pytest
import torch

from optc.errors import UsageError
from optc.models import user, zoo

FACTORY = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.fc(x))

def make():
    torch.manual_seed(0)
    return Net(), (torch.ones(2, 4),)

def make_tensor_input():
    return Net(), torch.ones(1, 4)

def not_a_pair():
    return Net()

def not_a_module():
    return "model", (torch.ones(1, 4),)

def empty_inputs():
    return Net(), ()

def broken():
    raise RuntimeError("boom")
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent(FACTORY))
    return path


def test_factory_spec_loads_module_and_inputs(factory_file):
    module, inputs = user.load_user_model(f"{factory_file}:make")
    assert type(module).__name__ == "Net"
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert isinstance(inputs, tuple) and inputs[0].shape == (2, 4)
    assert module(*inputs).shape == (2, 3)
    _, single = user.load_user_model(f"{factory_file}:make_tensor_input")
    assert isinstance(single, tuple) and single[0].shape == (1, 4)


@pytest.mark.parametrize("factory, message", [
    ("missing", r"has no function 'missing'.*defines .*make"),
    ("not_a_pair", r"must return \(module, example_inputs\)"),
    ("not_a_module", r"must be a torch.nn.Module"),
    ("empty_inputs", r"non-empty tuple"),
    ("broken", r"broken\(\) failed: RuntimeError: boom"),
])
def test_factory_errors(factory_file, factory, message):
    with pytest.raises(UsageError, match=message):
        user.load_user_model(f"{factory_file}:{factory}")


def test_missing_file_and_unimportable_file(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        user.load_user_model(f"{tmp_path / 'nope.py'}:make")
    bad = tmp_path / "bad.py"
    bad.write_text("import not_a_real_module_xyz\n")
    with pytest.raises(UsageError, match="importing .* failed: ModuleNotFoundError"):
        user.load_user_model(f"{bad}:make")
    with pytest.raises(UsageError, match="but no factory"):
        user.load_user_model(str(bad))


def test_missing_path_and_dir_without_config(tmp_path):
    with pytest.raises(UsageError, match="no such model directory"):
        user.load_user_model(str(tmp_path / "absent"))
    with pytest.raises(UsageError, match="has no config.json"):
        user.load_user_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UsageError, match="is a file, not a model directory"):
        user.load_user_model(str(tmp_path / "weights.bin"))


def test_hf_causal_lm_directory(tmp_path):
    original = zoo.get("tiny-llama").load()
    original.save_pretrained(tmp_path / "lm")
    module, inputs = user.load_user_model(str(tmp_path / "lm"))
    assert type(module).__name__ == "LlamaForCausalLM"
    assert not module.training
    assert len(inputs) == 1 and inputs[0].shape == (1, user.EXAMPLE_TOKENS)
    assert int(inputs[0].max()) < 256
    with torch.no_grad():
        assert torch.allclose(module(*inputs).logits, original(*inputs).logits, atol=1e-5)


def test_hf_encoder_and_vision_directories(tmp_path):
    zoo.get("tiny-bert").load().save_pretrained(tmp_path / "bert")
    module, inputs = user.load_user_model(str(tmp_path / "bert"))
    assert type(module).__name__ == "BertModel"  # AutoModel: not a causal LM
    assert module(*inputs).last_hidden_state.shape == (1, user.EXAMPLE_TOKENS, 64)
    zoo.get("tiny-vit").load().save_pretrained(tmp_path / "vit")
    module, inputs = user.load_user_model(str(tmp_path / "vit"))
    assert type(module).__name__ == "ViTForImageClassification"  # the saved class, head kept
    assert inputs[0].shape == (1, 3, 32, 32)
    assert module(*inputs).logits.shape == (1, 10)


def test_hf_directory_without_known_architecture_falls_back_to_automodel(tmp_path):
    import json

    zoo.get("tiny-bert").load().save_pretrained(tmp_path / "bert")
    cfg_path = tmp_path / "bert" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["MyCustomBertThing"]
    cfg_path.write_text(json.dumps(cfg))
    module, _ = user.load_user_model(str(tmp_path / "bert"))
    assert type(module).__name__ == "BertModel"


def test_resolve_prefers_zoo_names_then_user_models(factory_file):
    entry, module, inputs = user.resolve("tiny-vit")
    assert entry is zoo.get("tiny-vit") and inputs[0].shape == (1, 3, 32, 32)
    entry, module, inputs = user.resolve(f"{factory_file}:make", dtype=torch.float64)
    assert entry is None and module.fc.weight.dtype == torch.float64
    assert inputs[0].dtype == torch.float64
    with pytest.raises(UsageError, match=r"unknown model 'no-such-model'.*optc models"):
        user.resolve("no-such-model")
