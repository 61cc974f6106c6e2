"""The Triton kernels the compile-time check compiled travel in the artifact
(codegen/triton_kernels.py): recorded through Triton's compilation listener, packed as
metadata and binary, written into an empty Triton cache at load, where Triton then finds
them instead of compiling; a tampered pack is refused like the rest of the kernel cache."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optc.compiler.codegen import kernel_cache, triton_kernels
from optc.compiler.targets import get as get_target
from optc.errors import ArtifactError

SCRIPT = Path(__file__).with_name("triton_cache_round_trip.py")


def test_a_recorded_kernel_is_a_cache_hit_on_an_empty_cache():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["listener_restored"]
    assert out["packed"] == 1  # the kernel compiled before the recording is not shipped
    assert out["shipped_files"] == ["cubin", "json"]  # metadata and binary, not the IRs
    assert out["written"] == 1 and out["written_again"] == 0  # a kernel already cached is left alone
    assert out["hit_in_fresh_cache"] and out["same_binary"]
    assert out["unshipped_compiled"]  # the check's sanity: what was not shipped is compiled


KEY_A, KEY_B = "A" * 52, "B" * 52  # the shape of Triton's keys (base32 of a sha256)


def _group(directory: Path, key: str, name: str) -> dict:
    (directory / key).mkdir(parents=True)
    paths = {}
    for suffix, content in ((".json", b'{"name": "k"}'), (".cubin", b"\x7fELF binary"), (".ptx", b"// ptx")):
        path = directory / key / f"{name}{suffix}"
        path.write_bytes(content)
        paths[path.name] = str(path)
    return {n: p for n, p in paths.items() if n.endswith(triton_kernels._KEPT_SUFFIXES)}


def test_pack_skips_kernels_whose_files_are_gone(tmp_path):
    groups = {KEY_A: _group(tmp_path, KEY_A, "k"), KEY_B: _group(tmp_path, KEY_B, "j")}
    os.remove(groups[KEY_B]["j.cubin"])  # removed from Triton's cache since
    data, count = triton_kernels.pack(groups)
    assert count == 1
    assert triton_kernels.pack({KEY_B: groups[KEY_B]}) == (None, 0)


def test_install_writes_groups_triton_reads(tmp_path, monkeypatch):
    from triton.runtime.cache import FileCacheManager

    data, _ = triton_kernels.pack({KEY_A: _group(tmp_path / "compiled", KEY_A, "k")})
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "fresh"))
    assert triton_kernels.install(data) == 1
    group = FileCacheManager(KEY_A).get_group("k.json")
    assert sorted(group) == ["k.cubin", "k.json"]
    assert Path(group["k.cubin"]).read_bytes() == b"\x7fELF binary"
    assert str(tmp_path / "fresh") in group["k.json"]  # paths of this cache, not the compiling machine's


def test_install_goes_where_inductors_kernels_look(tmp_path, monkeypatch):
    """With TRITON_CACHE_DIR unset, Inductor's first kernel sets it to a directory in
    Inductor's cache: the kernels must be written there, not to Triton's default."""
    from triton.runtime.cache import FileCacheManager

    data, _ = triton_kernels.pack({KEY_A: _group(tmp_path / "compiled", KEY_A, "k")})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert triton_kernels.install(data, device_index=1) == 1
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "inductor" / "triton" / "1")
    assert FileCacheManager(KEY_A).get_group("k.json")["k.cubin"].startswith(str(tmp_path / "inductor"))
    assert not (tmp_path / "home").exists()


def test_host_modules_travel_with_the_kernels(tmp_path, monkeypatch):
    """A host module (a kernel's launcher) that Triton builds or reads inside the recording
    is packed, and written at load where Triton's build looks for it: the same key, in
    the fresh cache; other files of the cache are not shipped, and the cache manager is
    Triton's own again after the recording."""
    import sysconfig

    from triton import knobs
    from triton.runtime.cache import get_cache_manager

    name = "__triton_launcher" + sysconfig.get_config_var("EXT_SUFFIX")
    source_key = hashlib.sha256(b"a launcher's C source").hexdigest()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "compile"))
    before = knobs.cache.manager_class
    with triton_kernels.recording() as groups:
        get_cache_manager(source_key).put(b"\x7fELF launcher", name, binary=True)  # what a build stores
        get_cache_manager(source_key).put(b"not a module", "notes.txt")
    assert knobs.cache.manager_class is before
    groups[KEY_A] = _group(tmp_path / "compiled", KEY_A, "k")
    data, count = triton_kernels.pack(groups)
    assert count == 1  # kernels are counted; modules travel beside them
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "fresh"))
    assert get_cache_manager(source_key).get_file(name) is None
    assert triton_kernels.install(data) == 1
    path = get_cache_manager(source_key).get_file(name)
    assert path.startswith(str(tmp_path / "fresh")) and Path(path).read_bytes() == b"\x7fELF launcher"
    assert get_cache_manager(source_key).get_file("notes.txt") is None
    # Modules travel without kernels too (the launchers of kernels Inductor's workers compiled).
    only = {k: g for k, g in groups.items() if triton_kernels._is_module(g)}
    data, count = triton_kernels.pack(only)
    assert count == 0 and data is not None
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "fresh2"))
    assert triton_kernels.install(data) == 0 and get_cache_manager(source_key).get_file(name) is not None


def test_install_skips_what_a_cache_hit_could_not_read(tmp_path, monkeypatch):
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{KEY_A}/k.json", b"{}")  # no binary: a hit would fail in Triton
        archive.writestr(f"{KEY_B}/../../escape.json", b"{}")  # not a file of the cache
        archive.writestr("not-a-key/j.json", b"{}")
        archive.writestr("not-a-key/j.cubin", b"x")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "fresh"))
    assert triton_kernels.install(buffer.getvalue()) == 0
    assert not (tmp_path / "escape.json").exists() and not list((tmp_path / "fresh").rglob("*.json"))


def test_a_cache_that_cannot_be_written_warns_and_the_load_goes_on(tmp_path, monkeypatch):
    files, manifest = _record_with_kernels(tmp_path)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "file" / "cache"))  # under a file: cannot be made
    with pytest.warns(UserWarning, match="compiled here instead"):
        assert kernel_cache.install_triton_kernels(manifest, files) == {"triton_kernels": 0}
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    assert kernel_cache.install_triton_kernels(manifest, files) == {"triton_kernels": 1}
    assert kernel_cache.install_triton_kernels({"kernel_cache": {}}, files) == {}


def _record_with_kernels(tmp_path) -> tuple[dict, dict]:
    rec = kernel_cache.Recording(data=b"inductor entries", counts={"inductor": 1},
                                 triton={KEY_A: _group(tmp_path, KEY_A, "k")})
    files, record = kernel_cache.package(rec, get_target("cpu"), ["forward"])
    return files, {"kernel_cache": record}


def test_the_kernel_cache_record_carries_the_triton_pack(tmp_path):
    files, manifest = _record_with_kernels(tmp_path)
    kernels = manifest["kernel_cache"]["triton_kernels"]
    assert kernels["member"] == triton_kernels.MEMBER and kernels["kernels"] == 1
    assert kernels["sha256"] == hashlib.sha256(files[triton_kernels.MEMBER]).hexdigest()
    kernel_cache.check_hash(manifest, files)  # intact: no error


def test_a_tampered_triton_pack_is_refused(tmp_path):
    files, manifest = _record_with_kernels(tmp_path)
    data = bytearray(files[triton_kernels.MEMBER])
    data[len(data) // 2] ^= 0xFF
    files[triton_kernels.MEMBER] = bytes(data)
    with pytest.raises(ArtifactError, match="triton_kernels.zip.*modified after it was written"):
        kernel_cache.check_hash(manifest, files)
    del files[triton_kernels.MEMBER]
    with pytest.raises(ArtifactError, match="lacks it"):
        kernel_cache.check_hash(manifest, files)


def test_the_compile_report_names_the_triton_pack(tmp_path, capsys):
    from optc import commands

    _, manifest = _record_with_kernels(tmp_path)
    commands._report_kernel_cache(manifest["kernel_cache"])
    assert "1 Triton kernels the check compiled" in capsys.readouterr().err
