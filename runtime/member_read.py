"""Reading an artifact's members and checking them against the manifest, fast enough for
a model's weights: each member's record carries, beside the sha256 of the whole, the
sha256 of every CHUNK_BYTES slice, which threads check side by side (hashlib lets go of
the GIL while it hashes). A member with chunk digests is read straight from its offset
in the zip, without the zip's CRC-32: the digests cover every byte, and one pass over
two and a half gigabytes of weights is what a load cannot afford twice. A record without
them (an artifact written before) is read and checked whole, as before.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor

CHUNK_BYTES = 64 << 20
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length
_LOCAL_SIGNATURE = b"PK\x03\x04"


def _workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def _chunks(data, size: int | None = None) -> list[memoryview]:
    size = size or CHUNK_BYTES
    view = memoryview(data)
    return [view[i:i + size] for i in range(0, len(view), size)] or [view]


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def record(data) -> dict:
    """The manifest's record of a member: its size, sha256, and the sha256 of each chunk."""
    chunks = _chunks(data)
    with ThreadPoolExecutor(_workers()) as pool:
        whole = pool.submit(_sha256, data)
        digests = list(pool.map(_sha256, chunks))
        return {"sha256": whole.result(), "size": len(data), "chunk_bytes": CHUNK_BYTES, "chunk_sha256": digests}


def mismatch(data, entry: dict) -> str | None:
    """None when `data` is what `entry` recorded; else what differs, for the message."""
    if len(data) != entry["size"]:
        return f"{len(data)} bytes where {entry['size']} were recorded"
    digests = entry.get("chunk_sha256")
    if digests is None:
        digest = _sha256(data)
        return None if digest == entry["sha256"] else \
            f"sha256 {digest[:16]}..., recorded {str(entry['sha256'])[:16]}..."
    size = entry.get("chunk_bytes")
    # The record's own chunk size, so that files written with another one still read;
    # checked before any slicing, so a forged size cannot make millions of slices.
    if (type(size) is not int or size <= 0 or not isinstance(digests, list)
            or len(digests) != max(1, -(-len(data) // size)) or not all(isinstance(d, str) for d in digests)):
        return f"chunk digests that do not fit the member ({size!r} bytes a chunk)"
    with ThreadPoolExecutor(_workers()) as pool:
        found = list(pool.map(_sha256, _chunks(data, size)))
    bad = next((i for i, (a, b) in enumerate(zip(found, digests)) if a != b), None)
    return None if bad is None else f"chunk {bad} hashes to {found[bad][:16]}..., recorded {digests[bad][:16]}..."


def read(zf: zipfile.ZipFile, member: str, entry: dict) -> bytes | bytearray:
    """The member's bytes: straight from its offset where it is stored uncompressed and
    its record has chunk digests (the caller checks them), else through zipfile."""
    info = zf.getinfo(member)  # KeyError: the caller says the member is missing
    if "chunk_sha256" not in entry or info.compress_type != zipfile.ZIP_STORED:
        return zf.read(member)
    # A handle of its own on the file zipfile opened: the same file even if the path is
    # replaced meanwhile, and zipfile's position is left alone.
    with os.fdopen(os.dup(zf.fp.fileno()), "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size:
            raise zipfile.BadZipFile(f"the local header of {member!r} lies past the end of the file")
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        if signature != _LOCAL_SIGNATURE:
            raise zipfile.BadZipFile(f"bad local header for {member!r}")
        fh.seek(name_len + extra_len, os.SEEK_CUR)
        # Into a buffer of our own: weights are used in place of the bytes read (weights_blob).
        data = bytearray(info.file_size)
        got = fh.readinto(data)
    if got != info.file_size:
        raise EOFError(f"{member!r} ends after {got} of {info.file_size} bytes")
    return data
