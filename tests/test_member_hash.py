"""fileio.check_member_hash: a member is refused when it is missing or its digest is not
the recorded one; bytes already checked as they were read are not hashed again."""

import hashlib

import pytest

from optc import fileio
from optc.errors import ArtifactError

DATA = b"kernel bytes"
SHA = hashlib.sha256(DATA).hexdigest()


def test_bytes_are_hashed_when_nothing_checked_them():
    fileio.check_member_hash({"m": DATA}, "m", SHA, "the member 'm'", "recompile")
    with pytest.raises(ArtifactError, match="does not match its manifest hash"):
        fileio.check_member_hash({"m": DATA + b"!"}, "m", SHA, "the member 'm'", "recompile")
    with pytest.raises(ArtifactError, match="lacks it"):
        fileio.check_member_hash({}, "m", SHA, "the member 'm'", "recompile")


def test_bytes_checked_as_they_were_read_are_not_hashed_again(monkeypatch):
    def no_hash(*args):
        raise AssertionError("hashed a second time")

    monkeypatch.setattr(fileio.hashlib, "sha256", no_hash)
    fileio.check_member_hash({"m": DATA}, "m", SHA, "the member 'm'", "recompile", {"m": {"sha256": SHA}})
    # The file's record names other bytes than this member's own record: refused.
    with pytest.raises(ArtifactError, match="does not match its manifest hash"):
        fileio.check_member_hash({"m": DATA}, "m", SHA, "the member 'm'", "recompile", {"m": {"sha256": "0" * 64}})
