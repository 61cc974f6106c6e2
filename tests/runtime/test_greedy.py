"""runtime/greedy.greedy_token: the decode step's two-stage argmax gives torch.argmax's
token exactly, ties and NaN included, for vocabularies it chunks and ones it cannot."""

import pytest
import torch

from optc.runtime.greedy import chunk_width, greedy_token


def test_vocabularies_of_the_zoo_are_chunked_and_a_prime_one_is_not():
    assert chunk_width(128256) == 768  # Llama-3: 167 chunks
    assert chunk_width(49152) == 1024  # SmolLM2
    assert chunk_width(50257) is None  # GPT-2's vocabulary has no such divisor
    assert chunk_width(2048) is None  # too few chunks to be worth a second stage


@pytest.mark.parametrize("vocab", [128256, 49152, 32000, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_token_is_torchs_argmax_with_ties_and_nan(vocab, dtype):
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    assert torch.equal(greedy_token(logits), logits.argmax(-1, keepdim=True))
    logits[:, [5, vocab // 2, vocab - 1]] = 100.0  # ties across chunks: the first index wins
    assert torch.equal(greedy_token(logits), torch.full((3, 1), 5))
    logits[1, [9, 77]] = float("nan")  # NaN counts as the maximum, the first one wins
    assert torch.equal(greedy_token(logits), logits.argmax(-1, keepdim=True))
    assert greedy_token(logits)[1, 0] == 9
