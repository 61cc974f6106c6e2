"""An unknown package format is refused (exit 2) before any work, by `optc.compile` and by
the search (whose shipped artifact would otherwise fail after every trial ran)."""

import pytest
import torch

import optc
from optc.errors import UsageError
from optc.search import SearchRequest, search


def test_compile_refuses_an_unknown_package_format_before_the_capture(tmp_path):
    with pytest.raises(UsageError, match=r"package='zip': expected one of aoti, none"):
        optc.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),), target="cpu", package="zip")


def test_search_refuses_it_before_any_trial(tmp_path):
    req = SearchRequest(model="tiny-llama", target="cpu", trials=1, package="zip", out_dir=str(tmp_path))
    with pytest.raises(UsageError, match=r"--package 'zip': expected one of aoti, none"):
        search(req, log=lambda m: None)
    assert not any(tmp_path.iterdir())  # nothing written
