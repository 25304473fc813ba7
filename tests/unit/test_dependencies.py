"""Every third-party package the code imports is declared where it is used, and pinned."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"models", "training", "service", "benchmarks", "tests"}
# Directory -> the requirement groups installed where its code runs.
GROUPS = {
    "models": ("core",),
    "training": ("core", "batch"),  # batch scoring (supportlens-predict --input)
    "service": ("core",),
    "benchmarks": ("core", "bench"),
    "tests": ("core", "test", "batch"),
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> dict[str, set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"core": {_name(r) for r in project["dependencies"]}}
    for extra, requirements in project["optional-dependencies"].items():
        groups[extra] = {_name(r) for r in requirements}
    return groups


def imported_modules(directory: Path) -> set[str]:
    modules = set()
    for path in directory.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules - FIRST_PARTY - set(sys.stdlib_module_names) - {"__future__"}


@pytest.mark.parametrize("directory", sorted(GROUPS))
def test_every_imported_package_is_declared_in_its_extra(directory):
    groups = declared()
    allowed = set().union(*(groups[g] for g in GROUPS[directory]))
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(imported_modules(REPO / directory)):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & allowed:
            missing[module] = sorted(names)
    assert not missing, f"{directory}/ imports packages not declared for it: {missing}"


def test_every_declared_package_is_pinned_in_the_constraints():
    pinned = {
        _name(line)
        for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    unpinned = sorted(set().union(*declared().values()) - pinned)
    assert not unpinned, f"declared but not pinned in requirements/constraints.txt: {unpinned}"
