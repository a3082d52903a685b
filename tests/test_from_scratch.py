"""The from-scratch baseline and the plasticity gap (Dohare et al. 2024)."""

import copy
import csv
import functools
import math
import textwrap

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import make_trainer, run_ddp_script
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from plasticity_lightning import MLP, DigitsDataModule, PermutedInputs, PlasticityConfigError, TaskAccuracyTable
from plasticity_lightning.callbacks.continual import FromScratchBaseline
from plasticity_lightning.policies.resets import fresh_copy
from plasticity_lightning.reports.data import load_run
from plasticity_lightning.reports.panels import run_charts


def test_fresh_copy_redraws_every_parameter_from_its_seed_at_the_models_scale():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(50, 64), nn.Linear(64, 256), nn.BatchNorm1d(256), nn.Linear(256, 3))
    with torch.no_grad():  # a trained-looking network: shifted weights and statistics
        for p in net.parameters():
            p.add_(1.0)
        net[2].running_mean.fill_(5.0)
    a, b, c = fresh_copy(net, seed=3), fresh_copy(net, seed=3), fresh_copy(net, seed=4)
    for (name, pa), pb, pc, p in zip(
        a.named_parameters(), b.parameters(), c.parameters(), net.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name  # the same seed, the same copy
        assert not torch.equal(pa, p), name  # nothing kept from the network
        if not name.startswith("2."):  # BatchNorm starts at weight 1, bias 0 whatever the seed
            assert not torch.equal(pa, pc), name
    assert torch.equal(a[2].running_mean, torch.zeros(256)) and torch.equal(a[2].weight, torch.ones(256))
    # PyTorch's default init of a Linear: U(±1/√fan_in), std 1/√(3·fan_in); Embedding: N(0, 1)
    assert a[1].weight.std().item() == pytest.approx(1 / math.sqrt(3 * 64), rel=0.05)
    assert a[0].weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert float(net[2].running_mean[0]) == 5.0  # the original is untouched


def test_fresh_copy_leaves_the_originals_hooks_behind_and_shares_what_cannot_be_copied():
    import threading

    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    lock = threading.Lock()  # stands for what a hook may hold that cannot be copied (a trainer, a dataloader)
    calls = []
    handle = net[0].register_forward_hook(lambda module, args, out: calls.append(lock))
    # an attribute that cannot be copied (as LightningCLI's optimizer factory, a partial) is shared
    net.factory = functools.partial(dict, key=lock)
    with pytest.raises(TypeError):
        copy.deepcopy(net.factory)
    fresh = fresh_copy(net, seed=0)
    assert fresh.factory is net.factory
    fresh(torch.zeros(1, 3))
    assert calls == [] and not fresh[0]._forward_hooks
    net(torch.zeros(1, 3))
    assert calls == [lock]  # the original keeps its hook, and its handle still removes it
    handle.remove()
    net(torch.zeros(1, 3))
    assert calls == [lock]


class _Record(pl.Callback):
    """Listed after the baseline: the batches of task 1, the network at task 1's start, and the copy's weights."""

    def __init__(self, baseline):
        self.baseline, self.batches, self.start, self.continual_acc = baseline, [], None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.datamodule.task_context().task_id == 1 and self.start is None:
            self.start = copy.deepcopy(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.datamodule.task_context().task_id == 1:
            self.batches.append((batch[0].clone(), batch[1].clone()))

    def on_validation_end(self, trainer, pl_module):
        if self.baseline.fresh_task == 1:
            self.weights = {k: v.clone() for k, v in self.baseline.fresh.state_dict().items()}
            self.continual_acc = float(trainer.callback_metrics["val/acc_task_1"])


def _model(momentum=0.0):
    pl.seed_everything(0)
    return MLP(hidden_sizes=[32], optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=momentum))


def _stream(epochs_per_task=1):
    return DigitsDataModule(batch_size=64, schedule=PermutedInputs(num_tasks=2, epochs_per_task=epochs_per_task))


def _fit(tmp_path, callbacks, max_epochs=2, model=None, **kwargs):
    model = model or _model()
    datamodule = kwargs.pop("datamodule", None) or _stream()
    trainer = make_trainer(
        tmp_path, max_epochs=max_epochs, callbacks=callbacks, num_sanity_val_steps=0, limit_train_batches=4, **kwargs
    )
    trainer.fit(model, datamodule)
    return model, trainer


def test_the_copy_is_plain_sgd_from_a_fresh_init_on_the_same_batches_and_the_gap_is_logged(tmp_path):
    baseline = FromScratchBaseline(seed=7)
    record = _Record(baseline)
    _fit(tmp_path, [baseline, record, TaskAccuracyTable()], logger=CSVLogger(tmp_path, name="run"))
    # independently: a fresh init of the network as task 1 started, then hand-written SGD on the batches of task 1
    by_hand = fresh_copy(record.start, seed=7 + 1)
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.1)
    for x, y in record.batches:
        optimizer.zero_grad()
        F.cross_entropy(by_hand(x), y).backward()
        optimizer.step()
    assert len(record.batches) == 4
    for name, value in by_hand.state_dict().items():
        torch.testing.assert_close(record.weights[name], value, msg=name)
    assert sorted(baseline.records) == [0, 1]
    entry = baseline.records[1]
    assert entry["continual_acc"] == record.continual_acc
    assert entry["plasticity_gap"] == entry["from_scratch_acc"] - entry["continual_acc"]
    assert 0.0 <= entry["from_scratch_acc"] <= 1.0
    assert baseline.fresh is None  # released when the fit ends
    with (tmp_path / "run" / "version_0" / "metrics.csv").open() as f:
        logged = [row for row in csv.DictReader(f) if row.get("continual/plasticity_gap")]
    assert [float(row["continual/task"]) for row in logged] == [0.0, 1.0]
    assert float(logged[1]["continual/plasticity_gap"]) == pytest.approx(entry["plasticity_gap"])
    # the report draws the gap, and the from-scratch accuracy beside the new-task accuracy
    charts = {c.id: c for c in run_charts(load_run(tmp_path / "run" / "version_0"))[0]}
    (gap,) = charts["accuracy/plasticity_gap"].series
    assert gap.x.tolist() == [0.0, 1.0]
    assert gap.y.tolist() == pytest.approx([baseline.records[t]["plasticity_gap"] for t in (0, 1)])
    scratch = [s for s in charts["accuracy/new_task"].series if s.name == "trained from scratch"]
    assert scratch[0].y.tolist() == pytest.approx([baseline.records[t]["from_scratch_acc"] for t in (0, 1)])


def test_the_continual_network_trains_as_without_the_baseline(tmp_path):
    with_baseline, _ = _fit(tmp_path, [FromScratchBaseline()], model=_model(momentum=0.9))
    without, _ = _fit(tmp_path, [], model=_model(momentum=0.9))
    for a, b in zip(with_baseline.parameters(), without.parameters(), strict=True):
        assert torch.equal(a, b)


def test_every_k_th_task_and_resume_mid_task(tmp_path):
    every_other = FromScratchBaseline(every_n_tasks=2, verbose=False)
    _fit(tmp_path, [every_other])
    assert sorted(every_other.records) == [0]  # task 1 skipped

    # two tasks of two epochs; stopped after three epochs (mid task 1), resumed for the fourth
    whole = FromScratchBaseline(verbose=False)
    _fit(tmp_path, [whole], max_epochs=4, datamodule=_stream(epochs_per_task=2))
    first = FromScratchBaseline(verbose=False)
    _, trainer = _fit(tmp_path, [first], max_epochs=3, datamodule=_stream(epochs_per_task=2))
    assert first.fresh is not None and first.fresh_task == 1  # kept: the task is not finished
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = FromScratchBaseline(verbose=False)
    trainer = make_trainer(tmp_path, max_epochs=4, callbacks=[resumed], num_sanity_val_steps=0, limit_train_batches=4)
    trainer.fit(_model(), _stream(epochs_per_task=2), ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.records == whole.records


def test_bad_input():
    with pytest.raises(PlasticityConfigError, match=r"FromScratchBaseline.every_n_tasks=0 is invalid"):
        FromScratchBaseline(every_n_tasks=0)
    with pytest.raises(PlasticityConfigError, match=r"FromScratchBaseline.seed=-1 is invalid"):
        FromScratchBaseline(seed=-1)


def test_manual_optimization_is_refused(tmp_path):
    class Manual(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.layer = nn.Linear(64, 10)

        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[FromScratchBaseline()])
    with pytest.raises(PlasticityConfigError, match=r"FromScratchBaseline: Manual uses manual optimization"):
        trainer.fit(Manual(), _stream())


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning.pytorch as pl
    import torch
    from plasticity_lightning import MLP, DigitsDataModule, PermutedInputs
    from plasticity_lightning.callbacks.continual import FromScratchBaseline

    out = sys.argv[1]

    class Dump(pl.Callback):
        def __init__(self, baseline):
            self.baseline = baseline

        def on_validation_end(self, trainer, pl_module):
            if self.baseline.fresh is not None and not trainer.sanity_checking:
                torch.save({k: v.cpu() for k, v in self.baseline.fresh.state_dict().items()},
                           f"{out}.rank{trainer.global_rank}.pt")

    pl.seed_everything(0)
    baseline = FromScratchBaseline(seed=3)
    model = MLP(hidden_sizes=[32], optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    data = DigitsDataModule(batch_size=32, schedule=PermutedInputs(num_tasks=2, epochs_per_task=1))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=6,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[baseline, Dump(baseline)], num_sanity_val_steps=0)
    trainer.fit(model, data)
    torch.save(baseline.records, f"{out}.records.rank{trainer.global_rank}.pt")
    """
)


@pytest.mark.slow
def test_ddp_ranks_train_identical_copies_and_agree_on_the_gap(tmp_path):
    out = run_ddp_script(tmp_path, DDP_SCRIPT, ["ddp"])
    weights = [torch.load(f"{out}.rank{rank}.pt") for rank in (0, 1)]
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
    records = [torch.load(f"{out}.records.rank{rank}.pt") for rank in (0, 1)]
    assert records[0] == records[1] and sorted(records[0]) == [0, 1]
