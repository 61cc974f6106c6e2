#!/usr/bin/env python
"""How long reading an artifact's members and checking them against the manifest takes
(runtime/member_read.py), for artifacts whose records carry per-chunk sha256s (read from
their offset, chunks hashed by threads) and artifacts written before (read through
zipfile, one sha256 of each whole member). Nothing is deserialised: this is the part of
`optc.load` before torch.export.load. Alternating, in one process, after one untimed
pass over each file (so both are in the page cache).

    python benchmarks/experiments/member_verify.py WHOLE.optc CHUNKED.optc --runs 3 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py
from harness import write_result  # noqa: E402
from optc.runtime import member_read  # noqa: E402


def read_and_check(path: Path) -> tuple[float, int, bool]:
    """(seconds, bytes, whether every record had chunk digests)."""
    start = time.perf_counter()
    total, chunked = 0, True
    with zipfile.ZipFile(path) as zf:
        man = json.loads(zf.read("manifest.json"))
        for member, entry in man["files"].items():
            data = member_read.read(zf, member, entry)
            if member_read.mismatch(data, entry) is not None:
                raise SystemExit(f"{path}: {member} does not match its manifest")
            total += len(data)
            chunked &= "chunk_sha256" in entry
    return time.perf_counter() - start, total, chunked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    paths = [Path(a) for a in args.artifacts]
    for p in paths:
        read_and_check(p)
    rows = {str(p): {"seconds": [], "bytes": 0, "chunk_digests": False} for p in paths}
    for _ in range(args.runs):
        for p in paths:
            s, n, chunked = read_and_check(p)
            rows[str(p)]["seconds"].append(round(s, 3))
            rows[str(p)].update(bytes=n, chunk_digests=chunked)
            print(f"{p}: {s:.3f} s ({n / 1e6:.0f} MB, {'chunk digests' if chunked else 'whole sha256'})",
                  file=sys.stderr)
    write_result(args.out, {"runs": args.runs, "cpu_count": os.cpu_count(), "chunk_bytes": member_read.CHUNK_BYTES,
                            "artifacts": rows}, device="cpu")


if __name__ == "__main__":
    main()
