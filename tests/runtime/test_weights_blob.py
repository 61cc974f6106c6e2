"""runtime/weights_blob.py: an artifact's dense parameters in one member, read back as views
of one tensor; a record that does not fit the blob or the programs is refused (exit 2)."""

import json
import zipfile

import pytest
import torch

from optc.errors import ArtifactError
from optc.runtime import artifact as A
from optc.runtime.weights_blob import ALIGN, BLOB_MEMBER


class Mixed(torch.nn.Module):
    """Parameters of two dtypes and sizes that are not multiples of the alignment, one of
    them a transposed view (not contiguous: it stays in the program), and a buffer."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(5, 3)
        self.b = torch.nn.Linear(3, 7).to(torch.bfloat16)
        self.t = torch.nn.Parameter(torch.randn(7, 2).t())
        self.register_buffer("scale", torch.full((7,), 0.5))

    def forward(self, x):
        h = self.b(self.a(x).to(torch.bfloat16)).float()
        return (h * self.scale) @ self.t.t()


MANIFEST = {"target": "cpu", "config": {}, "passes": [], "quality": None, "model": {"name": "mixed"}}


@pytest.fixture(scope="module")
def model_and_program():
    torch.manual_seed(0)
    m = Mixed().eval()
    return m, torch.export.export(m, (torch.randn(2, 5),), strict=False)


def test_parameters_come_back_as_views_of_one_blob(tmp_path, model_and_program):
    m, ep = model_and_program
    path = A.write_artifact(tmp_path / "m.optc", {"forward": ep}, MANIFEST)
    loaded = A.read_artifact(path)
    record = loaded.manifest["weights_blob"]
    entries = record["entries"]["forward"]
    assert set(entries) == {"a.weight", "a.bias", "b.weight", "b.bias"}  # `t` (a view) and the buffer stay
    assert all(span[0] % ALIGN == 0 for span in entries.values())
    state = loaded.programs["forward"].state_dict
    base = {state[k].untyped_storage().data_ptr() for k in entries}
    assert len(base) == 1  # one tensor holds them all
    for name, t in ep.state_dict.items():
        assert torch.equal(state[name], t) and state[name].dtype == t.dtype, name
    assert isinstance(state["a.weight"], torch.nn.Parameter) and not state["a.weight"].requires_grad
    x = torch.randn(2, 5)
    torch.testing.assert_close(loaded.programs["forward"].module()(x), m(x), rtol=0, atol=0)
    with zipfile.ZipFile(path) as zf:  # the blob holds them and their alignment, nothing more
        assert zf.getinfo(BLOB_MEMBER).file_size == max(offset + nbytes for offset, nbytes, *_ in entries.values())
    assert all(t.device.type != "meta" for t in ep.state_dict.values())  # the program passed in is untouched


def _with_record(src, dst, change):
    """The artifact again, its manifest's weights_blob record changed (its digests kept)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        man = json.loads(zin.read("manifest.json"))
        change(man["weights_blob"])
        for info in zin.infolist():
            if info.filename != "manifest.json":
                zout.writestr(info, zin.read(info.filename))
        zout.writestr("manifest.json", json.dumps(man))
    return dst


@pytest.mark.parametrize("change, message", [
    (lambda r: r["entries"]["forward"]["a.weight"].__setitem__(0, 1 << 40), "outside"),
    (lambda r: r["entries"]["forward"]["a.weight"].__setitem__(0, 1), "misaligned"),
    (lambda r: r["entries"]["forward"]["a.weight"].__setitem__(3, [5, 3]), "does not hold"),
    (lambda r: r["entries"].__setitem__("other", r["entries"]["forward"]), "does not hold"),
    (lambda r: r["entries"]["forward"]["a.weight"].__setitem__(2, "no_such_dtype"), "not a record"),
    (lambda r: r.__setitem__("member", "weights/other.bin"), "not a record"),
])
def test_a_record_that_does_not_fit_is_refused(tmp_path, model_and_program, change, message):
    _, ep = model_and_program
    path = A.write_artifact(tmp_path / "m.optc", {"forward": ep}, MANIFEST)
    bad = _with_record(path, tmp_path / "bad.optc", change)
    with pytest.raises(ArtifactError, match=message) as err:
        A.read_artifact(bad)
    assert err.value.exit_code == 2


def test_the_blob_member_name_is_reserved(tmp_path, model_and_program):
    _, ep = model_and_program
    with pytest.raises(Exception, match="reserved"):
        A.write_artifact(tmp_path / "m.optc", {"forward": ep}, MANIFEST, extra_files={BLOB_MEMBER: b"x"})
    assert not (tmp_path / "m.optc").exists()
