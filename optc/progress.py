"""Progress bars for long loops (calibration passes, held-out evaluation): one helper,
so every layer shows progress the same way and one switch turns it off.

A bar goes to stderr, never stdout (`--json` prints its document there and nothing
else), and only where someone watches: stderr is a terminal, the loop has more than
FEW items, and it is still running after DELAY seconds (quick loops stay silent).
OPTC_PROGRESS=0 turns bars off everywhere; OPTC_PROGRESS=1 forces them on even when
stderr is not a terminal (a log file that should show them).

It lives beside errors.py and fileio.py, leaves that every layer (compiler, runtime,
models) may import, because models/ sits below the compiler and must not import it.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

FEW = 4  # loops of at most this many items never get a bar
DELAY = 2.0  # seconds a loop runs before its bar appears
TICK = 1.0  # seconds between two updates of a step's clock (`working`)


def enabled(total: int | None) -> bool:
    setting = os.environ.get("OPTC_PROGRESS", "").strip()
    if setting == "0" or (total is not None and total <= FEW):
        return False
    if setting == "1":
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "batch") -> Iterable[T]:
    """`items`, with a bar on stderr while they are consumed when `enabled`. The bar
    clears itself when the loop ends (leave=False): calibration loops run many times in
    a search, and a finished bar would only push the log up."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if not enabled(total):
        return items
    from tqdm import tqdm

    return tqdm(items, desc=f"[optc] {desc}", total=total, unit=unit, file=sys.stderr, leave=False,
                delay=DELAY, dynamic_ncols=True)


@contextmanager
def working(desc: str) -> Iterator[None]:
    """A clock on stderr for one long step that cannot report progress from inside
    (Inductor lowering a program, AOTInductor compiling a package): the seconds it has
    run, updated every TICK, shown under the same rules as the bars (after DELAY, only
    where someone watches) and cleared when the step ends."""
    if not enabled(None):
        yield
        return
    from tqdm import tqdm

    bar = tqdm(desc=f"[optc] {desc}", total=None, unit="s", file=sys.stderr, leave=False, delay=DELAY,
               bar_format="{desc}: {elapsed}", dynamic_ncols=True)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(TICK):
            bar.update(0)
            bar.refresh()

    clock = threading.Thread(target=tick, daemon=True)
    clock.start()
    try:
        yield
    finally:
        stop.set()
        clock.join()
        bar.close()
