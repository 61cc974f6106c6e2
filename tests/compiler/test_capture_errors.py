"""A capture that fails says where in the model's code it failed, and what to do: a
user's own model gets the line in their file; a Hugging Face architecture whose own
code transformers' static-cache export cannot take is named as such, since a user
cannot rewrite the library's code. OPT, which fails that way, is captured with its
positions given explicitly."""

import pytest
import torch

from optc.compiler.capture import capture_causal_lm, capture_forward
from optc.errors import CaptureError


class BranchesOnValues(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a branch on a tensor's value: torch.export cannot trace it
            return x * 2
        return x


def test_a_users_model_gets_the_line_that_failed_and_the_data_dependent_hint():
    with pytest.raises(CaptureError) as err:
        capture_forward(BranchesOnValues(), (torch.randn(2, 3),))
    message = str(err.value)
    line = BranchesOnValues.forward.__code__.co_firstlineno + 1
    assert f"test_capture_errors.py:{line}" in message
    assert "torch.cond" in message


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                       max_position_embeddings=64, word_embed_proj_dim=32, attn_implementation="sdpa")
    return OPTForCausalLM(config).eval()


def test_an_architecture_transformers_cannot_export_is_named_as_such(monkeypatch):
    """OPT's own code fails under transformers' static-cache wrapper; when the capture
    with explicit positions fails too, the error is the first one, naming that line."""
    from optc.compiler import capture

    def fails(self, input_ids, cache_position):
        raise RuntimeError("explicit positions do not help either")

    monkeypatch.setattr(capture._ExplicitPositions, "forward", fails)
    with pytest.raises(CaptureError) as err:
        capture_causal_lm(_tiny_opt(), max_cache_len=32, prompt_len=8)
    message = str(err.value)
    assert "raised at transformers/models/opt/modeling_opt.py:" in message
    assert "the Hugging Face model's own code" in message and "torch.cond" not in message


def test_opt_is_captured_with_its_positions_given():
    model = _tiny_opt()
    captured = capture_causal_lm(model, max_cache_len=32, prompt_len=8)
    prefill = captured.programs["prefill"].module()
    ids = torch.randint(0, 64, (1, 11))
    with torch.no_grad():
        out = prefill(input_ids=ids, cache_position=torch.arange(11))
        torch.testing.assert_close(out, model(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    names = [n for n, _ in prefill.named_buffers()]
    assert "step.key_cache_0" in names and "step.cumulative_length_0" in names


def test_a_program_torch_cannot_rebuild_a_module_from_is_a_capture_error():
    class Program:  # what torch.export gave for Falcon in transformers 5.x
        def module(self):
            raise AttributeError("`lifted_tensor_2` is not a buffer")

    from optc.compiler.capture import graph_module

    with pytest.raises(CaptureError, match="cannot be turned back into a module"):
        graph_module(Program())
