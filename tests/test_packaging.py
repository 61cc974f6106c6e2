"""The install maps every package folder under the optc import root."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapped = cfg["package-dir"]
    assert listed == set(mapped), "packages and package-dir must name the same packages"
    found = set()
    for top, package in (("optc", "optc"), ("compiler", "optc.compiler"), ("runtime", "optc.runtime"), ("models", "optc.models")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    assert found == listed, f"unlisted: {sorted(found - listed)}; listed but missing: {sorted(listed - found)}"
    for package, folder in mapped.items():
        assert (ROOT / folder / "__init__.py").exists(), f"{package} -> {folder} has no __init__.py"


def test_entry_points_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["optc"] == "optc.cli:main"
    assert project["entry-points"]["torch_dynamo_backends"]["optc"] == "optc.backend:optc_backend"


def test_requirements_pinned():
    for name in ("requirements.txt", "requirements-models.txt"):
        lines = [ln for ln in (ROOT / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        assert lines and all("==" in ln for ln in lines), f"{name} has an unpinned line"
