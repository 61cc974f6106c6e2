#!/usr/bin/env python
"""Run `optc compile` and keep its JSON report as a result file, under the envelope every
result has (argv, commit, date, device, versions: harness.py).

    python benchmarks/compile_result.py OUT.json -- smollm2-135m --target cpu --eval -o x.optc
"""

from __future__ import annotations

import argparse
import sys

from harness import envelope, write_result

from optc import commands
from optc.compiler import targets
from optc.cli import build_parser


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("compile_args", nargs=argparse.REMAINDER, help="-- then `optc compile`'s arguments")
    args = p.parse_args()
    argv = args.compile_args[1:] if args.compile_args[:1] == ["--"] else args.compile_args
    compile_args = build_parser().parse_args(["compile", *argv])
    env = envelope(targets.get(compile_args.target).device)
    result = commands.cmd_compile(compile_args)  # an optc error propagates: no result file is written
    write_result(args.out, {"compile": result}, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
