"""Dohare et al.'s per-task protocol pieces: a step LR schedule that restarts every task, and per-task early
stopping (the best validation weights of each task move on to the next)."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from plasticity_lightning import (
    MLP,
    DigitsDataModule,
    HeadReset,
    PeriodicMultiStepLR,
    PermutedInputs,
    PlasticityConfigError,
    RankMonitor,
    RestoreBestPerTask,
    ShrinkAndPerturb,
)


# ---------------------------------------------------------------------------------------------- the LR schedule
def _scheduler(period=10, milestones=(3, 6, 8), gamma=0.2, lr=0.1):
    w = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([w], lr=lr)
    return optimizer, PeriodicMultiStepLR(optimizer, period=period, milestones=list(milestones), gamma=gamma)


def test_periodic_multistep_restarts_every_period_like_dohares_set_lr():
    optimizer, scheduler = _scheduler()
    rates = []
    for _ in range(25):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Dohare's set_lr: 0.1 at each task's start, x0.2 at offsets 3, 6 and 8 (here a 10-epoch task)
    within = [0.1] * 3 + [0.02] * 3 + [0.004] * 2 + [0.0008] * 2
    assert rates == pytest.approx(within + within + within[:5], rel=1e-12)


def test_periodic_multistep_resumes_from_its_state_dict():
    optimizer, scheduler = _scheduler()
    for _ in range(13):
        optimizer.step()
        scheduler.step()
    resumed_optimizer, resumed = _scheduler()
    resumed.load_state_dict(scheduler.state_dict())
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    for _ in range(9):
        optimizer.step()
        scheduler.step()
        resumed_optimizer.step()
        resumed.step()
        assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"period": 0}, r"PeriodicMultiStepLR.period=0 is invalid"),
        ({"milestones": [6, 3]}, r"milestones=\[6, 3\] is invalid; expected increasing integers in \[1, period=10\)"),
        ({"milestones": [3, 10]}, r"milestones=\[3, 10\] is invalid"),
        ({"gamma": 0.0}, r"PeriodicMultiStepLR.gamma=0.0 is invalid"),
    ],
)
def test_periodic_multistep_rejects_bad_arguments(kwargs, message):
    settings = {"period": 10, "milestones": [3, 6], "gamma": 0.2, **kwargs}
    w = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(PlasticityConfigError, match=message):
        PeriodicMultiStepLR(torch.optim.SGD([w], lr=0.1), **settings)


def test_periodic_multistep_drives_a_fit_task_by_task(tmp_path):
    rates = []

    class Rates(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = MLP(
        hidden_sizes=[16],
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        lr_scheduler=lambda o: PeriodicMultiStepLR(o, period=3, milestones=[1, 2], gamma=0.5),
    )
    data = DigitsDataModule(batch_size=256, schedule=PermutedInputs(num_tasks=2, epochs_per_task=3))
    make_trainer(tmp_path, max_epochs=6, limit_val_batches=0, callbacks=[Rates()]).fit(model, data)
    assert rates == pytest.approx([0.1, 0.05, 0.025] * 2)


# ---------------------------------------------------------------------------------------- best weights per task
class ScriptedScore(MLP):
    """An MLP whose validation logs a scripted ``val/score`` per epoch (and nothing depends on it)."""

    def __init__(self, scores):
        super().__init__(hidden_sizes=[16], optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9))
        self.scores = scores

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        self.log("val/score", self.scores[self.current_epoch])


class Weights(pl.Callback):
    """Copies of the weights after each epoch's validation and at each task's first batch (after the restore)."""

    def __init__(self):
        self.after_epoch, self.at_task_start, self.at_end = {}, {}, None
        self._task = None

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.after_epoch[trainer.current_epoch] = _copy(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        task = trainer.current_epoch // 3
        if task != self._task:
            self._task = task
            self.at_task_start[task] = _copy(pl_module)

    def on_train_end(self, trainer, pl_module):
        self.at_end = _copy(pl_module)


def _copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fit(tmp_path, scores, restore, max_epochs=6, before=(), after=(), trainer_args=None, **kwargs):
    weights = Weights()
    model = ScriptedScore(scores)
    data = DigitsDataModule(batch_size=128, schedule=PermutedInputs(num_tasks=2, epochs_per_task=3))
    callbacks = [*before, restore, weights, *after]
    trainer = make_trainer(
        tmp_path, max_epochs=max_epochs, num_sanity_val_steps=0, callbacks=callbacks, **(trainer_args or {})
    )
    trainer.fit(model, data, **kwargs)
    return trainer, model, weights


@pytest.mark.parametrize(
    ("mode", "best_epochs"),
    [("max", [1, 5]), ("min", [2, 3])],
)
def test_the_best_weights_of_each_task_move_on(tmp_path, mode, best_epochs):
    scores = [0.2, 0.9, 0.1, 0.3, 0.4, 0.7]
    restore = RestoreBestPerTask(monitor="val/score", mode=mode)
    _, _, weights = _fit(tmp_path, scores, restore)
    first, last = best_epochs
    # task 1 starts from task 0's best epoch, not from its last one
    assert _equal(weights.at_task_start[1], weights.after_epoch[first])
    assert not _equal(weights.at_task_start[1], weights.after_epoch[2]) or first == 2
    # the fit ends with task 1's best weights
    assert _equal(weights.at_end, weights.after_epoch[last])
    assert [(r["task"], r["epoch"]) for r in restore.restored] == [(0, first), (1, last)]
    assert restore.restored[0]["value"] == pytest.approx(scores[first])


def test_restoring_the_best_resumes_from_a_checkpoint(tmp_path):
    scores = [0.2, 0.9, 0.1, 0.3, 0.4, 0.7]
    trainer, _, _ = _fit(tmp_path / "a", scores, RestoreBestPerTask(monitor="val/score"), max_epochs=2)
    path = tmp_path / "mid-task.ckpt"
    trainer.save_checkpoint(path)
    resumed = RestoreBestPerTask(monitor="val/score")
    _, _, weights = _fit(tmp_path / "b", scores, resumed, ckpt_path=path)
    snapshot = torch.load(path, weights_only=False)["callbacks"][resumed.state_key]["snapshot"]
    # epoch 1, the best of task 0, was saved before the interruption and is what task 1 starts from
    assert _equal(weights.at_task_start[1], snapshot)
    assert [(r["task"], r["epoch"]) for r in resumed.restored] == [(0, 1), (1, 5)]


def test_a_fit_that_stops_mid_task_keeps_its_last_weights(tmp_path):
    restore = RestoreBestPerTask(monitor="val/score")
    _, _, weights = _fit(tmp_path, [0.2, 0.9, 0.1, 0.3, 0.8, 0.7], restore, max_epochs=5)
    assert [r["task"] for r in restore.restored] == [0]  # task 1 did not finish: nothing restored at the end
    assert _equal(weights.at_end, weights.after_epoch[4])


def test_restore_best_needs_the_monitored_value(tmp_path):
    with pytest.raises(PlasticityConfigError, match=r"RestoreBestPerTask.monitor='val/nope' was not logged"):
        _fit(tmp_path, [0.0] * 6, RestoreBestPerTask(monitor="val/nope"))
    with pytest.raises(PlasticityConfigError, match=r"RestoreBestPerTask.mode='best' is not supported"):
        RestoreBestPerTask(mode="best")


@pytest.mark.parametrize("intervention", [lambda: HeadReset(), lambda: ShrinkAndPerturb(shrink=0.5, perturb=0.0)])
def test_task_start_interventions_must_come_after_the_restore(tmp_path, intervention):
    with pytest.raises(PlasticityConfigError, match=r"RestoreBestPerTask comes after (HeadReset|ShrinkAndPerturb)"):
        _fit(tmp_path, [0.0] * 6, RestoreBestPerTask(monitor="val/score"), before=[intervention()])
    # in the right order the intervention acts on the restored weights: S&P halves task 0's best epoch
    restore, late = RestoreBestPerTask(monitor="val/score"), Weights()
    _, _, weights = _fit(
        tmp_path, [0.2, 0.9, 0.1, 0.3, 0.4, 0.7], restore, after=[ShrinkAndPerturb(shrink=0.5, perturb=0.0), late]
    )
    halved = {k: 0.5 * v for k, v in weights.after_epoch[1].items()}
    assert all(torch.allclose(late.at_task_start[1][k], halved[k]) for k in halved)


def test_monitors_before_the_restore_get_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="RankMonitor comes before RestoreBestPerTask"):
        _fit(tmp_path, [0.0] * 6, RestoreBestPerTask(monitor="val/score"), before=[RankMonitor(probe_size=64)])


@pytest.mark.parametrize("save_last", [True, "link"])
def test_the_last_checkpoint_holds_the_weights_kept_at_the_end(tmp_path, save_last):
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=save_last, save_top_k=1, monitor="val/score", mode="max"
    )
    scores = [0.2, 0.9, 0.1, 0.3, 0.4, 0.7]
    trainer, model, weights = _fit(
        tmp_path,
        [*scores[:5], 0.1],
        RestoreBestPerTask(monitor="val/score"),
        after=[checkpoint],
        trainer_args={"enable_checkpointing": True},
    )
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    # task 1's best is epoch 4, not the final epoch 5: last.ckpt holds it, and the callback's finished state
    assert _equal(last["state_dict"], weights.after_epoch[4]) and _equal(last["state_dict"], _copy(model))
    assert last["callbacks"][trainer.callbacks[0].state_key]["snapshot"] is None
    assert not (tmp_path / "ckpt" / "last.ckpt").is_symlink()
    # the best-by-monitor file (epoch 1, score 0.9) still holds its own epoch's weights
    (best,) = [p for p in (tmp_path / "ckpt").iterdir() if p.name != "last.ckpt"]
    assert best.name.startswith("epoch=1") and _equal(
        torch.load(best, weights_only=False)["state_dict"], weights.after_epoch[1]
    )
