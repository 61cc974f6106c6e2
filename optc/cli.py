"""The `optc` command line: compile, inspect, bench, search, export, models.

--json prints one JSON document on stdout and nothing else there; logs and progress
go to stderr. Exit codes: 0 ok, 1 the work failed, 2 bad usage or bad input, 3 no
configuration meets the constraints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import traceback

from optc.errors import InternalError, OptcError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _int_at_least(low: int):
    """argparse type: an integer of at least `low`, so a count or size of 0 (or less) is
    refused before any model loads rather than read as "the default"."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {low}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optc", description="Ahead-of-time inference compiler for PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into an .optc artifact")
    c.add_argument("model", help="zoo name (optc models), a Hugging Face model directory, or file.py:factory")
    _add_pass_options(c)
    c.add_argument("-o", "--output", help="artifact path (default: <model>-<config hash>.optc)")
    c.add_argument("--eval", action="store_true", help="measure quality before/after on the held-out split")
    c.add_argument("--no-verify", action="store_true", help="skip the numerical check of the lowering")
    c.add_argument("--prefill-len", type=_positive_int, default=None,
                   help="decoder LMs: tokens per prefill chunk (default 16), the length the prefill program is "
                        "checked and lowered at (longer: faster on long prompts, more padding on short ones)")
    c.add_argument("--package", default="aoti", choices=["aoti", "none"],
                   help="aoti (default): carry each program compiled by AOTInductor for the target, so that a "
                        "load on the same target and versions runs it without Inductor (the target's device must "
                        "be here; a program that cannot be packaged is skipped, with the reason in the manifest); "
                        "none: the portable programs only, lowered at every load")
    c.add_argument("--json", action="store_true")

    i = sub.add_parser("inspect", help="describe an artifact: model anatomy, passes, quality, versions")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="time optc against eager and torch.compile baselines")
    b.add_argument("model", help="zoo name, Hugging Face directory, or file.py:factory")
    _add_pass_options(b)
    b.add_argument("--baselines", default="eager,hf-static,inductor,inductor-max",
                   help="comma list of eager, hf-static (LMs), inductor, inductor-max, optc-backend (encoders)")
    b.add_argument("--tokens", type=_positive_int, default=64, help="decode steps timed per run (LMs)")
    b.add_argument("--batch", type=_positive_int, default=None,
                   help="batch size: LMs decode at it (default 1), encoders run forwards of it (default: the "
                        "model's example batch)")
    b.add_argument("--seq", type=_positive_int, default=None, help="text encoders: sequence length (default: the model's)")
    b.add_argument("--variant", action="append", default=[], metavar="'PASS.KEY=V [PASS.KEY=V ...]'",
                   help="one more optc row, its settings separated by spaces (repeatable; --set/--config "
                        "settings are the first such row); target.FIELD=V words change how that row is "
                        "lowered (target.decode_attention=true, target.inductor.OPTION=V, target.decoder_inductor.OPTION=V)")
    b.add_argument("--no-autotune", action="store_true",
                   help="lower optc's forward programs without Inductor's max-autotune (minutes faster; "
                        "the decode step never autotunes; the baselines keep their own modes)")
    b.add_argument("--rounds", type=_positive_int, default=3,
                   help="LMs: after all optc rows are compiled, time them round-robin this many times in all "
                        "and pool the runs (keeps every row's compiled program in memory; 1: time each once)")
    b.add_argument("--artifact", action="append", default=[], metavar="FILE.optc",
                   help="also time a saved artifact of MODEL as optc.load runs it (its kernel cache and "
                        "lowering; the row records load time and cache hits); repeatable")
    b.add_argument("--out", help="also write the JSON result to this file (rewritten after every row, marked "
                   "\"partial\" until the run is complete)")
    b.add_argument("--json", action="store_true")

    s = sub.add_parser("search", help="search pass settings against measured latency under a quality limit")
    s.add_argument("model", help="zoo name, Hugging Face directory, or file.py:factory")
    s.add_argument("--target", default="auto", help="cpu, h100, h200, a100 or auto (the device present)")
    s.add_argument("--trials", type=_int_at_least(0), default=20, help="trials to run now (added to a resumed study)")
    s.add_argument("--max-quality-loss", type=float, default=0.05,
                   help="LMs: relative perplexity increase; encoders: 1 - cosine; classifiers: top-1 disagreement")
    s.add_argument("--storage", help="journal file path (default: OUT/STUDY.journal), postgresql://... or sqlite:///...")
    s.add_argument("--study", help="study name (default: MODEL-TARGET); workers and hosts share a study by name")
    s.add_argument("--workers", type=_positive_int, default=1, help="worker processes on this host, one per visible GPU")
    s.add_argument("--pipeline", default="default", help="named pipeline whose passes are searched")
    s.add_argument("--set", action="append", default=[], metavar="PASS.KEY=VALUE",
                   help="fix a setting (it is then not searched)")
    s.add_argument("--config", help="JSON file of fixed pass settings")
    s.add_argument("-o", "--output", default="optc-search", help="folder for the journal, JSON, plot and artifact")
    s.add_argument("--tokens", type=_positive_int, default=32, help="decode steps timed per measurement (LMs)")
    s.add_argument("--batch", type=_positive_int, default=None, help="batch size measured (default 1)")
    s.add_argument("--measure-all", action="store_true", help="measure every trial (no cost-model estimates)")
    s.add_argument("--no-artifact", action="store_true", help="do not compile the best configuration at the end")
    s.add_argument("--package", default="aoti", choices=["aoti", "none"],
                   help="the shipped artifact's compiled code, as `optc compile --package` (aoti, the default: "
                        "AOTInductor packages where the target allows; none: the portable programs and the "
                        "kernel cache)")
    s.add_argument("--confirm-rounds", type=_int_at_least(0), default=3,
                   help="time the shipped configuration and dense again at the end, alternating, this many rounds "
                        "in one process (0: do not)")
    s.add_argument("--seed", type=int, default=None, help="sampler seed")
    s.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no new trial after this long (each worker); the best configuration's artifact "
                        "and the side-by-side timing come after it")
    s.add_argument("--lowering", default="target", choices=["target", "plain"],
                   help="how trials are lowered for measurement: the target's Inductor options (what ships), "
                        "or plain Inductor without coordinate-descent tuning or max-autotune (faster trials)")
    _add_calibration_option(s)
    _add_tuning_option(s)
    s.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a process of --workers N
    s.add_argument("--json", action="store_true")

    e = sub.add_parser("export", help="emit the optimised graph as MLIR through torch-mlir")
    e.add_argument("model", help="zoo name, Hugging Face directory, file.py:factory, or an .optc artifact")
    e.add_argument("--format", required=True, choices=["mlir-torch", "mlir-linalg", "stablehlo"])
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--program", help="which program: forward, or a decoder LM's prefill (default) or decode")
    e.add_argument("--json", action="store_true")
    _add_pass_options(e)

    m = sub.add_parser("models", help="list the model zoo")
    m.add_argument("--json", action="store_true")
    return p


def _add_pass_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="auto", help="cpu, h100, h200, a100 or auto (the device present)")
    p.add_argument("--pipeline", default="default", help="named pipeline: none, default")
    p.add_argument("--set", action="append", default=[], metavar="PASS.KEY=VALUE", help="a pass setting (repeatable)")
    p.add_argument("--config", help="JSON file of pass settings: {\"skip_layers\": {\"count\": 4}} or flat keys")
    p.add_argument("--max-cache-len", type=_positive_int, default=256, help="static KV cache length of decoder LMs")
    p.add_argument("--dynamic", default="", help="comma list of dynamic dimensions: batch, seq")
    _add_calibration_option(p)
    _add_tuning_option(p)


def _add_tuning_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tuning-from", metavar="FILE.optc",
                   help="start every kernel from the configuration that FILE's compile chose for it (an artifact "
                        "of this optc for the same target, compiled on this kind of GPU); kernels it lacks are "
                        "tuned as usual. Two compiles then run the same configurations")


def _add_calibration_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", metavar="PATH",
                   help="calibration data for lossy passes: a text file (causal LMs with a tokenizer) "
                        "or a .pt list of input tuples (any model); default: the zoo's or the directory's data")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a job scheduler's or `timeout`'s stop) unwinds as Ctrl-C does, so that what
    is written on the way out (a search's report) is written; the previous handler after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        # None: a handler installed outside Python, which cannot be put back from here
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: list[str] | None = None) -> int:
    with _sigterm_as_interrupt():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from optc import commands

    handler = getattr(commands, f"cmd_{args.command}")
    try:
        result = handler(args)
    except OptcError as exc:
        partial = getattr(exc, "result", None)  # e.g. bench rows measured before a variant failed
        if getattr(args, "json", False) and partial is not None:
            print(json.dumps(partial, indent=2, default=str))
        if os.environ.get("OPTC_DEBUG"):
            traceback.print_exc()
        _log(f"optc {args.command}: error: {exc}" + (" (a bug in optc; set OPTC_DEBUG=1 for the traceback)"
                                                    if isinstance(exc, InternalError) else ""))
        return exc.exit_code
    except KeyboardInterrupt:
        _log("optc: interrupted")
        return 1
    except Exception as exc:  # a bug or an unexpected failure: one line, traceback on request
        if os.environ.get("OPTC_DEBUG"):
            traceback.print_exc()
        _log(f"optc {args.command}: failed: {type(exc).__name__}: {exc} (set OPTC_DEBUG=1 for the traceback)")
        return 1
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
