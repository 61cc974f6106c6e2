"""Members checked chunk by chunk (runtime/member_read.py): a flipped byte is refused and
its chunk named, an artifact whose records carry no chunk digests (written before) is
checked whole, a member read from its offset equals zipfile's reading, and a compressed
member goes through zipfile."""

import json
import zipfile

import pytest
import torch

from optc.errors import ArtifactError
from optc.runtime import artifact as A
from optc.runtime import member_read


class Wide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.lin(x)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(member_read, "CHUNK_BYTES", 1024)


@pytest.fixture
def art(tmp_path, small_chunks):
    torch.manual_seed(0)
    m = Wide().eval()
    ep = torch.export.export(m, (torch.randn(2, 64),), strict=False)
    return A.write_artifact(tmp_path / "m.optc", {"forward": ep}, {"target": "cpu"}), m


def _rewrite(src, dst, mutate, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression) as zout:
        man = json.loads(zin.read("manifest.json"))
        for info in zin.infolist():
            if info.filename != "manifest.json":
                zout.writestr(info.filename, mutate(info.filename, zin.read(info.filename), man))
        zout.writestr("manifest.json", json.dumps(man))
    return dst


def test_records_carry_chunk_digests_and_a_member_reads_back_whole(art):
    path, m = art
    man = A.read_manifest(path)
    entry = man["files"]["programs/forward.pt2"]
    assert entry["chunk_bytes"] == 1024 and len(entry["chunk_sha256"]) == -(-entry["size"] // 1024) > 3
    with zipfile.ZipFile(path) as zf:
        assert member_read.read(zf, "programs/forward.pt2", entry) == zf.read("programs/forward.pt2")
    programs, _, _ = A.read_artifact(path)
    x = torch.randn(2, 64)
    torch.testing.assert_close(programs["forward"].module()(x), m(x), rtol=0, atol=0)


def test_a_flipped_byte_names_its_chunk(art, tmp_path):
    path, _ = art
    member = "programs/forward.pt2"

    def flip(name, data, man):
        if name != member:
            return data
        data = bytearray(data)
        data[3 * 1024 + 5] ^= 0x01
        return bytes(data)

    bad = _rewrite(path, tmp_path / "flipped.optc", flip)
    with pytest.raises(ArtifactError, match=f"checksum mismatch in member '{member}' \\(chunk 3 hashes to"):
        A.read_artifact(bad)


def test_records_without_chunk_digests_are_checked_whole(art, tmp_path):
    path, m = art

    def older(name, data, man):
        for entry in man["files"].values():
            entry.pop("chunk_sha256", None)
            entry.pop("chunk_bytes", None)
        return data

    old = _rewrite(path, tmp_path / "older.optc", older)
    programs, _, _ = A.read_artifact(old)
    x = torch.randn(2, 64)
    torch.testing.assert_close(programs["forward"].module()(x), m(x), rtol=0, atol=0)

    def older_and_flipped(name, data, man):
        older(name, data, man)
        return data[:-1] + bytes([data[-1] ^ 1]) if name == "programs/forward.pt2" else data

    bad = _rewrite(path, tmp_path / "older_flipped.optc", older_and_flipped)
    with pytest.raises(ArtifactError, match="checksum mismatch in member 'programs/forward.pt2'"):
        A.read_artifact(bad)


def test_the_records_chunk_size_is_used_and_digests_that_do_not_fit_are_refused(art, tmp_path, monkeypatch):
    path, m = art
    monkeypatch.setattr(member_read, "CHUNK_BYTES", 4096)  # a reader whose own chunk size differs
    programs, _, _ = A.read_artifact(path)
    x = torch.randn(2, 64)
    torch.testing.assert_close(programs["forward"].module()(x), m(x), rtol=0, atol=0)

    def relayout(name, data, man):
        man["files"]["programs/forward.pt2"]["chunk_bytes"] = 2048
        return data

    bad = _rewrite(path, tmp_path / "relayout.optc", relayout)
    with pytest.raises(ArtifactError, match="chunk digests that do not fit the member"):
        A.read_artifact(bad)


def test_a_compressed_member_is_read_through_zipfile(art, tmp_path):
    path, m = art
    packed = _rewrite(path, tmp_path / "deflated.optc", lambda name, data, man: data,
                      compression=zipfile.ZIP_DEFLATED)
    programs, _, _ = A.read_artifact(packed)
    x = torch.randn(2, 64)
    torch.testing.assert_close(programs["forward"].module()(x), m(x), rtol=0, atol=0)


def test_forged_chunk_fields_and_a_damaged_offset_are_refused(art, tmp_path):
    path, _ = art

    def forged(name, data, man):
        man["files"]["programs/forward.pt2"]["chunk_bytes"] = 1  # would be millions of slices
        return data

    with pytest.raises(ArtifactError, match="chunk digests that do not fit the member"):
        A.read_artifact(_rewrite(path, tmp_path / "forged.optc", forged))

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("programs/forward.pt2")
        info.header_offset = path.stat().st_size + 10  # the central directory points past the end
        entry = A.read_manifest(path)["files"]["programs/forward.pt2"]
        with pytest.raises(zipfile.BadZipFile, match="past the end"):
            member_read.read(zf, "programs/forward.pt2", entry)
