"""The Lightning callbacks are adapters over the policies: LightningCLI needs each callback's own signature, so the
arguments are spelled twice, and this test keeps the two spellings from drifting apart (same names, same defaults)."""

from __future__ import annotations

import inspect

import pytest

from plasticity_lightning import callbacks, policies

ADAPTED = ["ContinualBackprop", "ReDo", "ShrinkAndPerturb", "L2Init", "HeadReset"]


def parameters(function) -> dict[str, object]:
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if name not in ("self", "model", "optimizer") and parameter.kind is not parameter.VAR_KEYWORD
    }


@pytest.mark.parametrize("name", ADAPTED)
def test_callback_and_policy_take_the_same_arguments_with_the_same_defaults(name: str) -> None:
    adapter = parameters(getattr(callbacks, name).__init__)
    algorithm = parameters(getattr(policies, name).__init__)
    shared = adapter.keys() & algorithm.keys()
    assert len(shared) >= 2, (name, sorted(adapter), sorted(algorithm))
    assert {key: adapter[key] for key in shared} == {key: algorithm[key] for key in shared}
    # every knob of the algorithm reaches it through the callback; only a plain loop hands ReDo its probe batch
    # (the callback draws its own from the training data)
    assert set(algorithm) - set(adapter) <= {"probe"}, sorted(set(algorithm) - set(adapter))


def test_the_slowly_changing_datamodule_passes_the_problems_arguments_with_its_defaults() -> None:
    from plasticity_lightning.data import SlowlyChangingRegression, SlowlyChangingRegressionDataModule

    problem = parameters(SlowlyChangingRegression.__init__)
    module = parameters(SlowlyChangingRegressionDataModule.__init__)
    assert set(problem) <= set(module), sorted(set(problem) - set(module))
    assert {key: module[key] for key in problem} == problem


def test_head_pruning_passes_its_pruner_the_same_arguments_with_the_same_defaults() -> None:
    from plasticity_lightning.policies.heads import IterativeHeadPruner

    adapter = parameters(callbacks.HeadPruning.__init__)
    algorithm = parameters(IterativeHeadPruner.__init__)
    algorithm.pop("owner")
    assert set(algorithm) <= set(adapter) and {key: adapter[key] for key in algorithm} == algorithm
    pruning = callbacks.HeadPruning(fraction=0.2, max_fraction=0.6, tolerance=0.0)
    assert (pruning.pruner.fraction, pruning.pruner.max_fraction, pruning.pruner.tolerance) == (0.2, 0.6, 0.0)
