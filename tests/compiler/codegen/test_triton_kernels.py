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


def _group(directory: Path, key: str, name: str) -> dict:
    (directory / key).mkdir(parents=True)
    paths = {}
    for suffix, content in ((".json", b'{"name": "k"}'), (".cubin", b"\x7fELF binary"), (".ptx", b"// ptx")):
        path = directory / key / f"{name}{suffix}"
        path.write_bytes(content)
        paths[path.name] = str(path)
    return {n: p for n, p in paths.items() if n.endswith(triton_kernels._KEPT_SUFFIXES)}


def test_pack_skips_kernels_whose_files_are_gone(tmp_path):
    groups = {"AAA": _group(tmp_path, "AAA", "k"), "BBB": _group(tmp_path, "BBB", "j")}
    os.remove(groups["BBB"]["j.cubin"])  # removed from Triton's cache since
    data, count = triton_kernels.pack(groups)
    assert count == 1
    assert triton_kernels.pack({"BBB": groups["BBB"]}) == (None, 0)


def test_install_writes_groups_triton_reads(tmp_path, monkeypatch):
    from triton import knobs
    from triton.runtime.cache import FileCacheManager

    data, _ = triton_kernels.pack({"AAA": _group(tmp_path / "compiled", "AAA", "k")})
    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path / "fresh"))
    assert triton_kernels.install(data) == 1
    group = FileCacheManager("AAA").get_group("k.json")
    assert sorted(group) == ["k.cubin", "k.json"]
    assert Path(group["k.cubin"]).read_bytes() == b"\x7fELF binary"
    assert str(tmp_path / "fresh") in group["k.json"]  # paths of this cache, not the compiling machine's


def _record_with_kernels(tmp_path) -> tuple[dict, dict]:
    rec = kernel_cache.Recording(data=b"inductor entries", counts={"inductor": 1},
                                 triton={"AAA": _group(tmp_path, "AAA", "k")})
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
