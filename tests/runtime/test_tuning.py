"""`--tuning-from`: an artifact's chosen kernel configurations written into this
machine's autotune cache before a compile (runtime/tuning.py, codegen/tuned_configs.py).
The CPU records no autotune entries, so the artifact here carries one written by hand
in the format a GPU compile records; that a GPU compile then keeps it is a bench row's
to show (benchmarks/NOTES.md)."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

import pytest
import torch

import optc
from optc.compiler import targets
from optc.compiler.torch_private import autotune_cache_artifacts, fresh_cache_artifacts
from optc.errors import ArtifactError, UsageError
from optc.models import zoo
from optc.runtime.artifact import MANIFEST_NAME
from optc.runtime.tuning import carry_tuning

from cli_process import optc_cli

KEY = os.path.join("ab", "abc123.best_config")
CHOICE = {"XBLOCK": 64, "R0_BLOCK": 512, "num_warps": 4, "num_stages": 1, "configs_hash": "c0ffee",
          "found_by_coordesc": True}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    entry = zoo.get("tiny-llama")
    art = optc.compile(entry.load(), entry.example_inputs(seq_len=8), target="cpu", pipeline_name="none",
                       max_cache_len=32, verify=True, log=lambda m: None)
    return art.save(tmp_path_factory.mktemp("tuning") / "lm.optc")


def _recorded_choice() -> bytes:
    """Serialised cache artifacts holding CHOICE, as `torch.compiler.save_cache_artifacts`
    returns them after a GPU compile tuned one kernel."""
    from torch.compiler._cache import CacheArtifactManager

    with fresh_cache_artifacts():
        CacheArtifactManager.record_artifact("autotune", KEY, CHOICE)
        data, _ = torch.compiler.save_cache_artifacts()
    return data


def _with_kernel_cache(src, dst, data: bytes):
    """`src` with its kernel cache member replaced by `data`, every hash updated."""
    with zipfile.ZipFile(src) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    man = json.loads(members[MANIFEST_NAME])
    rec = man["kernel_cache"]
    members[rec["member"]] = data
    digest = hashlib.sha256(data).hexdigest()
    rec.update(sha256=digest, bytes=len(data))
    man["files"][rec["member"]] = {"sha256": digest, "size": len(data)}
    members[MANIFEST_NAME] = json.dumps(man).encode()
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return dst


def test_only_the_autotune_entries_are_read(lm):
    from optc.compiler.codegen import kernel_cache
    from optc.runtime.artifact import read_members

    man, members = read_members(lm, kernel_cache.members)
    assert list(members) == [man["kernel_cache"]["member"]]  # the CPU records no Triton kernels
    data = members[man["kernel_cache"]["member"]]
    assert man["kernel_cache"]["entries"]["inductor"] >= 2  # compiled graphs, which carrying leaves out
    assert autotune_cache_artifacts(data) == []
    assert [a.key for a in autotune_cache_artifacts(_recorded_choice())] == [KEY]
    assert autotune_cache_artifacts(b"not cache artifacts") is None


def test_the_chosen_configuration_is_written_into_the_autotune_cache(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    art = _with_kernel_cache(lm, tmp_path / "tuned.optc", _recorded_choice())
    carried = carry_tuning(art, targets.get("cpu"))
    assert carried == {"from": str(art), "configs": 1}
    written = tmp_path / "inductor" / KEY
    assert json.loads(written.read_text()) == CHOICE
    assert sorted(p.name for p in (tmp_path / "inductor").rglob("*") if p.is_file()) == ["abc123.best_config"]


def test_an_artifact_without_chosen_configurations_carries_none(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert carry_tuning(lm, targets.get("cpu"))["configs"] == 0


def test_refusals(lm, tmp_path):
    with pytest.raises(UsageError, match="no h100 device here"):
        carry_tuning(lm, targets.get("h100"))
    with zipfile.ZipFile(lm) as zf:
        man = json.loads(zf.read(MANIFEST_NAME))
    man["kernel_cache"]["environment"]["torch"] = "0.0.0"
    other = tmp_path / "other.optc"
    with zipfile.ZipFile(lm) as zf, zipfile.ZipFile(other, "w") as out:
        for info in zf.infolist():
            out.writestr(info.filename, json.dumps(man).encode() if info.filename == MANIFEST_NAME else zf.read(info))
    with pytest.raises(UsageError, match="built in another environment: torch '0.0.0' there"):
        carry_tuning(other, targets.get("cpu"))
    bad = _with_kernel_cache(lm, tmp_path / "bad.optc", b"not cache artifacts")
    with pytest.raises(ArtifactError, match="could not be read by torch"):
        carry_tuning(bad, targets.get("cpu"))


def test_cli_refuses_a_missing_file_before_compiling(tmp_path):
    proc = optc_cli("compile", "tiny-llama", "--target", "cpu", "--tuning-from", str(tmp_path / "none.optc"),
                    "-o", str(tmp_path / "x.optc"), timeout=300)
    assert proc.returncode == 2 and "none.optc" in proc.stderr
    assert not (tmp_path / "x.optc").exists()


def test_bench_records_what_it_carried(lm, tmp_path):
    out = tmp_path / "bench.json"
    proc = optc_cli("bench", "tiny-llama", "--target", "cpu", "--baselines", "", "--tokens", "2", "--rounds", "1",
                    "--max-cache-len", "32", "--tuning-from", str(lm), "--out", str(out), timeout=600,
                    env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["tuning_from"] == {"from": str(lm), "configs": 0}


def test_search_refuses_a_missing_file_before_capturing(tmp_path):
    proc = optc_cli("search", "tiny-llama", "--target", "cpu", "--trials", "1", "--tuning-from",
                    str(tmp_path / "none.optc"), "-o", str(tmp_path / "s"), timeout=300)
    assert proc.returncode == 2 and "none.optc" in proc.stderr and "capturing" not in proc.stderr
