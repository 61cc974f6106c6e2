import pytest
import torch

from optc.errors import UsageError
from optc.models import data


def test_splits_partition_the_corpus_once():
    cal, ev = data.text_split("calibration"), data.text_split("evaluation")
    full = data._corpus()
    assert cal + ev == full  # one cut, nothing dropped, nothing shared
    assert abs(len(cal) - len(ev)) <= 1
    assert len(full) > 300_000  # pydoc_data.topics is ~465k characters
    assert data.text_split("calibration") == cal  # deterministic


def test_corpus_is_sorted_topics_joined():
    from pydoc_data.topics import topics

    first = sorted(topics)[0]
    assert data.text_split("calibration").startswith(topics[first])


def test_unknown_split_is_a_usage_error():
    with pytest.raises(UsageError, match="calibration"):
        data.text_split("train")


def test_token_batches_shapes_and_determinism():
    tok = data.ByteTokenizer()
    a = data.token_batches(tok, "calibration", n=3, seq_len=17, batch=2, seed=5)
    assert len(a) == 3
    assert all(x.shape == (2, 17) and x.dtype == torch.long for x in a)
    b = data.token_batches(tok, "calibration", n=3, seq_len=17, batch=2, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = data.token_batches(tok, "calibration", n=3, seq_len=17, batch=2, seed=6)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_windows_come_from_their_own_split_and_do_not_overlap():
    tok = data.ByteTokenizer()
    cal_bytes = data.text_split("calibration").encode()
    ev_bytes = data.text_split("evaluation").encode()
    seq = 64
    for which, own in (("calibration", cal_bytes), ("evaluation", ev_bytes)):
        rows = torch.cat(data.token_batches(tok, which, n=20, seq_len=seq, batch=4, seed=1))
        starts = []
        for row in rows:
            window = bytes(row.tolist())
            pos = own.find(window)
            assert pos >= 0, f"a {which} window is not in the {which} text"
            starts.append(pos)
        starts.sort()
        # With the byte tokenizer a window's byte offset is its token offset.
        assert all(b - a >= seq for a, b in zip(starts, starts[1:])), "windows overlap"


def test_all_windows_are_a_permutation_of_the_split():
    tok = data.ByteTokenizer()
    ids = data.split_tokens(tok, "evaluation")
    seq = 4096
    n_windows = ids.numel() // seq
    rows = torch.cat(data.token_batches(tok, "evaluation", n=n_windows, seq_len=seq, seed=3))
    expected = ids[: n_windows * seq].view(n_windows, seq)
    got = sorted(map(tuple, rows.tolist()))
    assert got == sorted(map(tuple, expected.tolist()))


def test_too_long_a_request_is_a_usage_error():
    tok = data.ByteTokenizer()
    with pytest.raises(UsageError, match="windows"):
        data.token_batches(tok, "evaluation", n=1000, seq_len=4096)
    with pytest.raises(UsageError, match="n >= 1"):
        data.token_batches(tok, "evaluation", n=0, seq_len=16)


class _Wrapped(data.ByteTokenizer):
    prefix_ids = [254]
    suffix_ids = [255]


def test_prefix_and_suffix_wrap_each_window():
    rows = data.token_batches(_Wrapped(), "calibration", n=2, seq_len=10, batch=3)
    for x in rows:
        assert x.shape == (3, 10)
        assert (x[:, 0] == 254).all() and (x[:, -1] == 255).all()
        assert (x[:, 1:-1] < 128).all()  # ASCII text in between
    with pytest.raises(UsageError, match="special tokens"):
        data.token_batches(_Wrapped(), "calibration", n=1, seq_len=2)


def test_byte_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    text = "naïve café — ok"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256


def test_image_batches_deterministic_and_split_specific():
    a = data.image_batches(2, 3, 16, "calibration", seed=0)
    assert len(a) == 2 and a[0].shape == (3, 3, 16, 16) and a[0].dtype == torch.float32
    assert torch.equal(a[1], data.image_batches(2, 3, 16, "calibration", seed=0)[1])
    ev = data.image_batches(2, 3, 16, "evaluation", seed=0)
    assert not torch.allclose(a[0], ev[0])
    other_seed = data.image_batches(2, 3, 16, "calibration", seed=1)
    assert not torch.allclose(a[0], other_seed[0])
    x = torch.cat(a)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    # images differ from one another, not just across splits
    assert (x[0] - x[1]).abs().mean() > 0.05
