"""What importing the package costs: nothing heavy until it is used (each check in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("lightning", "torch", "torchmetrics", "transformers", "torchvision", "sklearn", "matplotlib")


def loaded_after(statement: str) -> set[str]:
    """Top-level packages among HEAVY that ``statement`` imports, run in a fresh interpreter."""
    probe = f"import sys\n{statement}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(result.stdout.split()) & set(HEAVY)


@pytest.mark.parametrize(
    "statement",
    [
        "import plasticity_lightning",
        "import plasticity_lightning.core",
        "import plasticity_lightning.metrics",
        "import plasticity_lightning.reports",
        "from plasticity_lightning.reports.cli import main",  # `plasticity report` reads runs without torch
        "from plasticity_lightning.cli import main, SUBCOMMANDS",  # the entry point dispatches before importing
        "from plasticity_lightning.metrics.continual_summary import first_and_last",
    ],
)
def test_import_loads_nothing_heavy(statement: str) -> None:
    assert loaded_after(statement) == set()


def test_names_load_on_first_use() -> None:
    # the lazy exports resolve to the defining modules' objects, and only then import what those need
    assert loaded_after("import plasticity_lightning as p; p.effective_rank") == loaded_after(
        "import plasticity_lightning.metrics.rank"
    )
    probe = (
        "import plasticity_lightning as p\n"
        "from plasticity_lightning.models.mlp import MLP\n"
        "from plasticity_lightning.metrics.rank import effective_rank\n"
        "assert p.MLP is MLP and p.effective_rank is effective_rank\n"
        "assert set(p.__all__) - {'__version__'} <= set(dir(p))\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_unknown_name_is_an_attribute_error() -> None:
    import plasticity_lightning

    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        plasticity_lightning.NoSuchThing  # noqa: B018


@pytest.mark.parametrize(
    "statement",
    [
        # the trainer-free layer: a plain torch loop pays for torch, nothing else
        "from plasticity_lightning.policies import ContinualBackprop, ShrinkAndPerturb, L2Init",
        "import plasticity_lightning.surgery, plasticity_lightning.probes",
    ],
)
def test_policies_need_torch_only(statement: str) -> None:
    assert loaded_after(statement) <= {"torch"}
