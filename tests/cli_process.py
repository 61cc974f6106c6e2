"""`optc ...` in a fresh interpreter, as a user runs it. (A plain module: each test
folder's conftest.py shadows `import conftest`.)"""

import os
import subprocess
import sys


def optc_cli(*args, timeout: int = 600, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """The finished `python -m optc.cli ARGS` with its stdout and stderr as text."""
    return subprocess.run([sys.executable, "-m", "optc.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)
