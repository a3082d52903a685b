"""Monitors at one dispatch: adjacent monitors join one MonitorCollection; every value stays what each logs alone."""

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from plasticity_lightning import MLP, DigitsDataModule, PermutedInputs, PlasticityConfigError
from plasticity_lightning.callbacks import (
    DormantUnitMonitor,
    EntropyMonitor,
    GradientFlowMonitor,
    MonitorCollection,
    RankMonitor,
    WeightMonitor,
)
from plasticity_lightning.probes import capture_outputs


class Nothing(pl.Callback):
    """Stands between two monitors, so that neither joins a collection."""


class EpochStartRank(RankMonitor):
    """Acts in a hook the collection does not call: it stays a callback of its own."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.run(trainer, pl_module, reason="epoch start")


def monitors(**kwargs):
    return [
        RankMonitor(every_n_steps=4, **kwargs),
        DormantUnitMonitor(**kwargs),
        EntropyMonitor(**kwargs),
        WeightMonitor(),
        GradientFlowMonitor(every_n_steps=3),
    ]


def digits_fit(tmp_path, callbacks, steps_per_task=6, max_steps=-1, ckpt_path=None, **kwargs):
    """Two permuted-digit tasks of one epoch of ``steps_per_task`` steps each, no validation."""
    pl.seed_everything(0)
    model = MLP(hidden_sizes=[16, 16], optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    data = DigitsDataModule(batch_size=64, schedule=PermutedInputs(num_tasks=2, epochs_per_task=1))
    trainer = make_trainer(
        tmp_path,
        callbacks=callbacks,
        max_epochs=2,
        max_steps=max_steps,
        limit_train_batches=steps_per_task,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **kwargs,
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def same_history(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == y[key] or (math.isnan(x[key]) and math.isnan(y[key])), key


def test_adjacent_monitors_join_one_collection_and_log_what_each_logs_alone(tmp_path):
    joined = monitors(probe_size=256)
    trainer = digits_fit(tmp_path / "a", joined)
    collections = [c for c in trainer.callbacks if isinstance(c, MonitorCollection)]
    assert len(collections) == 1 and collections[0].monitors == joined
    assert trainer.callbacks.index(collections[0]) < trainer.callbacks.index(joined[0])  # where the run started
    alone = monitors(probe_size=256)
    separated = [x for monitor in alone for x in (monitor, Nothing())]  # nothing adjacent: every monitor on its own
    trainer = digits_fit(tmp_path / "b", separated)
    assert not any(isinstance(c, MonitorCollection) for c in trainer.callbacks)
    for a, b in zip(joined, alone, strict=True):
        same_history(a.history, b.history)
    assert [h["step"] for h in joined[4].history] == [2, 5, 8, 11]  # the 3rd, 6th, ... step's gradients
    assert [(h["reason"], h["step"]) for h in joined[0].history] == [
        ("task", 0),
        ("step", 4),
        ("task", 6),
        ("step", 8),
        ("step", 12),  # the end of training measures the same state: once
    ]


def test_lightning_calls_the_collection_not_its_members(tmp_path, monkeypatch):
    from lightning.pytorch.trainer import call

    called: list[str] = []
    dispatch = call._call_callback_hooks

    def spy(trainer, hook_name, *args, **kwargs):
        called.extend(
            type(c).__name__
            for c in trainer.callbacks
            if callable(getattr(c, hook_name, None)) and "batch" in hook_name
        )
        return dispatch(trainer, hook_name, *args, **kwargs)

    monkeypatch.setattr(call, "_call_callback_hooks", spy)
    joined = monitors(probe_size=128)
    trainer = digits_fit(tmp_path, joined, steps_per_task=2)
    members = {type(m).__name__ for m in joined}
    assert called.count("MonitorCollection") == 2 * 4  # batch start and end of each of the 4 steps
    assert not members & set(called)
    # after fit the members are callbacks of their own again: a new Trainer takes them as usual
    assert all(m.collection is None and callable(m.on_train_batch_end) for m in joined)
    assert trainer.callbacks.count(joined[0]) == 1


def test_checkpoint_keeps_each_member_state_and_a_resumed_fit_continues(tmp_path):
    joined = monitors(probe_size=128)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    digits_fit(tmp_path / "a", [*joined, checkpoint], max_steps=6, enable_checkpointing=True)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert {m.state_key for m in joined} <= set(state["callbacks"])
    assert not any("MonitorCollection" in key for key in state["callbacks"])
    resumed = monitors(probe_size=128)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        digits_fit(tmp_path / "b", resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    # every monitor key of the checkpoint belongs to a callback of the resumed fit (only ModelCheckpoint's is left)
    missing = [str(w.message) for w in record if "callbacks used to create the checkpoint" in str(w.message)]
    assert missing and not any("Monitor" in message for message in missing)
    unbroken = monitors(probe_size=128)
    digits_fit(tmp_path / "c", unbroken)
    # restored history (the first fit's end, after its last checkpoint, is not in it), then the same measurements
    assert [h["step"] for h in resumed[0].history] == [h["step"] for h in unbroken[0].history] == [0, 4, 6, 8, 12]
    same_history(resumed[4].history, unbroken[4].history)


def test_a_fit_that_failed_leaves_monitors_usable(tmp_path):
    class Fail(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise RuntimeError("stop here")

    joined = monitors(probe_size=128)
    with pytest.raises(RuntimeError, match="stop here"):
        digits_fit(tmp_path / "a", [*joined, Fail()])
    assert len(joined[0].history) == 1  # task 0 at step 0
    trainer = digits_fit(tmp_path / "b", joined)  # the same objects in a new Trainer: they gather again
    assert sum(isinstance(c, MonitorCollection) for c in trainer.callbacks) == 1
    assert [h["step"] for h in joined[0].history[1:]] == [4, 6, 8, 12]  # measured through the new collection


def test_a_collection_built_by_hand_and_monitors_that_cannot_join(tmp_path):
    rank, dormant = RankMonitor(probe_size=128), DormantUnitMonitor(probe_size=128)
    own, other = EpochStartRank(probe_size=128, prefix="own"), RankMonitor(probe_size=128, prefix="other")
    trainer = digits_fit(tmp_path, [MonitorCollection([rank, dormant]), own, other])
    assert trainer.callbacks[1:3] == [rank, dormant]  # in the callbacks, so Lightning checkpoints their state
    assert sum(isinstance(c, MonitorCollection) for c in trainer.callbacks) == 1  # `other` has no neighbour
    assert rank.history[-1]["step"] == 12 and dormant.history[-1]["step"] == 12
    assert [h["reason"] for h in own.history] == ["epoch start", "task", "epoch start", "task", "end"]
    with pytest.raises(PlasticityConfigError, match=r"MonitorCollection\.monitors: EpochStartRank cannot join"):
        MonitorCollection([rank, own])
    with pytest.raises(PlasticityConfigError, match=r"MonitorCollection\.monitors lists one monitor twice"):
        MonitorCollection([rank, rank])


class TinyLM(pl.LightningModule):
    """Embedding → GELU MLP block (functional activation, found at ``down:input``) → a wide vocabulary head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 50)
        self.head_calls = 0
        self.head.register_forward_hook(lambda *_: setattr(self, "head_calls", self.head_calls + 1))

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.down(nn.functional.gelu(self.up(x))))

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]).flatten(0, 1), batch[1].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_probe_pass_that_nobody_reads_the_output_of_ends_after_the_last_layer(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (64, 6))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, ids), batch_size=16)
    joined = [RankMonitor(every_n_steps=2), DormantUnitMonitor(every_n_steps=2), EntropyMonitor(every_n_steps=2)]
    torch.manual_seed(1)
    model = TinyLM()
    make_trainer(tmp_path / "a", callbacks=joined, max_epochs=2).fit(model, loader)
    measured = len(joined[0].history)
    assert measured == 4 and list(joined[0].layers) == ["down:input"]  # steps 2, 4, 6, 8 (the end is step 8)
    # 8 training steps call the head; of the 4 probe passes only the first (which learns the layer calls) does
    assert model.head_calls == 8 + 1
    torch.manual_seed(1)
    alone = [RankMonitor(every_n_steps=2), Nothing(), DormantUnitMonitor(every_n_steps=2), Nothing()]
    reference = TinyLM()
    make_trainer(tmp_path / "b", callbacks=alone, max_epochs=2).fit(reference, loader)
    same_history(joined[0].history, alone[0].history)
    same_history(joined[1].history, alone[2].history)
    # the values are the layer's own: an independent computation on the probe
    reference.eval()
    with torch.no_grad():
        units = nn.functional.gelu(reference.up(reference.embed(alone[0].probe.batch[0])))  # [64, 6, 32]
    import numpy as np

    sigma = np.linalg.svd(units.mean(dim=1).double().numpy(), compute_uv=False)
    p = sigma / sigma.sum()
    assert alone[0].history[-1]["down:input/effective_rank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))


def test_capture_until_ends_the_pass_and_keeps_every_call():
    shared = nn.Linear(4, 4)
    tail = nn.Linear(4, 3)
    seen = []
    tail.register_forward_hook(lambda *_: seen.append(1))
    net = nn.Sequential(shared, nn.ReLU(), shared, tail)  # `shared` runs twice per pass
    x = torch.randn(5, 4)
    calls: dict[str, int] = {}
    full, out = capture_outputs(net, x, {"0": shared}, calls=calls)
    assert calls == {"0": 2} and full["0"].shape == (10, 4) and out.shape == (5, 3) and seen == [1]
    cut, none = capture_outputs(net, x, {"0": shared}, until=calls)
    assert none is None and seen == [1] and torch.equal(cut["0"], full["0"])  # both calls kept, the tail skipped
