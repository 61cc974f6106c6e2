"""Progress bars (optc/progress.py): on stderr only, only for a watched terminal and
more than a few items, off with OPTC_PROGRESS=0; and the long loops use the helper."""

import io
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from optc import progress as P

ROOT = Path(__file__).resolve().parents[1]


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def tty(monkeypatch):
    """Bars shown at once, no OPTC_PROGRESS; the test swaps in a terminal for stderr
    inside its body (pytest's capture replaces sys.stderr after fixtures run)."""
    monkeypatch.setattr(P, "DELAY", 0.0)
    monkeypatch.delenv("OPTC_PROGRESS", raising=False)
    return lambda: (redirect_stderr(_Tty()), redirect_stdout(io.StringIO()))


def test_bar_on_a_terminal_goes_to_stderr(tty):
    err_cm, out_cm = tty()
    with err_cm as err, out_cm as out:
        assert list(P.progress(range(10), "work")) == list(range(10))
    assert "[optc] work" in err.getvalue()
    assert out.getvalue() == ""


@pytest.mark.parametrize("why", ["not a terminal", "OPTC_PROGRESS=0", "few items"])
def test_no_bar(why, tty, monkeypatch):
    items, n = list(range(10)), 10
    err_cm, out_cm = tty()
    if why == "not a terminal":
        err_cm = redirect_stderr(io.StringIO())
    elif why == "OPTC_PROGRESS=0":
        monkeypatch.setenv("OPTC_PROGRESS", "0")
    else:
        items, n = items[:P.FEW], P.FEW
    with err_cm as err, out_cm:
        wrapped = P.progress(items, "work")
        assert wrapped is items  # the iterable itself: no wrapper, nothing written
        assert not P.enabled(n)
        list(wrapped)
    assert err.getvalue() == ""


def test_forced_on_without_a_terminal(tty, monkeypatch):
    monkeypatch.setenv("OPTC_PROGRESS", "1")
    with redirect_stderr(io.StringIO()) as err:
        assert sum(P.progress(iter(range(6)), "work", total=6)) == 15
    assert "[optc] work" in err.getvalue()


def test_quality_evaluation_shows_progress_on_stderr_only(tty):
    """A real long loop (held-out perplexity): the bar is there, stdout stays clean for
    `--json`."""
    from optc.models.quality import perplexity

    batches = [torch.randint(0, 16, (1, 5)) for _ in range(8)]
    err_cm, out_cm = tty()
    with err_cm as err, out_cm as out:
        ppl = perplexity(lambda ids: torch.zeros(*ids.shape, 16), batches)
    assert ppl == pytest.approx(16.0)  # uniform logits over 16 tokens
    assert "[optc] perplexity" in err.getvalue()
    assert out.getvalue() == ""


def test_long_loops_use_the_helper():
    """Calibration and held-out evaluation go through optc.progress, and nothing else
    imports tqdm directly (one switch, one stream)."""
    for rel in ("compiler/calibration.py", "compiler/heldout.py", "compiler/passes/sparsify_report.py",
                "models/quality.py"):
        assert "from optc.progress import progress" in (ROOT / rel).read_text(), rel
    direct = [str(p.relative_to(ROOT)) for top in ("optc", "compiler", "runtime", "models")
              for p in (ROOT / top).rglob("*.py")
              if re.search(r"^\s*(from|import) tqdm", p.read_text(), re.M) and p.name != "progress.py"]
    assert not direct, f"import tqdm through optc.progress instead: {direct}"


def test_a_long_step_shows_its_clock_and_clears_it(tty, monkeypatch):
    """`working` (lowering, packaging): the seconds run, on stderr, only while the step
    runs; nothing where no one watches."""
    import time

    monkeypatch.setattr(P, "TICK", 0.02)
    err_cm, out_cm = tty()
    with err_cm as err, out_cm as out:
        with P.working("lowering decode"):
            time.sleep(0.2)
    shown = err.getvalue()
    assert "[optc] lowering decode: 00:00" in shown
    assert shown.split("\r")[-2].strip() == ""  # the last write blanks the line (leave=False)
    assert out.getvalue() == ""
    with redirect_stderr(io.StringIO()) as quiet:
        with P.working("lowering decode"):
            time.sleep(0.05)
    assert quiet.getvalue() == ""


def test_lowering_and_packaging_show_their_clock():
    for rel, step in (("compiler/session.py", 'working(f"lowering {name}")'),
                      ("compiler/codegen/aoti.py", 'working(f"packaging {name}")')):
        assert step in (ROOT / rel).read_text(), rel
