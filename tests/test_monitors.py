"""The monitor callbacks in a real Trainer: cadence, keys, values, probes, state, loggers."""

import csv
import json
import math
import pickle

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from plasticity_lightning import (
    MLP,
    DigitsDataModule,
    DormantUnitMonitor,
    EntropyMonitor,
    GradientFlowMonitor,
    LearningDynamics,
    PermutedInputs,
    PlasticityConfigError,
    RankMonitor,
    ToyDataModule,
    WeightMonitor,
    effective_rank,
)
from plasticity_lightning.metrics import activation_entropy, low_activity_fraction, prediction_entropy, srank


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def digits(num_tasks=3, epochs_per_task=1, **kwargs):
    return DigitsDataModule(
        batch_size=64, schedule=PermutedInputs(num_tasks=num_tasks, epochs_per_task=epochs_per_task), **kwargs
    )


def fit(tmp_path, callbacks, *, data=None, model=None, **trainer_kwargs):
    pl.seed_everything(0)
    model = model or MLP(hidden_sizes=[32, 32], optimizer=sgd)
    trainer_kwargs.setdefault("max_epochs", 3)
    trainer = make_trainer(tmp_path, callbacks=callbacks, num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(model, data or digits())
    return trainer, model


def test_task_cadence_measures_at_each_task_start_and_at_the_end(tmp_path):
    monitor = RankMonitor()
    trainer, _ = fit(tmp_path, [monitor], max_epochs=3)
    assert [(h["reason"], h["task"], h["step"]) for h in monitor.history] == [
        ("task", 0, 0),
        ("task", 1, 17),
        ("task", 2, 34),
        ("end", 2, 51),
    ]
    for key in (
        "plasticity/hidden.0.act/effective_rank",
        "plasticity/hidden.1.act/srank",
        "plasticity/hidden.1.act/approximate_rank",
        "plasticity/hidden.0.act/stable_rank",
    ):
        assert key in trainer.callback_metrics


def test_epoch_and_step_cadences(tmp_path):
    by_epoch = DormantUnitMonitor(every_n_epochs=2, on_task_change=False, at_train_end=False)
    by_step = EntropyMonitor(every_n_steps=10, on_task_change=False, at_train_end=False)
    fit(tmp_path, [by_epoch, by_step], max_epochs=4, data=digits(num_tasks=4))
    assert [h["epoch"] for h in by_epoch.history] == [1, 3]
    assert [h["step"] for h in by_step.history] == [10, 20, 30, 40, 50, 60]


def test_single_task_runs_default_to_every_epoch(tmp_path):
    monitor = RankMonitor(at_train_end=False)
    fit(
        tmp_path,
        [monitor],
        data=ToyDataModule("moons", n_samples=200, batch_size=32),
        model=MLP(hidden_sizes=[16], optimizer=sgd),
        max_epochs=3,
    )
    assert [h["reason"] for h in monitor.history] == ["epoch"] * 3


def test_logged_values_equal_an_independent_computation_on_the_probe(tmp_path):
    rank, dormant, entropy = (
        RankMonitor(probe_size=300),
        DormantUnitMonitor(probe_size=300),
        EntropyMonitor(probe_size=300),
    )
    trainer, model = fit(tmp_path, [rank, dormant, entropy], max_epochs=2)
    # rebuild the probe by hand: the same 300 training rows, permuted for the last task, through the model
    dm = trainer.datamodule
    dataset = dm.splits["train"]
    rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:300].sort().values
    x = torch.stack([dataset[int(i)][0] for i in rows])
    x = dm.schedule.transform(x, None, rows, task=1, split="train")[0]
    model.eval()
    with torch.no_grad():
        h0 = model.hidden[0](model.flatten(x))
        h1 = model.hidden[1](h0)
        logits = model.head(h1)
    final = dict(rank.history[-1].items())
    assert final["hidden.1.act/effective_rank"] == pytest.approx(effective_rank(h1).item(), rel=1e-9)
    assert final["hidden.0.act/srank"] == srank(h0).item()
    assert dormant.history[-1]["hidden.1.act/low_activity_fraction"] == pytest.approx(low_activity_fraction(h1).item())
    assert entropy.history[-1]["predictions/prediction_entropy"] == pytest.approx(prediction_entropy(logits).item())
    assert entropy.history[-1]["hidden.0.act/activation_entropy"] == pytest.approx(activation_entropy(h0).item())


def test_monitors_do_not_change_training(tmp_path):
    _, plain = fit(tmp_path / "a", [])
    monitors = [
        RankMonitor(every_n_steps=5),
        DormantUnitMonitor(),
        EntropyMonitor(),
        WeightMonitor(),
        GradientFlowMonitor(every_n_steps=3),
        LearningDynamics(filename=None),
    ]
    _, watched = fit(tmp_path / "b", monitors)
    for p, q in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(p, q)


def test_probe_follows_the_task(tmp_path):
    monitor = RankMonitor(probe_size=64)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if monitor.probe.batch is not None:
                seen.append((monitor.current_task, monitor.probe.batch[0][:1].clone()))

    fit(tmp_path, [monitor, Spy()], max_epochs=2)
    first = next(x for task, x in seen if task == 0)
    second = next(x for task, x in seen if task == 1)
    assert not torch.equal(first, second)  # redrawn under task 1's permutation
    assert torch.equal(first.flatten().sort().values, second.flatten().sort().values)  # the same image


def test_weight_monitor_distance_and_resume_state(tmp_path):
    monitor = WeightMonitor()
    _trainer, model = fit(tmp_path, [monitor], max_epochs=2)
    initial = monitor.initial["hidden.0.linear"]
    assert monitor.history[0]["hidden.0.linear/distance_from_init"] == 0.0  # task 0 starts at the initial weights
    moved = torch.linalg.vector_norm(model.hidden[0].linear.weight.detach().double() - initial.double())
    assert monitor.history[-1]["hidden.0.linear/distance_from_init"] == pytest.approx(moved.item())
    restored = WeightMonitor()
    restored.load_state_dict(pickle.loads(pickle.dumps(monitor.state_dict())))
    assert torch.equal(restored.initial["hidden.0.linear"], initial)
    assert restored.history == monitor.history and restored.current_task == monitor.current_task
    # settings are part of the key: two monitors that measure differently keep separate checkpoint state
    assert monitor.state_key == WeightMonitor().state_key != WeightMonitor(distance=False).state_key
    assert DormantUnitMonitor(tau=0.1).state_key != DormantUnitMonitor(tau=0.0).state_key


def test_gradient_flow_keys_and_warnings(tmp_path):
    monitor = GradientFlowMonitor(every_n_steps=5, vanishing=10.0)  # every gradient counts as vanishing
    with pytest.warns(UserWarning, match="gradients are vanishing") as warned:
        trainer, _ = fit(tmp_path, [monitor], max_epochs=1)
    assert sum("vanishing" in str(w.message) for w in warned) == 1  # once, not every measurement
    # the 5th, 10th, ... optimizer step's gradients (StepCadence), logged at the step count before that update
    assert trainer.global_step >= 15
    assert [h["step"] for h in monitor.history] == [s for s in range(trainer.global_step) if (s + 1) % 5 == 0]
    assert {"plasticity/grad/global_norm", "plasticity/grad/mean_abs", "plasticity/head/grad_norm"} <= set(
        trainer.callback_metrics
    )


def test_learning_dynamics_json_and_keys(tmp_path):
    callback = LearningDynamics()
    logger = CSVLogger(tmp_path, name="run")
    trainer, _ = fit(
        tmp_path, [callback], max_epochs=4, logger=logger, data=ToyDataModule("moons", n_samples=300, batch_size=32)
    )
    document = json.loads((tmp_path / "run" / "version_0" / "learning_dynamics.json").read_text())
    assert document["history"]["epoch"] == [0, 1, 2, 3]
    assert len(document["history"]["mean_grad"]) == 4 and len(document["history"]["layer_weight_norms"][0]) == 3
    assert document["summary"]["pattern"] == callback.summary["pattern"]
    assert "dynamics/convergence_epoch" in trainer.callback_metrics
    assert "dynamics/gradient_health/gradient_ratio" in trainer.callback_metrics
    assert document["summary"]["generalization_gap"] == pytest.approx(
        document["history"]["accuracy"][-1] - document["history"]["val_accuracy"][-1]
    )


def test_logger_false_and_csv_keys(tmp_path):
    monitors = [RankMonitor(), DormantUnitMonitor()]
    fit(tmp_path / "quiet", monitors, logger=False)  # no logger: values still reach callback_metrics
    logger = CSVLogger(tmp_path, name="csv")
    fit(tmp_path, [RankMonitor(), DormantUnitMonitor()], logger=logger)
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    steps = sorted({int(r["step"]) for r in rows if r.get("plasticity/all/low_activity_fraction")})
    assert steps == [0, 17, 34, 51]


def test_tensorboard_receives_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, [DormantUnitMonitor(), RankMonitor()], logger=logger, max_epochs=1)
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0}).Reload()
    assert "plasticity/hidden.0.act/active_share" in events.Tags()["histograms"]
    assert "plasticity/hidden.1.act/effective_rank" in events.Tags()["scalars"]


def test_custom_model_with_named_or_discovered_layers(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    discovered, named = RankMonitor(), RankMonitor(layers=["net.1"], prefix="linear")
    trainer, _ = fit(tmp_path, [discovered, named], model=Plain(), max_epochs=1, limit_val_batches=0)
    assert "plasticity/net.2/effective_rank" in trainer.callback_metrics  # the Tanh module, found by type
    assert "linear/net.1/effective_rank" in trainer.callback_metrics
    with pytest.raises(PlasticityConfigError, match=r"has no submodule named 'net\.9'"):
        fit(tmp_path, [RankMonitor(layers=["net.9"])], model=Plain(), max_epochs=1, limit_val_batches=0)


def test_bad_arguments():
    with pytest.raises(PlasticityConfigError, match=r"RankMonitor.measures='rank' is not supported"):
        RankMonitor(measures=["rank"])
    with pytest.raises(PlasticityConfigError, match=r"DormantUnitMonitor.every_n_epochs=0 is invalid"):
        DormantUnitMonitor(every_n_epochs=0)
    with pytest.raises(PlasticityConfigError, match=r"RankMonitor.layers='hidden.0.act' is invalid"):
        RankMonitor(layers="hidden.0.act")
    with pytest.raises(PlasticityConfigError, match=r"EntropyMonitor.probe_source='test' is not supported"):
        EntropyMonitor(probe_source="test")
    with pytest.raises(PlasticityConfigError, match=r"RankMonitor.measures='srank' is invalid; expected a non-empty"):
        RankMonitor(measures="srank")
    with pytest.raises(PlasticityConfigError, match=r"GradientFlowMonitor.every_n_steps=None is invalid"):
        GradientFlowMonitor(every_n_steps=None)


def test_monitor_keys_reach_a_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="plasticity-tests", save_dir=str(tmp_path), offline=True)
    try:
        fit(tmp_path, [RankMonitor(), DormantUnitMonitor(), WeightMonitor()], logger=logger, max_epochs=2)
        summary = dict(logger.experiment.summary)
        assert {
            "plasticity/hidden.1.act/effective_rank",
            "plasticity/all/low_activity_fraction",
            "plasticity/all/mean_abs_weight",
            "trainer/global_step",
        } <= set(summary)
        assert "plasticity/hidden.0.act/active_share" in summary  # a histogram
        assert "plasticity/dormant_units" in summary  # the per-layer table
        run_dir = logger.experiment.dir
        assert "offline-run-" in run_dir  # recorded locally for a later `wandb sync`, nothing sent
    finally:
        wandb.finish()


def test_each_state_is_measured_once(tmp_path):
    # one task, epoch cadence: the train-end measurement would repeat the last epoch end's step and task
    monitor = RankMonitor(every_n_epochs=1)
    fit(tmp_path, [monitor], max_epochs=2, data=digits(num_tasks=1, epochs_per_task=2))
    moments = [(h["step"], h["task"]) for h in monitor.history]
    assert len(moments) == len(set(moments)) and [h["reason"] for h in monitor.history] == ["task", "epoch", "epoch"]


class _AugmentedDigits(torch.utils.data.Dataset):
    """Random noise in __getitem__, as augmenting datasets draw from the global RNG."""

    def __init__(self):
        self.x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        import random

        import numpy as np

        noise = torch.rand(8) + float(np.random.rand()) + random.random()
        return self.x[i] + noise, 0


def test_probe_reading_leaves_every_global_rng_untouched_and_is_reproducible():
    import random

    import numpy as np

    from plasticity_lightning.probes import ProbeSet

    loader = torch.utils.data.DataLoader(_AugmentedDigits(), batch_size=8)
    trainer = make_trainer(".")
    trainer.fit_loop._data_source = None  # not fitted: give the probe its loader directly
    probe = ProbeSet(size=16)
    probe._loader = lambda _trainer: loader
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    first = probe.draw(trainer)[0].clone()
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    probe._raw = None
    torch.manual_seed(6)  # another global state: the probe must not depend on it (DDP ranks differ here)
    assert torch.equal(probe.draw(trainer)[0], first)


def test_probe_follows_the_precision_of_true_precision_plugins(tmp_path):
    monitor = RankMonitor(every_n_epochs=1)
    fit(tmp_path, [monitor], max_epochs=1, precision="64-true", data=digits(num_tasks=1))
    assert monitor.probe.batch[0].dtype == torch.float64 and monitor.history


def test_rank_monitor_logs_nan_for_a_diverged_layer(tmp_path):
    monitor = RankMonitor(every_n_epochs=1, on_task_change=False)

    class Diverge(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.hidden[0].linear.weight.fill_(float("nan"))

    with pytest.warns(UserWarning, match="NaN/inf outputs") as warned:
        trainer, _ = fit(tmp_path, [Diverge(), monitor], max_epochs=2, data=digits(num_tasks=1, epochs_per_task=2))
    assert len(monitor.history) == 2  # two measurements, one warning per layer (NaN reaches both)
    assert sorted(str(w.message).split("'")[1] for w in warned if "NaN/inf" in str(w.message)) == [
        "hidden.0.act",
        "hidden.1.act",
    ]
    assert all(torch.isnan(trainer.callback_metrics[f"plasticity/hidden.0.act/{m}"]) for m in monitor.measures)


class _Sequence(pl.LightningModule):
    """Outputs [N, T, D]: units on the last axis."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.proj(x.view(-1, 5, 4)))
        return self.head(h.mean(dim=1))

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_unit_dim_reads_sequence_outputs_by_their_last_axis(tmp_path):
    x = torch.randn(40, 20)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randint(0, 3, (40,))), batch_size=8)
    monitor = RankMonitor(layers=["act"], unit_dim=-1, every_n_epochs=1, at_train_end=False)
    model = _Sequence()
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_epochs=1)
    trainer.fit(model, data)
    with torch.no_grad():
        features = model.act(model.proj(monitor.probe.batch[0].view(-1, 5, 4))).mean(dim=1)  # pool over T
    assert monitor.history[-1]["act/effective_rank"] == pytest.approx(float(effective_rank(features)))
    with pytest.raises(PlasticityConfigError, match="unit_dim=0"):
        RankMonitor(unit_dim=0)


def test_learning_dynamics_keeps_gradients_when_max_steps_ends_mid_epoch(tmp_path):
    callback = LearningDynamics(filename=None)
    fit(tmp_path, [callback], max_epochs=3, max_steps=20, data=digits(num_tasks=1))  # 17 batches per epoch
    assert callback.history["epoch"] == [0, 1]
    assert len(callback.history["mean_grad"]) == 2 and all(g > 0 for g in callback.history["mean_grad"])


def test_learning_dynamics_record_is_the_trainer_free_dynamics_record(tmp_path):
    from plasticity_lightning.metrics import dynamics_record, gradient_stats, layer_weights

    class BareRecords(pl.Callback):
        """Calls the bare function at each epoch end with the gradient statistics of the epoch's last step."""

        def __init__(self) -> None:
            self.records, self.grads = [], None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = gradient_stats(layer_weights(pl_module))

        def on_train_epoch_end(self, trainer, pl_module):
            metrics = trainer.callback_metrics
            keys = {"loss": "train/loss_epoch", "accuracy": "train/acc_epoch", "val_accuracy": "val/acc"}
            logged = {name: metrics[key] for name, key in keys.items()}
            self.records.append(dynamics_record(pl_module, trainer.current_epoch, logged, self.grads))

    callback, bare = LearningDynamics(filename=None), BareRecords()
    fit(tmp_path, [callback, bare], max_epochs=2, data=digits(num_tasks=1))
    columns = {key: [record[key] for record in bare.records] for key in bare.records[0]}
    assert columns == callback.history and list(columns) == list(callback.history)
    assert columns["epoch"] == [0, 1] and all(g > 0 for g in columns["mean_grad"])


class _FrozenNormNet(nn.Module):
    """A net whose train() keeps its BatchNorm in eval mode (the frozen-BN pattern), with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def train(self, mode: bool = True) -> "_FrozenNormNet":
        super().train(mode)
        self.body[1].eval()
        return self


def test_capture_runs_in_eval_mode_and_restores_every_module_flag():
    from plasticity_lightning.probes import capture_outputs

    net = _FrozenNormNet().train()
    net.body[3].eval()  # a mixed state that no single train(mode) call produces
    before = {name: m.training for name, m in net.named_modules()}
    x = torch.randn(16, 4)
    outputs, out = capture_outputs(net, x, {"2": net.body[2]})
    assert {name: m.training for name, m in net.named_modules()} == before
    with torch.no_grad():
        expected = net.eval()(x)  # dropout off, running statistics
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(outputs["2"], torch.relu(net.body[1](net.body[0](x))))


class _MergingLinear(nn.Linear):
    """A layer that acts on a mode change, as LoRA layers do: eval() merges a delta into the weight, train() takes
    it out again."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.merged = False

    def train(self, mode: bool = True) -> "_MergingLinear":
        super().train(mode)
        if self.merged == mode:  # merged in train mode, or unmerged in eval mode: change
            with torch.no_grad():
                self.weight.add_(1.0 if not mode else -1.0)
            self.merged = not mode
        return self


def test_capture_restores_modes_through_train_so_mode_side_effects_are_undone():
    from plasticity_lightning.probes import capture_outputs

    net = nn.Sequential(_MergingLinear(), nn.ReLU()).train()
    weight = net[0].weight.detach().clone()
    _, out = capture_outputs(net, torch.ones(2, 4), {"1": net[1]})
    assert net[0].training and not net[0].merged
    torch.testing.assert_close(net[0].weight.detach(), weight)  # the delta is out of the weight again
    torch.testing.assert_close(out, torch.relu(torch.ones(2, 4) @ (weight + 1.0).T + net[0].bias.detach()))


class _Break(pl.Callback):
    """Puts ``value`` into the first layer at the end of the second epoch (before the monitors listed after it)."""

    def __init__(self, value, where="weight"):
        self.value, self.where = value, where

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            with torch.no_grad():
                if self.where == "weight":
                    pl_module.hidden[0].linear.weight.fill_(self.value)
                else:  # one unit's bias: that unit outputs +inf, the others stay finite
                    pl_module.hidden[0].linear.bias[0] = self.value


def _broken_fit(tmp_path, monitor, value, where="weight"):
    with pytest.warns(UserWarning, match="NaN/inf") as warned:
        trainer, _ = fit(
            tmp_path,
            [_Break(value, where), monitor],
            max_epochs=2,
            limit_train_batches=2,
            data=digits(num_tasks=1, epochs_per_task=2),
        )
    return trainer, [str(w.message) for w in warned if "NaN/inf" in str(w.message)]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_dormant_unit_monitor_logs_nan_for_a_broken_network_and_warns_once_per_layer(tmp_path, value):
    # NaN weights gave dead/dormant/low-activity shares of 0.0, a healthy-looking network
    monitor = DormantUnitMonitor(every_n_epochs=1, on_task_change=False, at_train_end=False, probe_size=256)
    trainer, messages = _broken_fit(tmp_path, monitor, value)
    assert len(monitor.history) == 2
    for measure in ("redo_dormant_fraction", "dead_fraction", "low_activity_fraction"):
        for layer in ("hidden.0.act", "hidden.1.act", "all"):
            assert math.isnan(monitor.history[-1][f"{layer}/{measure}"]), (layer, measure)
            assert torch.isnan(trainer.callback_metrics[f"plasticity/{layer}/{measure}"])
    assert sorted(m.split("'")[1] for m in messages) == ["hidden.0.act", "hidden.1.act"]  # once per layer
    assert all(m.startswith("DormantUnitMonitor: ") for m in messages)


def test_one_infinite_activation_does_not_make_a_layer_dormant(tmp_path):
    # one +inf unit made the ReDo normaliser infinite: every other unit scored 0, 98% "dormant"
    monitor = DormantUnitMonitor(
        layers=["hidden.0.act"], every_n_epochs=1, on_task_change=False, at_train_end=False, probe_size=256
    )
    _, messages = _broken_fit(tmp_path, monitor, float("inf"), where="bias")
    assert messages == [messages[0]] and "'hidden.0.act' has NaN/inf outputs at step 4" in messages[0]
    finite, broken = monitor.history
    assert finite["hidden.0.act/redo_dormant_fraction"] < 0.5
    assert math.isnan(broken["hidden.0.act/redo_dormant_fraction"]) and math.isnan(broken["all/dead_fraction"])


@pytest.mark.parametrize(
    ("monitor", "keys"),
    [
        (EntropyMonitor, ["hidden.0.act/activation_entropy", "predictions/prediction_entropy"]),
        (WeightMonitor, ["hidden.0.linear/mean_abs_weight", "hidden.0.linear/weight_norm", "all/weight_norm"]),
    ],
)
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_every_monitor_logs_nan_for_nonfinite_layers(tmp_path, monitor, keys, value):
    # a -inf activation gave a clean entropy of 0 and an infinite weight an infinite norm: both now NaN, warned
    instance = monitor(every_n_epochs=1, on_task_change=False, at_train_end=False, probe_size=256)
    _, messages = _broken_fit(tmp_path, instance, value)
    for key in keys:
        assert math.isnan(instance.history[-1][key]), key
        assert math.isfinite(instance.history[0][key]), key
    assert messages and all(m.startswith(f"{monitor.__name__}: ") for m in messages)
    assert len(messages) == len(set(messages))


def test_gradient_flow_logs_nan_for_nonfinite_gradients(tmp_path):
    monitor = GradientFlowMonitor(every_n_steps=1)

    class InfiniteGradient(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 3:
                pl_module.head.weight.grad[0, 0] = float("inf")

    with pytest.warns(UserWarning, match="'head' has NaN/inf gradients at step 3"):
        fit(tmp_path, [InfiniteGradient(), monitor], max_steps=5, data=digits(num_tasks=1))
    at_three = next(h for h in monitor.history if h["step"] == 3)
    assert math.isnan(at_three["head/grad_norm"]) and math.isnan(at_three["grad/global_norm"])
    assert math.isfinite(at_three["hidden.0.linear/grad_norm"])  # the other layers are still measured


class _SequenceModel(pl.LightningModule):
    """Token ids → a recurrent or transformer body → logits per position; ``kind`` picks the body."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(20, 16)
        if kind == "lstm":
            self.body = nn.LSTM(16, 64, batch_first=True)
        elif kind == "gru":  # sequence-first: outputs [time, batch, hidden]
            self.body = nn.GRU(16, 64)
        else:
            from transformers import GPT2Config, GPT2Model

            self.body = GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=8, vocab_size=20))
        self.head = nn.Linear(64 if kind != "gpt2" else 16, 20)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The 64 hidden units as [batch, time, 64], computed without the monitor's machinery."""
        if self.kind == "lstm":
            return self.body(self.embed(ids))[0]
        if self.kind == "gru":
            return self.body(self.embed(ids).transpose(0, 1))[0].transpose(0, 1)
        mlp = self.body.h[0].mlp  # GPT-2's MLP units: gelu_new(ln_2(x) W + b), W stored [in, out] (HF Conv1D)
        seen = []
        handle = mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        self.body(ids)
        handle.remove()
        return nn.functional.gelu(seen[0] @ mlp.c_fc.weight + mlp.c_fc.bias, approximate="tanh")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.kind == "gpt2":
            return self.head(self.body(ids).last_hidden_state)
        return self.head(self.hidden(ids))

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]).flatten(0, 1), batch[1].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _numpy_effective_rank(features: torch.Tensor) -> float:
    import numpy as np

    sigma = np.linalg.svd(features.double().numpy(), compute_uv=False)
    p = sigma[sigma > 0] / sigma.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize(("kind", "layer"), [("lstm", "body"), ("gru", "body"), ("gpt2", "body.h.0.mlp.act")])
def test_sequence_models_measure_their_hidden_units_not_time_steps(kind, layer, tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (96, 8))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, ids), batch_size=32)
    rank, dormant = RankMonitor(every_n_epochs=1, at_train_end=False), DormantUnitMonitor(every_n_epochs=1)
    # an explicit unit_dim overrides the layer type's axis: axis 1 of [batch, time, hidden] is time
    over_time = RankMonitor(layers=[layer], unit_dim=1, prefix="time", every_n_epochs=1, at_train_end=False)
    model = _SequenceModel(kind)
    make_trainer(tmp_path, callbacks=[rank, dormant, over_time], max_epochs=1).fit(model, data)
    assert layer in rank.layers  # found with zero configuration (GPT-2's NewGELUActivation is no torch module)
    model.eval()
    with torch.no_grad():
        hidden = model.hidden(rank.probe.batch[0])  # [96, 8, 64]
    expected = _numpy_effective_rank(hidden.mean(dim=1))  # each unit pooled over time, as for conv maps
    measured = rank.history[-1][f"{layer}/effective_rank"]
    assert measured == pytest.approx(expected, rel=1e-6) and measured > 8  # 8 time steps would cap a rank over time
    shares = (hidden != 0).double().mean(dim=(0, 1))  # per unit: share of the 96 x 8 positions where it is active
    assert dormant.history[-1][f"{layer}/low_activity_fraction"] == pytest.approx(
        float((shares < 0.01).double().mean())
    )
    if kind != "gru":  # [time, batch, hidden] outputs: axis 1 is the batch, not time
        expected = _numpy_effective_rank(hidden.mean(dim=2))
        assert over_time.history[-1][f"{layer}/effective_rank"] == pytest.approx(expected, rel=1e-6)
