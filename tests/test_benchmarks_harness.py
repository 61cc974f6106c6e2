"""One benchmark harness: every script under benchmarks/ writes its result JSON through
benchmarks/harness.py, whose envelope (argv, git commit, date, device and its state,
versions) is the one `optc bench` and `optc search` write too. Read from the source with
`ast`, as tests/test_layering.py reads imports: a script that writes its own JSON fails
here before a result without provenance lands in benchmarks/results/."""

from __future__ import annotations

import ast
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import benchmark_scripts

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# Scripts in benchmarks/ that write no result file, each with why.
NOT_RESULTS = {
    "harness.py": "the library itself",
    "load_phases.py": "times the parts of a load for load_to_first_token.py, which writes the result",
    "readme_table.py": "reads results, writes the markdown tables",
    "results_history.py": "the tables readme_table.py writes into docs/results.md",
    "seed_device_history.py": "appends measured trials to a device's history (a cost-model input, not a result)",
}


def _harness():
    return benchmark_scripts.load("harness")


def _is_json_dumps(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "dumps"
               and isinstance(n.func.value, ast.Name) and n.func.value.id == "json" for n in ast.walk(node))


def raw_json_writes(source: str) -> list[int]:
    """Lines that write JSON without the harness: json.dump(...), or a .write/.write_text
    whose argument is built by json.dumps."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        f = node.func
        if f.attr == "dump" and isinstance(f.value, ast.Name) and f.value.id == "json":
            lines.append(node.lineno)
        elif f.attr in ("write", "write_text") and any(_is_json_dumps(a) for a in node.args):
            lines.append(node.lineno)
    return lines


def calls_write_result(source: str) -> bool:
    tree = ast.parse(source)
    imported = any(isinstance(n, ast.ImportFrom) and n.module == "harness" and
                   any(a.name == "write_result" for a in n.names) for n in ast.walk(tree))
    called = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "write_result"
                 for n in ast.walk(tree))
    return imported and called


def test_the_check_sees_a_raw_write():
    assert raw_json_writes("import json\nPath(o).write_text(json.dumps(r))\n") == [2]
    assert raw_json_writes("import json\nwith open(o, 'w') as f:\n    json.dump(r, f)\n") == [3]
    assert raw_json_writes("import json\nprint(json.dumps(r))\n") == []
    assert not calls_write_result("from harness import envelope\nenvelope()\n")


SCRIPTS = sorted(p for p in BENCH.glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_scripts_that_stay_write_through_the_harness(path):
    source = path.read_text()
    if path.name in NOT_RESULTS:
        return
    assert calls_write_result(source), f"{path.name}: write its result with harness.write_result"
    assert not raw_json_writes(source), f"{path.name}: JSON written past the harness"


@pytest.mark.parametrize("path", sorted((BENCH / "experiments").glob("*.py")), ids=lambda p: p.name)
def test_experiments_write_no_raw_json_either(path):
    assert not raw_json_writes(path.read_text()), f"{path.name}: write results with harness.write_result"


def test_every_not_result_script_exists():
    assert set(NOT_RESULTS) <= {p.name for p in SCRIPTS}, "NOT_RESULTS names a script that is gone"


def test_the_benchmarks_readme_lists_every_script():
    listed = (BENCH / "README.md").read_text()
    scripts = [p.name for p in (*SCRIPTS, *BENCH.glob("*.sh")) if p.name != "harness.py"]
    assert [name for name in scripts if f"`{name}`" not in listed] == []


def test_cli_results_use_the_same_envelope():
    for name in ("runtime/bench.py", "optc/search.py"):
        assert "result_envelope(" in (ROOT / name).read_text(), f"{name} no longer writes result_envelope"


def test_envelope_keys_and_values():
    env = _harness().envelope("cpu")
    assert env["argv"] == sys.argv
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", env["git_commit"]), env["git_commit"]
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip()
        assert env["git_dirty"] is bool(changed)
    else:  # an exported tree or an installed wheel: no commit to name, and no guess either
        assert env["git_commit"] is None and env["git_dirty"] is None
    date = datetime.datetime.fromisoformat(env["date"])
    assert date.tzinfo is not None
    assert abs((datetime.datetime.now(datetime.timezone.utc) - date).total_seconds()) < 600
    assert env["device"] and env["device_type"] == "cpu"
    import torch

    assert env["torch"] == env["versions"]["torch"] == torch.__version__
    assert set(env["versions"]) >= {"torch", "triton", "transformers", "python", "optc"}
    assert env["versions"]["python"] == "{}.{}.{}".format(*sys.version_info[:3])


def test_write_result_merges_the_envelope_and_refuses_to_override_it(tmp_path):
    harness = _harness()
    env = harness.envelope("cpu")
    out = harness.write_result(tmp_path / "new" / "r.json", {"rows": [1, 2]}, env)
    assert json.loads(out.read_text()) == {**env, "rows": [1, 2]}
    with pytest.raises(ValueError, match="date"):
        harness.write_result(out, {"date": "yesterday", "rows": []}, env)
    assert json.loads(out.read_text())["rows"] == [1, 2]  # the refused write left the file as it was
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temporary file behind


def test_load_phases_times_the_wrapped_parts_and_restores_them(monkeypatch):
    """Inside the block a wrapped part's calls are timed; after it every function is the one
    that was there before (here a stand-in for reading a member)."""
    import time

    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    from load_phases import load_phases

    from optc.runtime import member_read

    monkeypatch.setattr(member_read, "read", lambda *a, **k: time.sleep(0.02))
    before_read, before_load = member_read.read, torch.export.load
    with load_phases() as seconds:
        assert member_read.read is not before_read and torch.export.load is not before_load
        member_read.read(None, "m", {})
    assert seconds["members read"] >= 0.02 and set(seconds) == {"members read"}
    assert member_read.read is before_read and torch.export.load is before_load
