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
from typing import Iterable, TypeVar

T = TypeVar("T")

FEW = 4  # loops of at most this many items never get a bar
DELAY = 2.0  # seconds a loop runs before its bar appears


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
