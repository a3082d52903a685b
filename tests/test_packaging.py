"""Packaging: every package the library imports is declared, and every declared floor is one `.ci/floors` tests.

`.ci/floors` installs the package with each direct dependency at the version `.ci/floors.txt` pins and runs the
test suite there; this file keeps that pin list and `pyproject.toml` from drifting apart.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# optional at run time: imported inside a function that says which extra to install when it is missing
OPTIONAL_IMPORTS = {"optuna", "optuna_integration", "ray", "wandb", "tensorboard", "pyarrow"}


def _requirements(names: list[str]) -> dict[str, Requirement]:
    found = {}
    for text in names:
        requirement = Requirement(text)
        if not requirement.name.startswith("plasticity"):
            found[canonicalize_name(requirement.name)] = requirement
    return found


def _floors_pinned() -> dict[str, Version]:
    pins = {}
    for line in (REPO / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _floor(requirement: Requirement) -> Version | None:
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    return max(floors) if floors else None


def _imported_top_level_modules() -> set[str]:
    modules = set()
    for path in (REPO / "plasticity_lightning").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"plasticity_lightning"}


def test_every_imported_package_is_declared():
    runtime = set(_requirements(PYPROJECT["dependencies"]))
    distributions = packages_distributions()
    undeclared = []
    for module in sorted(_imported_top_level_modules() - OPTIONAL_IMPORTS):
        names = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if not names & runtime:
            undeclared.append(f"{module} (from {sorted(names)})")
    assert undeclared == [], "add these to [project.dependencies] with a floor that .ci/floors tests"


def test_optional_imports_belong_to_an_extra():
    extras = {name for group in PYPROJECT["optional-dependencies"].values() for name in _requirements(group)}
    distributions = packages_distributions()
    for module in OPTIONAL_IMPORTS - {"pyarrow"}:  # pyarrow: Parquet export only; its error names the install
        assert {canonicalize_name(d) for d in distributions.get(module, [module])} & extras, module


# every group .ci/floors installs (`.[test]` pulls in all but the mutation tool)
GROUPS = ["dependencies", *sorted(set(PYPROJECT["optional-dependencies"]) - {"mutation"})]


@pytest.mark.parametrize("group", GROUPS)
def test_every_floor_is_pinned_for_the_floors_job(group):
    declared = PYPROJECT["dependencies"] if group == "dependencies" else PYPROJECT["optional-dependencies"][group]
    pins = _floors_pinned()
    wrong = []
    for name, requirement in _requirements(declared).items():
        floor = _floor(requirement)
        assert floor is not None, f"{requirement}: give a floor (>=)"
        pinned = pins.get(name)
        # the pin is the floor, or a release of the floor's series (pytest-timeout 2.3.0 was never published)
        if pinned is None or pinned < floor or pinned.release[: len(floor.release)] != floor.release:
            wrong.append(f"{requirement} vs .ci/floors.txt {pinned}")
    assert wrong == []


def test_the_floors_job_installs_the_pins_and_runs_the_readme_tests():
    script = (REPO / ".ci" / "floors").read_text()
    assert re.search(r"pip install [^\n]*-c \.ci/floors\.txt", script)
    assert "pytest" in script


def test_the_floors_job_runs_on_the_lowest_python_the_package_allows():
    (floor,) = [spec.version for spec in SpecifierSet(PYPROJECT["requires-python"]) if spec.operator == ">="]
    assert re.findall(r"\b(python[\d.]*) -m venv", (REPO / ".ci" / "floors").read_text()) == [f"python{floor}"]
    assert f'target-version = "py{floor.replace(".", "")}"' in (REPO / "pyproject.toml").read_text()  # ruff's
