"""The import-layer contract: each folder of the package imports only from the layers below it (DESIGN.md).

Every ``import plasticity_lightning.<layer>...`` statement counts, at module level or inside a function, except those
under ``if TYPE_CHECKING:`` (hints only). The package's own ``__init__`` and ``__main__`` re-export everything and
are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "plasticity_lightning"

# lowest first; a layer may import its own folder and any layer with a smaller rank
RANKS = {
    "core": 0,
    "nn": 1,
    "metrics": 2,
    "probes": 3,
    "surgery": 4,
    "losses": 5,
    "optim": 5,
    "policies": 6,  # the algorithms without a trainer
    "callbacks": 7,  # Lightning adapters over policies/
    "models": 8,
    "data": 8,
    "studies": 9,
    "reports": 9,
    "cli": 10,
    "tune": 11,  # runs `plasticity fit` trials through cli
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every plasticity_lightning import in ``path`` outside ``if TYPE_CHECKING:``."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.lineno, child.module))
            visit(child)

    visit(ast.parse(path.read_text()))
    return [(line, name) for line, name in found if name.startswith("plasticity_lightning.")]


def test_every_folder_has_a_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(RANKS), "add the new folder to RANKS (and to DESIGN.md's layer list)"


@pytest.mark.parametrize("layer", sorted(RANKS))
def test_layer_imports_only_from_below(layer: str) -> None:
    wrong = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, name in imports_of(path):
            target = name.split(".")[1]
            if target != layer and RANKS.get(target, -1) >= RANKS[layer]:
                where = path.relative_to(PACKAGE.parent)
                wrong.append(f"{where}:{line} imports {name} ({target} is not below {layer})")
    assert wrong == []


def test_the_contract_catches_an_upward_import(tmp_path: Path) -> None:
    # the checker itself: an upward import is found, a TYPE_CHECKING one is not
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "import plasticity_lightning.callbacks\n"
        "if TYPE_CHECKING:\n"
        "    from plasticity_lightning.cli import main\n"
        "def f():\n"
        "    from plasticity_lightning.models.mlp import MLP\n"
    )
    assert imports_of(module) == [(2, "plasticity_lightning.callbacks"), (6, "plasticity_lightning.models.mlp")]
