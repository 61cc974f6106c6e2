"""Weights an artifact's programs share are stored once and shared again at load; state a
program writes in place is never shared; a record that names what the file lacks is
refused."""

import json
import zipfile

import pytest
import torch

from optc.errors import ArtifactError
from optc.runtime import artifact as A
from optc.runtime.shared_weights import stored_once


class Cached(torch.nn.Module):
    """Two programs over one set of weights, like an LM's prefill and decode; the head is
    tied to the embedding (one parameter under two names) and a cache is written in place."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 256)
        self.proj = torch.nn.Linear(256, 256)
        self.head = torch.nn.Linear(256, 64, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("cache", torch.zeros(4, 256))

    def forward(self, ids):
        h = self.proj(self.emb(ids))
        self.cache.add_(h.mean(dim=(0, 1)))
        return self.head(h + self.cache[0])


@pytest.fixture(scope="module")
def programs():
    torch.manual_seed(0)
    m = Cached().eval()
    prefill = torch.export.export(m, (torch.randint(0, 64, (1, 8)),), strict=False)
    decode = torch.export.export(m, (torch.randint(0, 64, (1, 1)),), strict=False)
    return {"prefill": prefill, "decode": decode}


MANIFEST = {"target": "cpu", "config": {}, "passes": [], "quality": None, "model": {"name": "cached"}}


def _member_sizes(path):
    with zipfile.ZipFile(path) as zf:
        return {i.filename: i.file_size for i in zf.infolist()}


def test_shared_weights_are_stored_once_and_shared_again(tmp_path, programs):
    path = A.write_artifact(tmp_path / "m.optc", programs, MANIFEST)
    sizes = _member_sizes(path)
    weights = 4 * (64 * 256 + 256 * 256 + 256)
    # each weight once, in the blob (runtime/weights_blob.py); the programs hold graphs and buffers
    assert sizes["weights/parameters.bin"] == weights > 4 * max(sizes["programs/prefill.pt2"],
                                                                 sizes["programs/decode.pt2"]), sizes
    loaded = A.read_artifact(path)
    shared = loaded.manifest["shared_weights"]
    assert set(shared["decode"]) == {"emb.weight", "proj.weight", "proj.bias", "head.weight"}
    assert shared["prefill"] == {"head.weight": ["prefill", "emb.weight"]}  # tied within one program
    assert all("cache" not in links for links in shared.values())  # written in place: each keeps its own
    pre, dec = loaded.programs["prefill"].state_dict, loaded.programs["decode"].state_dict
    assert dec["proj.weight"] is pre["proj.weight"] and pre["head.weight"] is pre["emb.weight"]
    assert dec["cache"] is not pre["cache"]
    ids = torch.randint(0, 64, (1, 1))
    want = programs["decode"].module()(ids)
    assert torch.allclose(loaded.programs["decode"].module()(ids), want)
    assert all(t.device.type != "meta" for t in programs["decode"].state_dict.values())  # left as they were
    # what `optc inspect` reports: five entries linked (decode's four, prefill's tied head);
    # a copy per program would have added decode's embedding (its head too: the same tensor)
    # and projection, the tie within prefill nothing
    assert stored_once(loaded.programs, shared) == (5, 4 * (64 * 256 + 256 * 256 + 256))


def _rewrite_manifest(src, dst, change):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "manifest.json":
                man = json.loads(data)
                change(man)
                data = json.dumps(man).encode()
            zout.writestr(info.filename, data)
    return dst


@pytest.mark.parametrize("change, said", [
    (lambda man: man["shared_weights"]["decode"].update({"proj.weight": ["encoder", "proj.weight"]}),
     "holds no such program"),
    (lambda man: man["shared_weights"].pop("decode"), "without data"),
    (lambda man: man["shared_weights"]["decode"].update({"proj.weight": ["prefill", "proj.bias"]}),
     "does not match"),
    (lambda man: man.update(shared_weights=["decode"]), "not a record"),
    (lambda man: man["shared_weights"]["decode"].update({"proj.weight": "pa"}), "not a record"),
    (lambda man: man["shared_weights"]["decode"].update({"proj.weight": [["prefill"], "x"]}), "not a record"),
])
def test_a_sharing_record_naming_what_the_file_lacks_is_refused(tmp_path, programs, change, said):
    path = A.write_artifact(tmp_path / "m.optc", programs, MANIFEST)
    bad = _rewrite_manifest(path, tmp_path / "bad.optc", change)
    with pytest.raises(ArtifactError, match=said):
        A.read_artifact(bad)


class ZeroSized(Cached):
    """A zero-size buffer: torch.export.save groups a program's tensors by storage pointer,
    and a zero-size tensor's is a meta stand-in's."""

    def __init__(self):
        super().__init__()
        self.register_buffer("empty", torch.zeros(0))

    def forward(self, ids):
        return super().forward(ids) + self.empty.sum()


def test_a_program_with_a_zero_size_tensor_is_stored_whole(tmp_path):
    m = ZeroSized().eval()
    programs = {name: torch.export.export(m, (torch.randint(0, 64, (1, n)),), strict=False)
                for name, n in (("prefill", 8), ("decode", 1))}
    loaded = A.read_artifact(A.write_artifact(tmp_path / "z.optc", programs, MANIFEST))
    assert "decode" not in loaded.manifest["shared_weights"] and "prefill" not in loaded.manifest["shared_weights"]
    ids = torch.randint(0, 64, (1, 1))
    assert torch.allclose(loaded.programs["decode"].module()(ids), programs["decode"].module()(ids))


def test_a_format_1_artifact_with_a_copy_per_program_still_reads(tmp_path, programs, monkeypatch):
    monkeypatch.setattr(A, "strip_shared", lambda progs: (progs, {}))  # as format 1 wrote them
    path = A.write_artifact(tmp_path / "m.optc", programs, MANIFEST)
    old = _rewrite_manifest(path, tmp_path / "old.optc", lambda man: (man.update(format_version=1),
                                                                      man.pop("shared_weights")))
    loaded = A.read_artifact(old)
    pre, dec = loaded.programs["prefill"].state_dict, loaded.programs["decode"].state_dict
    assert dec["proj.weight"] is not pre["proj.weight"] and torch.equal(dec["proj.weight"], pre["proj.weight"])
