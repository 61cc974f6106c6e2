"""The .optc format: round trip, and a clear ArtifactError for every kind of bad file."""

import json
import os
import struct
import threading
import time
import zipfile

import pytest
import torch

import optc
from optc.errors import ArtifactError, UsageError
from optc.runtime import artifact as A
from optc.runtime import load_aside


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)
        self.register_buffer("scale", torch.full((4,), 0.5), persistent=False)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x))) * self.scale


MANIFEST = {
    "target": "cpu",
    "config": {"skip_layers": {"count": 2}, "prune_mlp": {"ratio": 0.25}},
    "passes": [{"name": "skip_layers", "applied": True, "seconds": 0.1}],
    "quality": None,
    "model": {"name": "small", "params": 212},
}


@pytest.fixture(scope="module")
def model_and_ep():
    torch.manual_seed(0)
    m = Small().eval()
    ep = torch.export.export(m, (torch.randn(3, 8),), strict=False)
    return m, ep


@pytest.fixture
def art(tmp_path, model_and_ep):
    _, ep = model_and_ep
    return A.write_artifact(tmp_path / "m.optc", {"forward": ep}, MANIFEST,
                            extra_files={"kernels/k.py": b"# kernel\n",
                                         "extra/report.json": b'{"a": 1}'})


def _rewrite(src, dst, mutate):
    """Copy a zip member by member, letting `mutate(name, data, manifest)` change them."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        man = json.loads(zin.read("manifest.json"))
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "manifest.json":
                continue
            zout.writestr(info.filename, mutate(info.filename, data, man))
        zout.writestr("manifest.json", json.dumps(man))
    return dst


def test_round_trip_outputs_and_manifest(art, model_and_ep):
    m, _ = model_and_ep
    programs, man, extra = A.read_artifact(art)
    assert set(programs) == {"forward"}
    torch.manual_seed(123)
    for _ in range(3):
        x = torch.randn(3, 8)
        torch.testing.assert_close(programs["forward"].module()(x), m(x), rtol=0, atol=0)
    assert extra == {"kernels/k.py": b"# kernel\n", "extra/report.json": b'{"a": 1}'}
    assert man["format_version"] == A.FORMAT_VERSION
    assert man["optc_version"] == optc.__version__
    assert man["torch_version"] == torch.__version__
    assert man["config"] == MANIFEST["config"]
    assert man["config_hash"] == A.config_hash(MANIFEST["config"])
    assert man["passes"] == MANIFEST["passes"] and man["target"] == "cpu"
    assert set(man["files"]) == {"programs/forward.pt2", "weights/parameters.bin", "kernels/k.py", "extra/report.json"}
    assert man["files"]["kernels/k.py"]["size"] == len(b"# kernel\n")
    assert "T" in man["created"]
    assert A.read_manifest(art) == man
    with zipfile.ZipFile(art) as zf:  # stored, as documented
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        A.read_manifest(tmp_path / "nope.optc")
    with pytest.raises(ArtifactError, match="does not exist"):
        A.read_artifact(tmp_path / "nope.optc")


def test_truncated_file(art, tmp_path):
    data = art.read_bytes()
    cut = tmp_path / "cut.optc"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a zip archive or it is truncated"):
        A.read_artifact(cut)
    with pytest.raises(ArtifactError, match="truncated"):
        A.read_manifest(cut)


def test_not_a_zip_and_missing_manifest(tmp_path):
    txt = tmp_path / "x.optc"
    txt.write_text("hello")
    with pytest.raises(ArtifactError, match="not a zip"):
        A.read_artifact(txt)
    z = tmp_path / "z.optc"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("programs/forward.pt2", b"x")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        A.read_manifest(z)


@pytest.mark.parametrize("member", ["programs/forward.pt2", "weights/parameters.bin"])
def test_flipped_byte_in_a_member_names_it(art, tmp_path, member):
    # The weights are read and checked on a thread while the programs are deserialised;
    # their refusal reaches the caller all the same.
    with zipfile.ZipFile(art) as zf:
        info = zf.getinfo(member)
    raw = bytearray(art.read_bytes())
    # Local header: 30 fixed bytes, then the name and extra field, then the data.
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0xFF
    bad = tmp_path / "flipped.optc"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError) as ei:
        A.read_artifact(bad)
    msg = str(ei.value)
    assert member in msg and ("damaged" in msg or "checksum" in msg)
    A.read_manifest(bad)  # the manifest itself is intact: inspect still works


def test_checksum_mismatch_names_member(art, tmp_path, monkeypatch):
    member = "programs/forward.pt2"

    def flip(name, data, man):
        if name != member:
            return data
        data = bytearray(data)
        data[len(data) // 2] ^= 0x01
        return bytes(data)

    bad = _rewrite(art, tmp_path / "tampered.optc", flip)  # a valid zip, wrong content
    started, events = [], []

    def slow_import(compile_workers=False, refused=None):  # an import still running when the refusal comes
        events.append(refused)
        started.append(threading.Thread(target=time.sleep, args=(0.5,), daemon=True))
        started[-1].start()
        return started[-1]

    monkeypatch.setattr(load_aside, "import_deserialiser_aside", slow_import)
    with pytest.raises(ArtifactError, match=f"checksum mismatch in member '{member}'"):
        A.read_artifact(bad)
    assert len(started) == 1 and not started[0].is_alive()  # the refusal waited for it: none left running
    assert events[0].is_set()  # and told it: no compile workers start after a refusal


def test_the_deserialiser_is_imported_aside():
    import subprocess
    import sys

    # A fresh process: in this one the deserialiser was imported long ago.
    code = ("import sys; from optc.runtime import load_aside; "
            "before = 'torch._export.serde.serialize' in sys.modules; t = load_aside.import_deserialiser_aside(); "
            "t.join(timeout=120); print(before, t.is_alive(), 'torch._export.serde.serialize' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.stdout.split() == ["False", "False", "True"], out.stderr[-2000:]


def test_compile_workers_start_while_a_gpu_artifact_is_read(art, tmp_path, monkeypatch):
    """optc.load of an artifact for a GPU, on a machine with one, starts Inductor's compile
    workers in the aside thread while it reads; not for a CPU artifact, not without a GPU,
    and not for a caller that only reads (`optc inspect`)."""
    calls = []
    monkeypatch.setattr(load_aside, "warm_compile_workers", lambda: calls.append(1))
    gpu = _with_manifest(art, tmp_path / "gpu.optc", target="h100")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    A.read_artifact(gpu)
    A.read_artifact(art, compile_workers=True)
    assert calls == []
    A.read_artifact(gpu, compile_workers=True)
    assert calls == [1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    A.read_artifact(gpu, compile_workers=True)
    assert calls == [1]

    asked = {}

    def reader(path, **kwargs):
        asked.update(kwargs)
        raise ArtifactError("stop here")

    monkeypatch.setattr(A, "read_artifact", reader)
    with pytest.raises(ArtifactError, match="stop here"):
        optc.load(gpu)
    assert asked.get("compile_workers") is True


def test_unlisted_member_and_unknown_format(art, tmp_path):
    with zipfile.ZipFile(art) as zin, zipfile.ZipFile(tmp_path / "extra.optc", "w") as zout:
        for i in zin.infolist():
            zout.writestr(i.filename, zin.read(i.filename))
        zout.writestr("kernels/evil.py", b"import os")
    with pytest.raises(ArtifactError, match="kernels/evil.py"):
        A.read_manifest(tmp_path / "extra.optc")

    def future(name, data, man):
        man["format_version"] = 99
        return data

    bad = _rewrite(art, tmp_path / "future.optc", future)
    with pytest.raises(ArtifactError, match="format_version 99"):
        A.read_manifest(bad)


def _with_manifest(art, dst, **changes):
    def change(name, data, man):
        man.update(changes)
        return data

    return _rewrite(art, dst, change)


def test_torch_version_mismatch(art, tmp_path, model_and_ep):
    other = _with_manifest(art, tmp_path / "old.optc", torch_version="2.9.1+cu128")
    with pytest.raises(ArtifactError) as ei:
        A.read_artifact(other)
    msg = str(ei.value)
    assert "2.9.1+cu128" in msg and torch.__version__ in msg and "optc compile" in msg
    programs, man, _ = A.read_artifact(other, check_versions=False)
    assert man["torch_version"] == "2.9.1+cu128"
    x = torch.randn(3, 8)
    torch.testing.assert_close(programs["forward"].module()(x), model_and_ep[0](x))


def test_torch_local_suffix_is_ignored(art, tmp_path):
    base = torch.__version__.split("+")[0]
    other = _with_manifest(art, tmp_path / "cuda.optc", torch_version=base + "+cu130")
    programs, _, _ = A.read_artifact(other)
    assert "forward" in programs


def test_optc_version_mismatch(art, tmp_path):
    other = _with_manifest(art, tmp_path / "optc.optc", optc_version="0.0.1")
    with pytest.raises(ArtifactError, match=r"optc 0\.0\.1.*" + optc.__version__.replace(".", r"\.")):
        A.read_artifact(other)
    assert "forward" in A.read_artifact(other, check_versions=False).programs


def test_failed_write_leaves_no_temp_and_keeps_previous(art, tmp_path, model_and_ep, monkeypatch):
    before = art.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(torch.export, "save", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        A.write_artifact(art, {"forward": model_and_ep[1]}, MANIFEST)
    assert art.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.optc"]
    # And a fresh destination is not created at all.
    with pytest.raises(RuntimeError):
        A.write_artifact(tmp_path / "new.optc", {"forward": model_and_ep[1]}, MANIFEST)
    assert sorted(os.listdir(tmp_path)) == ["m.optc"]


def test_write_refuses_bad_input(tmp_path, model_and_ep):
    ep = model_and_ep[1]
    with pytest.raises(UsageError, match="reserved"):
        A.write_artifact(tmp_path / "a.optc", {"forward": ep}, MANIFEST, {"manifest.json": b"{}"})
    with pytest.raises(UsageError, match="safe relative path"):
        A.write_artifact(tmp_path / "a.optc", {"forward": ep}, MANIFEST, {"../x": b""})
    with pytest.raises(UsageError, match="program name"):
        A.write_artifact(tmp_path / "a.optc", {"a/b": ep}, MANIFEST)
    with pytest.raises(UsageError, match="JSON"):
        A.write_artifact(tmp_path / "a.optc", {"forward": ep}, {**MANIFEST, "model": {"x": object()}})
    assert os.listdir(tmp_path) == []


def test_write_refuses_a_manifest_listing_compiled_code_it_was_not_given(tmp_path, model_and_ep):
    # A search once saved its shipped configuration with the compile's manifest but without
    # the kernel cache it lists: every load of that file was refused.
    ep = model_and_ep[1]
    cache = {**MANIFEST, "kernel_cache": {"member": "kernels/inductor_cache.bin", "sha256": "0"}}
    with pytest.raises(UsageError, match="kernels/inductor_cache.bin"):
        A.write_artifact(tmp_path / "a.optc", {"forward": ep}, cache)
    package = {**MANIFEST, "packages": {"format": "aoti", "programs": {"forward": {"member": "packages/forward.pt2"},
                                                                       "decode": {"skipped": "why"}}}}
    with pytest.raises(UsageError, match="packages/forward.pt2"):
        A.write_artifact(tmp_path / "a.optc", {"forward": ep}, package, {"kernels/inductor_cache.bin": b"x"})
    kernels = {**MANIFEST, "kernel_cache": {**cache["kernel_cache"],
                                            "triton_kernels": {"member": "kernels/triton_kernels.zip"}}}
    with pytest.raises(UsageError, match="kernels/triton_kernels.zip"):
        A.write_artifact(tmp_path / "a.optc", {"forward": ep}, kernels, {"kernels/inductor_cache.bin": b"x"})
    assert os.listdir(tmp_path) == []
    A.write_artifact(tmp_path / "a.optc", {"forward": ep}, cache, {"kernels/inductor_cache.bin": b"x"})


def test_config_hash_stable_under_key_order():
    a = {"skip_layers": {"count": 4, "layers": [3, 7]}, "prune_mlp": {"ratio": 0.25}}
    b = {"prune_mlp": {"ratio": 0.25}, "skip_layers": {"layers": [3, 7], "count": 4}}
    h = A.config_hash(a)
    assert h == A.config_hash(b)
    assert len(h) == 16 and int(h, 16) >= 0
    assert h != A.config_hash({**a, "prune_mlp": {"ratio": 0.5}})
    assert A.config_hash({}) == "44136fa355b3678a"  # sha256("{}"): pins the canonical form
