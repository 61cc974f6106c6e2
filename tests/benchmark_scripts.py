"""A script of benchmarks/ loaded as a module in a test, as it runs: with benchmarks/ on
sys.path while it is imported, so its `from harness import ...` resolves. (A plain module:
each test folder's conftest.py shadows `import conftest`.)"""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(script: str):
    """benchmarks/<script>.py as a fresh module."""
    spec = importlib.util.spec_from_file_location(script, BENCHMARKS / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return mod
