"""Non-finite values are never reported as healthy: the metrics' conventions on NaN/±inf, the Softmax Collapse
monitor and the surge/collapse intervention (the monitors and CBP/ReDo are in test_monitors/test_interventions)."""

import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from conftest import make_trainer

from plasticity_lightning import MLP, BinaryGaussianDataModule, SoftmaxCollapseMonitor, SurgeCollapse
from plasticity_lightning.metrics import (
    SoftmaxCollapse,
    UnitActivity,
    activity_statistics,
    dead_unit_fraction,
    dead_unit_mask,
    low_activity_fraction,
    low_activity_mask,
    nlm_alignment,
    redo_dormant_fraction,
    redo_dormant_mask,
    redo_scores,
    softmax_collapse_fraction,
    zero_loss_fraction,
)

NAN, INF = math.nan, math.inf


def _layer(bad):
    """[6, 4] outputs: unit 0 silent, unit 1 active once, units 2-3 active everywhere; ``bad`` put into unit 3."""
    h = torch.zeros(6, 4)
    h[0, 1] = 1.0
    h[:, 2:] = 2.0
    h[2, 3] = bad
    return h


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("active", ["nonzero", "positive"])
def test_dormancy_shares_of_a_layer_with_a_nonfinite_activation_are_nan(bad, active):
    h = _layer(bad)
    # one +inf unit made every finite unit's score 0 (dormant); a NaN one made the shares a clean 0.0
    for share in (
        redo_dormant_fraction(h, tau=0.1),
        dead_unit_fraction(h),
        low_activity_fraction(h, max_active=0.5, active=active),
    ):
        assert share.dtype == torch.float64 and math.isnan(share)
    assert torch.isnan(redo_scores(h)).all()  # the normaliser mean_k E|h_k| is undefined
    # per unit: the broken unit is never counted; the finite units keep their own (finite-unit) verdicts
    assert redo_dormant_mask(h, tau=0.1).tolist() == [False] * 4
    assert dead_unit_mask(h).tolist() == [True, False, False, False]
    assert low_activity_mask(h, max_active=0.5, active=active).tolist() == [True, True, False, False]
    stats = activity_statistics(h, active)
    assert not bool(stats.finite)
    masks = stats.masks(tau=0.1, dead_threshold=0.0, max_active=0.5)
    assert [masks[k].tolist() for k in ("redo_dormant", "dead", "low_activity")] == [
        [False] * 4,
        [True, False, False, False],
        [True, True, False, False],
    ]
    assert all(math.isnan(v) for v in stats.fractions(tau=0.1, max_active=0.5).values())
    metric = UnitActivity(num_units=4, tau=0.1, max_active=0.5, active=active)
    metric.update(_layer(0.5))
    metric.update(h)  # one broken batch taints the accumulated layer
    result = metric.compute()
    assert all(math.isnan(result[k]) for k in ("redo_dormant_fraction", "dead_fraction", "low_activity_fraction"))
    assert torch.isnan(result["redo_scores"]).all()


def test_finite_layers_keep_their_shares_and_masks_exactly():
    # the same layer with a finite value: numbers, checked by hand
    h = _layer(0.5)
    stats = activity_statistics(h)
    assert bool(stats.finite)
    mean_abs = np.array([0.0, 1 / 6, 2.0, 10.5 / 6])  # unit 3: five rows of 2 and one of 0.5
    scores = mean_abs / (mean_abs.mean() + 1e-9)
    np.testing.assert_allclose(redo_scores(h).numpy(), scores, rtol=1e-12)
    assert redo_dormant_fraction(h, tau=0.2).item() == np.mean(scores <= 0.2) == 0.5  # s_1 = 0.17
    assert dead_unit_fraction(h).item() == 0.25
    assert low_activity_fraction(h, max_active=0.5).item() == 0.5
    fractions = stats.fractions(tau=0.2, max_active=0.5)
    assert {k: v.item() for k, v in fractions.items()} == {"redo_dormant": 0.5, "dead": 0.25, "low_activity": 0.5}


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_collapse_shares_and_alignment_are_nan_on_nonfinite_inputs(bad):
    logits = torch.tensor([[0.0, 300.0], [1.0, bad]])
    targets = torch.tensor([1, 0])
    # NaN logits compared unequal to 1 and 0: a clean 0.0 (no collapse); now NaN
    assert math.isnan(softmax_collapse_fraction(logits)) and math.isnan(zero_loss_fraction(logits, targets))
    assert softmax_collapse_fraction(logits[:1]) == 1.0 and zero_loss_fraction(logits[:1], targets[:1]) == 1.0
    metric = SoftmaxCollapse()
    metric.update(logits[:1], targets[:1])
    assert metric.compute()["softmax_collapse"].item() == 1.0
    metric.update(logits[1:], targets[1:])
    result = metric.compute()
    assert math.isnan(result["softmax_collapse"]) and math.isnan(result["zero_terms"])
    assert not math.isfinite(result["logit_norm"])  # a norm of a non-finite row is itself non-finite
    # a NaN gradient failed `denominator > 0` and read as alignment 0.0
    assert math.isnan(nlm_alignment([torch.ones(2)], [torch.tensor([bad, 1.0])]))
    assert math.isnan(nlm_alignment([torch.tensor([bad, 1.0])], [torch.ones(2)]))
    assert nlm_alignment([torch.ones(2)], [torch.zeros(2)]) == 0.0


def test_float16_overflow_counts_as_nonfinite_in_that_precision():
    logits = torch.tensor([[0.0, 70000.0]])  # finite in float32, +inf in float16
    assert softmax_collapse_fraction(logits, "float32") == 1.0
    assert math.isnan(softmax_collapse_fraction(logits, "float16"))


def _gaussian():
    data = BinaryGaussianDataModule(dim=8, n_train=64, n_val=16, n_test=16, batch_size=16)
    data.setup("fit")
    return data


def test_softmax_collapse_monitor_logs_nan_and_warns_once_for_nonfinite_logits(tmp_path):
    class Broken(MLP):
        def forward(self, x):
            out = super().forward(x)
            return out * math.nan if self.current_epoch >= 1 else out

    torch.manual_seed(0)
    model = Broken(input_dim=8, num_outputs=2, hidden_sizes=[8], optimizer=partial(torch.optim.SGD, lr=0.0))
    monitor = SoftmaxCollapseMonitor(every_n_epochs=1, threshold=0.0)
    with pytest.warns(UserWarning, match=r"SoftmaxCollapseMonitor: 'logits' has NaN/inf logits") as warned:
        make_trainer(tmp_path, callbacks=[monitor], max_epochs=3, num_sanity_val_steps=0).fit(model, _gaussian())
    assert sum("NaN/inf" in str(w.message) for w in warned) == 1
    first, *broken = monitor.history
    assert math.isfinite(first["softmax_collapse"]) and math.isfinite(first["nlm_alignment"])
    assert len(broken) == 2
    for values in broken:
        for key in ("softmax_collapse", "zero_terms", "logit_norm", "nlm_alignment"):
            assert math.isnan(values[key]), key
    assert monitor.onset_step is None  # threshold 0: a 0.0 share would not have marked it either


def test_surge_collapse_skips_a_collapse_on_nonfinite_parameters():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    callback = SurgeCollapse(sparsity=0.5)
    callback.on_fit_start(None, net)
    with torch.no_grad():
        net[2].weight[0, 0] = math.nan
    before = [p.detach().clone() for p in net.parameters()]
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        callback.collapse()
        callback.collapse()  # the second skip is counted, not warned again
    messages = [str(w.message) for w in warned if "NaN/inf" in str(w.message)]
    assert len(messages) == 1 and "SurgeCollapse: the statistics of '2.weight' are NaN/inf" in messages[0]
    for param, old in zip(net.parameters(), before, strict=True):
        assert torch.equal(param.isnan(), old.isnan()) and torch.equal(param.nan_to_num(), old.nan_to_num())
    assert callback.counts["collapses"] == 0 and callback.skipped_nonfinite == 2
    assert callback.state_dict()["skipped_nonfinite"] == 2
    restored = SurgeCollapse()
    restored.load_state_dict(callback.state_dict())
    assert restored.skipped_nonfinite == 2
    with torch.no_grad():
        net[2].weight[0, 0] = 0.0
    callback.collapse()  # finite again: collapses
    assert callback.counts["collapses"] == 1 and callback.sparsity_now() > 0.4


def test_entropy_gated_reset_skips_on_a_nonfinite_entropy(tmp_path):
    class Broken(MLP):
        def forward(self, x):  # the probe sees NaN activations: entropy NaN
            return super().forward(x * math.nan if not self.training else x)

    torch.manual_seed(0)
    model = Broken(input_dim=8, num_outputs=2, hidden_sizes=[8, 8], optimizer=partial(torch.optim.SGD, lr=0.0))
    gated = SurgeCollapse(mode="entropy_gated", entropy_threshold=100.0, gradient_threshold=1e9, probe_size=16)
    trainer = make_trainer(tmp_path, callbacks=[gated], max_epochs=2, num_sanity_val_steps=0, log_every_n_steps=1)
    with pytest.warns(UserWarning, match=r"the statistics of 'activation_entropy' are NaN/inf"):
        trainer.fit(model, _gaussian())
    # entropy NaN < 100 is false: the gate stayed shut silently; gradient_threshold 1e9 would reset everything
    assert gated.counts["resets"] == 0 and gated.events == [] and gated.skipped_nonfinite == 2
    assert trainer.callback_metrics["surge_collapse/skipped_nonfinite"].item() == 2
