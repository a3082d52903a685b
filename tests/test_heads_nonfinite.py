"""Head pruning, growth and the plasticity cycle never decide on NaN/inf statistics: the step is skipped, counted in
``<prefix>/skipped_nonfinite`` (logged and checkpointed) and the first skip warns, as CBP and ReDo do."""

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from test_head_growth import _cycle, _CycleLM, _fit_cycle
from test_heads import _LM, _token_loaders

from plasticity_lightning import HeadGrowth, HeadImportance, HeadPruning, PlasticityCycle
from plasticity_lightning.policies.heads import NonFiniteScores, heads_to_grow, lowest_heads


def _nonfinite_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "NaN/inf" in str(w.message)]


def test_choices_refuse_nonfinite_scores_of_the_candidates_only():
    alive = torch.tensor([[True, True, False], [True, True, True]])
    scores = torch.tensor([[0.3, math.nan, 0.1], [0.2, 0.4, 0.5]])
    with pytest.raises(NonFiniteScores, match="head scores by 'importance' are NaN/inf"):
        lowest_heads(scores, alive, 1)
    # a NaN on a head that is not a candidate (already pruned) decides nothing
    assert lowest_heads(scores, torch.tensor([[True, False, False], [True, True, True]]), 1) == [(1, 0)]
    gates = alive.float()  # head (0, 2) is dead: the only candidate for growth
    assert heads_to_grow("gradient", gates, 1, torch.tensor([[math.inf, 0.0, 0.2], [0.0] * 3])) == [(0, 2)]
    with pytest.raises(NonFiniteScores, match="'entropy'"):
        heads_to_grow("entropy_gap", gates, 1, torch.tensor([[0.0, 0.0, math.inf], [0.0] * 3]))


class _Perplexities(_LM):
    """Logs the given validation perplexities, one per epoch (the model itself is not judged)."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def validation_step(self, batch, batch_idx):
        self.log("val/perplexity", float(self.values[self.current_epoch]))


def test_pruning_skips_a_nan_perplexity_without_taking_it_as_the_baseline(tmp_path):
    _, train, val = _token_loaders()
    pruning = HeadPruning(fraction=0.25, max_fraction=0.5, tolerance=0.05)
    trainer = make_trainer(
        tmp_path, callbacks=[HeadImportance(num_batches=6), pruning], max_epochs=3, num_sanity_val_steps=0
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_Perplexities([math.nan, 10.0, 10.25]), train, val)
    # epoch 0 skipped; epoch 1 is the baseline (a NaN baseline would make every later step a "failure" or none)
    assert [(h["epoch"], h["perplexity"], len(h["pruned"]), h["reverted"]) for h in pruning.history] == [
        (1, 10.0, 3, False),
        (2, 10.25, 3, False),
    ]
    assert pruning.baseline == 10.0 and pruning.skipped_nonfinite == 1
    assert trainer.callback_metrics["heads/skipped_nonfinite"].item() == 1
    (message,) = _nonfinite_warnings(caught)
    assert "HeadPruning: the statistics of 'val/perplexity' are NaN/inf at step 6" in message
    restored = HeadPruning()
    restored.load_state_dict(pruning.state_dict())
    assert restored.skipped_nonfinite == 1


class _Frozen(_Perplexities):
    """Trains a parameter of its own: the model's weights (and a NaN planted in them) stay as they are."""

    def __init__(self, values):
        super().__init__(values)
        self.other = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.other**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.other], lr=0.1)


def test_pruning_skips_nan_importance(tmp_path):
    _, train, val = _token_loaders()
    module = _Frozen([10.0, 10.0])
    with torch.no_grad():  # head 1 of layer 0 has a NaN weight: its norm, and its layer's normalised scores, are NaN
        module.model.transformer.h[0].attn.c_attn.weight[0, 9] = math.nan
    importance = HeadImportance(num_batches=6, method="weight_magnitude")
    pruning = HeadPruning(fraction=0.25, tolerance=1.0)
    trainer = make_trainer(tmp_path, callbacks=[importance, pruning], max_epochs=2, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train, val)
    assert pruning.history == [] and pruning.skipped_nonfinite == 2 and bool((importance.gates.mask == 1).all())
    assert torch.isnan(importance.importance[0]).all() and torch.isfinite(importance.importance[1:]).all()
    assert len(_nonfinite_warnings(caught)) == 1  # one warning per statistic, however many skips


class _GateOff(pl.Callback):
    """Gates off one head when the fit starts (after HeadImportance attached the gates)."""

    def __init__(self, importance, head):
        self.importance, self.head = importance, head

    def on_fit_start(self, trainer, pl_module):
        self.importance.gates.set(*self.head, 0.0)


@pytest.mark.parametrize("broken", [False, True])
def test_growth_skips_when_the_entropy_gap_of_a_dead_head_is_nan(tmp_path, broken):
    _, train, val = _token_loaders()
    module = _Perplexities([10.0])
    if broken:  # the dead head's query weights: its attention, and the entropy gap ranking it, are NaN
        with torch.no_grad():
            module.model.transformer.h[0].attn.c_attn.weight[:, 8:16] = math.nan
    importance = HeadImportance(num_batches=6)
    growth = HeadGrowth(choice="entropy_gap", every_n_validations=1, probe_size=4)
    trainer = make_trainer(
        tmp_path,
        callbacks=[importance, _GateOff(importance, (0, 1)), growth],
        max_epochs=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train, val)
    if broken:
        assert [h["revived"] for h in growth.history] == [] and growth.skipped_nonfinite == 1
        assert importance.gates.mask[0, 1].item() == 0.0  # left dead
        assert trainer.callback_metrics["heads/skipped_nonfinite"].item() == 1
        assert growth.state_dict()["skipped_nonfinite"] == 1
    else:  # the control: the same fit revives the head
        assert [h["revived"] for h in growth.history] == [[(0, 1)]] and growth.skipped_nonfinite == 0


class _Diverged(_CycleLM):
    """The cycle's language model with a NaN weight: every perplexity it measures is NaN."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.model.transformer.ln_f.weight[0] = math.nan


def test_the_cycle_is_not_started_on_a_nan_perplexity_and_retries_after_learn_steps(tmp_path, monkeypatch):
    import test_head_growth

    monkeypatch.setattr(test_head_growth, "_CycleLM", _Diverged)
    cycle = _cycle(max_cycles=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = _fit_cycle(tmp_path, cycle, max_steps=12)
    # tries at steps 3 and 7 (start_step, then learn_steps later); at 11 no whole cycle fits before max_steps
    assert cycle.history == [] and cycle.current is None and cycle.snapshot is None
    assert cycle.skipped_nonfinite == 2 and cycle.retry_step == 11
    assert trainer.callback_metrics["cycle/skipped_nonfinite"].item() == 2
    assert bool((trainer.callbacks[0].gates.mask == 1).all()) and cycle.reviver.reviving == []
    (message,) = _nonfinite_warnings(caught)
    assert "PlasticityCycle: the statistics of 'perplexity' are NaN/inf at step 3" in message
    restored = _cycle()
    restored.load_state_dict(cycle.state_dict())
    assert restored.skipped_nonfinite == 2 and restored.retry_step == 11
    assert isinstance(cycle, PlasticityCycle)
