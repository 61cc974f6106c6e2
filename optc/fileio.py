"""Writing files so that a reader never sees half of one, and checking a member read back
against the hash recorded for it: shared by every layer (the compiler's MLIR emission
and kernel cache, the runtime's artifacts and packages, the search's results), like
errors.py."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from optc.errors import ArtifactError, UsageError


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", encoding: str | None = None):
    """Open a temporary file next to `path`; on success fsync it and rename it onto
    `path`, on any failure remove it. Readers never see a partial file and an existing
    file at `path` survives a failed write."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")
    # Same folder as the destination so that os.replace is a rename on one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            # mkstemp makes the file 0600; keep the mode of the file being replaced.
            os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows).
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def check_member_hash(extra_files: dict, member: str, recorded: str | None, what: str, remedy: str,
                      files: dict | None = None) -> None:
    """Refuse (ArtifactError, exit 2) an artifact member that is missing or whose bytes do
    not hash to `recorded`: the file was changed after it was written, so nothing in it
    is trusted. `what` names the member for the message ("the package 'x'").

    `files`: the manifest's record of every member that these very bytes were checked
    against as they were read (runtime/artifact.read_artifact); the member's sha256
    there is compared instead of hashing the bytes a second time."""
    data = extra_files.get(member)
    if data is None:
        raise ArtifactError(f"the artifact's manifest lists {what} but the file lacks it; {remedy}")
    read_as = ((files or {}).get(member) or {}).get("sha256")
    digest = read_as if isinstance(read_as, str) else hashlib.sha256(data).hexdigest()
    if digest != recorded:
        raise ArtifactError(f"{what} does not match its manifest hash (sha256 {digest[:16]}..., recorded "
                            f"{str(recorded)[:16]}...): the file was modified after it was written; {remedy}")
