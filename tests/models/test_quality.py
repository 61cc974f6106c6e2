import math

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from optc.errors import UsageError
from optc.models import quality, zoo


def _fixed_lm(vocab=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, vocab, generator=gen)  # next-token logits by current token

    def forward(input_ids):
        return table[input_ids]

    return forward, table


def test_perplexity_matches_cross_entropy_by_hand():
    forward, table = _fixed_lm()
    batches = [torch.tensor([[0, 3, 5, 1]]), torch.tensor([[2, 2, 6], [4, 0, 1]])]
    nll, count = 0.0, 0
    for ids in batches:
        for row in ids.tolist():
            for cur, nxt in zip(row, row[1:]):
                logp = table[cur] - torch.logsumexp(table[cur], dim=0)
                nll -= logp[nxt].item()
                count += 1
    assert count == 3 + 2 + 2
    assert quality.perplexity(forward, batches) == pytest.approx(math.exp(nll / count), rel=1e-6)


def test_perplexity_of_uniform_logits_is_the_vocab_size():
    def forward(ids):
        return torch.zeros(*ids.shape, 50)

    assert quality.perplexity(forward, [torch.randint(0, 50, (2, 9))]) == pytest.approx(50.0)


def test_perplexity_takes_model_outputs_tuples_and_input_tuples():
    forward, _ = _fixed_lm()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    plain = quality.perplexity(forward, [ids])
    assert quality.perplexity(lambda x: CausalLMOutput(logits=forward(x)), [ids]) == plain
    assert quality.perplexity(lambda x: (forward(x), None), [(ids,)]) == plain


def test_perplexity_rejects_mismatched_logits():
    with pytest.raises(UsageError, match="do not match"):
        quality.perplexity(lambda x: torch.zeros(1, 3, 5), [torch.zeros(1, 4, dtype=torch.long)])


def _encoder(seed=0, noise=0.0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(20, 8, generator=gen)
    bump = torch.randn(20, 8, generator=torch.Generator().manual_seed(99)) * noise

    def forward(input_ids, attention_mask):
        return BaseModelOutput(last_hidden_state=(emb + bump)[input_ids])

    return forward


def test_embedding_cosine_identical_is_one_and_perturbed_is_less():
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 20, (3, 6), generator=gen), torch.ones(3, 6, dtype=torch.long))
               for _ in range(2)]
    ref = _encoder()
    assert quality.embedding_cosine(ref, ref, batches) == pytest.approx(1.0, abs=1e-6)
    slightly = quality.embedding_cosine(ref, _encoder(noise=0.3), batches)
    a_lot = quality.embedding_cosine(ref, _encoder(noise=3.0), batches)
    assert a_lot < slightly < 1.0 - 1e-4


def test_pooling_ignores_masked_positions():
    ids = torch.tensor([[1, 2, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])

    def ref(input_ids, attention_mask=None):
        return torch.ones(1, 5, 4)

    def garbage_in_padding(input_ids, attention_mask=None):
        h = torch.ones(1, 5, 4)
        h[0, 3:] = torch.tensor([-5.0, 7.0, 0.0, 2.0])
        return h

    assert quality.embedding_cosine(ref, garbage_in_padding, [(ids, mask)]) == pytest.approx(1.0)
    without_mask = quality.embedding_cosine(ref, garbage_in_padding, [(ids,)])
    assert without_mask < 0.99


def test_top1_agreement_counts_matching_argmax():
    x = torch.arange(8)

    def ref(inp):
        return torch.nn.functional.one_hot(inp % 4, 4).float()

    def half_wrong(inp):
        cls = torch.where(inp < 4, inp % 4, (inp + 1) % 4)
        return (torch.nn.functional.one_hot(cls, 4).float(),)

    assert quality.top1_agreement(ref, ref, [(x,)]) == 1.0
    assert quality.top1_agreement(ref, half_wrong, [(x[:4],), (x[4:],)]) == pytest.approx(0.5)


def test_output_tensor_picks_the_right_field():
    t = torch.ones(2)
    assert quality.output_tensor(CausalLMOutput(logits=t)) is t
    assert quality.output_tensor(BaseModelOutput(last_hidden_state=t), "last_hidden_state") is t
    assert quality.output_tensor((t, None)) is t
    with pytest.raises(UsageError, match="output tensor"):
        quality.output_tensor("nope")


def test_evaluate_lm_uses_evaluation_split():
    entry = zoo.get("tiny-llama")
    model = entry.load()
    r = quality.evaluate(entry, model, n=3, seq_len=20)
    assert r["metric"] == "perplexity" and r["split"] == "evaluation"
    assert r["n_tokens"] == 3 * 19
    direct = quality.perplexity(model, [b[0] for b in entry.evaluation_batches(3, 20)])
    assert r["value"] == pytest.approx(direct)
    calib = quality.perplexity(model, [b[0] for b in entry.calibration_batches(3, 20)])
    assert calib != pytest.approx(direct)  # a different split, different text
    assert 50 < r["value"] < 1000  # random byte model: about the vocab size


def test_evaluate_encoder_against_the_original():
    entry = zoo.get("tiny-bert")
    model = entry.load()
    same = quality.evaluate(entry, model, n=4, seq_len=24)
    assert same["metric"] == "embedding-cosine" and same["n_samples"] == 4
    assert same["value"] == pytest.approx(1.0, abs=1e-5)
    damaged = entry.load()
    with torch.no_grad():
        damaged.encoder.layer[0].output.dense.weight.mul_(-3.0)
    worse = quality.evaluate(entry, damaged, reference_fn=model, n=4, seq_len=24)
    assert worse["value"] < 0.999


def test_evaluate_vision_agreement():
    entry = zoo.get("tiny-vit")
    model = entry.load()
    r = quality.evaluate(entry, model, n=2, batch=4)
    assert r == {**r, "metric": "top1-agreement", "value": 1.0, "n_samples": 8, "split": "evaluation"}

    def constant(pixel_values):
        out = torch.zeros(pixel_values.shape[0], 10)
        out[:, 3] = 1.0
        return out

    ref_classes = torch.cat([model(*b).logits.argmax(-1) for b in entry.evaluation_batches(2, batch=4)])
    expected = (ref_classes == 3).float().mean().item()
    assert quality.evaluate(entry, constant, n=2, batch=4)["value"] == pytest.approx(expected)
