"""`plasticity fit N` equals `fit k` + resume, bit for bit, for each recipe family, through the CLI.

The first fit writes a checkpoint at the end of an epoch and one in the middle of an epoch; the fit resumed from
either, and the fit continued with `--ckpt_path last`, must end with the uninterrupted fit's weights exactly.
"""

import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from plasticity_lightning.cli import PlasticityCLI


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["plasticity"])


def _fit(args: list[str], cwd: Path, monkeypatch) -> dict[str, torch.Tensor]:
    """One `plasticity fit` in ``cwd``; the trained model's weights."""
    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    cli = PlasticityCLI(args=["fit", *args, "--trainer.enable_progress_bar=false"])
    return {name: value.detach().clone() for name, value in cli.model.state_dict().items()}


def _step_checkpoints(every: int) -> list[str]:
    """A second ModelCheckpoint that keeps a checkpoint every ``every`` steps (mid-epoch ones included)."""
    return [
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.dirpath=steps",
        f"--trainer.callbacks.every_n_train_steps={every}",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
    ]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = {
        name: float((a[name].double() - b[name].double()).abs().max())
        for name in a
        if not torch.equal(a[name], b[name])
    }
    assert not differ, f"weights differ after the resume: {differ}"


def _resume_cases(recipe_args, steps_per_epoch, epochs, tmp_path, monkeypatch):
    full_dir = tmp_path / "full"
    every = steps_per_epoch // 2 + 1
    full = _fit([*recipe_args, f"--trainer.max_epochs={epochs}", *_step_checkpoints(every)], full_dir, monkeypatch)
    mid_epoch = next(k for k in range(every, 10 * every, every) if k > steps_per_epoch and k % steps_per_epoch)
    checkpoint = full_dir / "steps" / f"step={mid_epoch}.ckpt"
    assert checkpoint.is_file(), sorted(p.name for p in (full_dir / "steps").iterdir())
    resumed = _fit(
        [*recipe_args, f"--trainer.max_epochs={epochs}", f"--ckpt_path={checkpoint}"], tmp_path / "mid", monkeypatch
    )
    _assert_same_weights(full, resumed)
    return full


def test_digits_quickstart_resumes_exactly(tmp_path, monkeypatch):
    recipe = [
        "--config",
        str(REPO / "recipes" / "quickstart.yaml"),
        "--data.init_args.schedule.init_args.epochs_per_task=1",
        "--model.init_args.dropout=0.2",  # draws from the global RNG, which the checkpoint must hold too
    ]
    _resume_cases(recipe, 34, 3, tmp_path, monkeypatch)
