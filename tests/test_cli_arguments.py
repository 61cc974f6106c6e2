"""Counts and sizes on the command line are checked by the parser, before a model
loads: 0 is never read as "the default" (it once was for --batch)."""

import pytest

from optc.cli import build_parser


@pytest.mark.parametrize("argv", [
    ["bench", "tiny-llama", "--batch", "0"],
    ["bench", "tiny-bert", "--seq", "0"],
    ["bench", "tiny-llama", "--tokens", "-3"],
    ["bench", "tiny-llama", "--rounds", "0"],
    ["search", "tiny-llama", "--workers", "0"],
    ["search", "tiny-llama", "--batch", "x"],
    ["search", "tiny-llama", "--trials", "-1"],
    ["compile", "tiny-llama", "--max-cache-len", "0"],
    ["compile", "tiny-llama", "--prefill-len", "0"],
])
def test_a_count_below_its_minimum_is_refused_with_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    flag = next(a for a in argv if a.startswith("--"))
    assert f"argument {flag}: expected an integer of at least" in capsys.readouterr().err


def test_counts_at_their_minimum_are_taken():
    args = build_parser().parse_args(["search", "tiny-llama", "--trials", "0", "--workers", "1", "--batch", "1"])
    assert (args.trials, args.workers, args.batch) == (0, 1, 1)
    assert build_parser().parse_args(["bench", "tiny-llama"]).batch is None  # unset: the workload's default


@pytest.mark.parametrize("argv, words", [
    (["compile", "tiny-llama", "--target", "cpu", "--set", "prune_mlp.ratoi=0.2"], "unknown key 'prune_mlp.ratoi'"),
    (["export", "tiny-llama", "--format", "mlir-torch", "-o", "x.mlir", "--set", "nope.x=1"], "unknown pass 'nope'"),
    (["search", "tiny-llama", "--target", "cpu", "--set", "skip_layers.count=-2"], "skip_layers.count=-2"),
    (["search", "tiny-llama", "--target", "cpu", "--storage", "ftp://nowhere"], "--storage ftp://nowhere"),
    (["export", "x.optc", "--format", "mlir-torch", "-o", "y.mlir", "--set", "prune_mlp.ratio=0.1"],
     "x.optc is compiled already"),
])
def test_bad_settings_and_storage_are_refused_before_the_model_loads(argv, words, capsys, monkeypatch, tmp_path):
    from optc import commands
    from optc.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(commands, "_load_model", lambda *a: pytest.fail("loaded the model before refusing"))
    import optc.search
    monkeypatch.setattr(optc.search, "_session", lambda *a: pytest.fail("loaded the model before refusing"))
    assert main(argv) == 2
    assert words in capsys.readouterr().err


def test_sigterm_interrupts_a_command_like_ctrl_c_and_the_handler_comes_back(monkeypatch, capsys):
    """A scheduler's SIGTERM unwinds the command (what it writes on the way out is written)
    and exits 1; the process's own SIGTERM handler is restored after."""
    import os
    import signal
    import time

    from optc import cli, commands

    def stopped(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not interrupt the command")

    monkeypatch.setattr(commands, "cmd_models", stopped)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["models"]) == 1
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
