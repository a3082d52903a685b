"""`plasticity fit N` equals `fit k` + resume, bit for bit, for each recipe family, through the CLI.

One uninterrupted fit also keeps a checkpoint every few steps; the fit resumed from one in the middle of an epoch
(and, for digits, a fit stopped at an epoch's end and continued with `--ckpt_path last`) must end with its weights
exactly. The
recipes run with tiny settings given on the command line; dropout and augmentation are on where the recipe has them,
so the global RNG states travel in the checkpoint too.
"""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from plasticity_lightning.cli import PlasticityCLI, main


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


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {n: float((a[n].double() - b[n].double()).abs().max()) for n in a if not torch.equal(a[n], b[n])}


def _check_resumes(
    recipe: list[str], steps_per_epoch: int, epochs: int, tmp_path: Path, monkeypatch, last: bool = False
) -> None:
    full_dir = tmp_path / "full"
    every = steps_per_epoch // 2 + 1
    full = _fit([*recipe, f"--trainer.max_epochs={epochs}", *_step_checkpoints(every)], full_dir, monkeypatch)

    # resumed from a checkpoint in the middle of the second epoch
    mid_epoch = next(k for k in range(every, 10 * every, every) if k > steps_per_epoch and k % steps_per_epoch)
    checkpoint = full_dir / "steps" / f"step={mid_epoch}.ckpt"
    assert checkpoint.is_file(), sorted(p.name for p in (full_dir / "steps").iterdir())
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert _differences(saved, full), "the uninterrupted fit did not train after the checkpoint"
    resumed = _fit(
        [*recipe, f"--trainer.max_epochs={epochs}", f"--ckpt_path={checkpoint}"], tmp_path / "mid", monkeypatch
    )
    assert not _differences(full, resumed), "weights differ after a mid-epoch resume"

    if not last:
        return
    # stopped at the end of the first epoch, continued with --ckpt_path last into the same version directory
    _fit([*recipe, "--trainer.max_epochs=1"], tmp_path / "last", monkeypatch)
    continued = _fit([*recipe, f"--trainer.max_epochs={epochs}", "--ckpt_path=last"], tmp_path / "last", monkeypatch)
    assert not _differences(full, continued), "weights differ after --ckpt_path last"
    versions = sorted(p.name for p in (tmp_path / "last" / "runs").glob("*/version_*"))
    assert versions == ["version_0"]


def test_digits_recipe_resumes_exactly(tmp_path, monkeypatch):
    recipe = [
        "--config",
        str(REPO / "recipes" / "quickstart.yaml"),
        "--data.init_args.schedule.init_args.epochs_per_task=1",
        "--data.init_args.batch_size=64",
        "--model.init_args.dropout=0.2",  # draws from the global RNG
    ]
    _check_resumes(recipe, steps_per_epoch=17, epochs=2, tmp_path=tmp_path, monkeypatch=monkeypatch, last=True)
    # the continued run kept the first run's rows: one row of validation accuracy per epoch, epochs 0 and 1
    with (tmp_path / "last" / "runs" / "quickstart" / "version_0" / "metrics.csv").open() as f:
        epochs = [int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("val/acc")]
    assert epochs == [0, 1]


def test_cifar_synthetic_recipe_resumes_exactly(tmp_path, monkeypatch):
    recipe = [
        "--config",
        str(REPO / "recipes" / "convnet_cifar10_pairs.yaml"),
        "--trainer.accelerator=cpu",
        "--data.init_args.synthetic=true",
        "--data.init_args.synthetic_size=500",
        "--data.init_args.num_workers=0",
        "--data.init_args.augment=true",  # flips and crops draw from the global RNG
        "--data.init_args.batch_size=20",
        "--data.init_args.schedule.init_args.epochs_per_task=2",
    ]
    _check_resumes(recipe, steps_per_epoch=4, epochs=3, tmp_path=tmp_path, monkeypatch=monkeypatch)


@pytest.mark.slow
def test_cbp_cifar_recipe_resumes_exactly(tmp_path, monkeypatch):
    """ResNet-18 with CBP, RestoreBestPerTask, a per-task LR schedule, monitors and augmentation (6 min, 2 cores)."""
    # CBP matures and replaces units within these few steps; the monitors read a small probe
    config = yaml.safe_load((REPO / "recipes" / "cbp_cifar.yaml").read_text())
    settings = {"ContinualBackprop": {"maturity_threshold": 2, "replacement_rate": 0.2}}
    settings |= {monitor: {"probe_size": 50} for monitor in ("RankMonitor", "DormantUnitMonitor")}
    for callback in config["trainer"]["callbacks"]:
        callback.setdefault("init_args", {}).update(settings.get(callback["class_path"].rpartition(".")[2], {}))
    recipe_file = tmp_path / "cbp_cifar_tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(config))
    recipe = [
        "--config",
        str(recipe_file),
        "--trainer.accelerator=cpu",
        "--data.init_args.synthetic=true",
        "--data.init_args.synthetic_size=1000",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=10",  # augmentation on: flips, crops and rotations draw from the global RNG
        "--data.init_args.schedule.init_args.epochs_per_task=2",
        "--model.init_args.lr_scheduler.init_args.period=2",
        "--model.init_args.lr_scheduler.init_args.milestones=[1]",
    ]
    _check_resumes(recipe, steps_per_epoch=5, epochs=3, tmp_path=tmp_path, monkeypatch=monkeypatch)


def test_text_recipe_resumes_exactly(corpus, tmp_path, monkeypatch):
    recipe = [
        "--config",
        str(REPO / "recipes" / "head_plasticity_tiny_gpt2.yaml"),
        "--trainer.max_steps=-1",
        "--trainer.val_check_interval=1.0",
        "--trainer.limit_val_batches=2",
        "--model.init_args.n_layer=1",
        "--model.init_args.n_head=2",
        "--model.init_args.n_embd=16",
        "--model.init_args.n_positions=64",  # the recipe's prompts plus 32 generated tokens
        "--data.init_args.corpus=null",
        f"--data.init_args.text_files=[{corpus / 'texts'}]",
        f"--data.init_args.data_dir={corpus / 'data'}",
        "--data.init_args.vocab_size=300",
        "--data.init_args.block_size=16",
        "--data.init_args.batch_size=16",
        "--data.init_args.max_tokens=1800",
    ]
    _check_resumes(recipe, steps_per_epoch=6, epochs=3, tmp_path=tmp_path, monkeypatch=monkeypatch)


def test_sigterm_saves_a_resumable_checkpoint_writes_summaries_and_exits_non_zero(tmp_path, monkeypatch):
    """A cluster scheduler's preemption: SIGTERM mid-fit, then `--ckpt_path last` continues in the same version."""
    script = Path(sys.executable).with_name("plasticity")
    recipe = [
        "fit",
        "--config",
        str(REPO / "recipes" / "quickstart.yaml"),
        "--trainer.enable_progress_bar=false",
        "--data.init_args.schedule.init_args.epochs_per_task=1",
    ]
    run = tmp_path / "runs" / "quickstart" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        [script, *recipe, "--trainer.max_epochs=30"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 240
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first epoch's checkpoint: training is under way
    first_step = torch.load(last, weights_only=True)["global_step"]
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=240)[0].decode()
    assert process.returncode == 143, output[-3000:]
    assert "stopped by SIGTERM" in output and "--ckpt_path last" in output
    stopped = torch.load(last, weights_only=True)
    assert stopped["global_step"] > first_step  # written at the signal, not the epoch-end checkpoint
    assert (run / "task_accuracy.csv").is_file()  # the summaries of the part that ran

    epochs = stopped["epoch"] + 1  # finish the epoch it stopped in
    monkeypatch.chdir(tmp_path)
    main([*recipe, f"--trainer.max_epochs={epochs}", "--ckpt_path=last"])
    assert torch.load(last, weights_only=True)["epoch"] == epochs - 1
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
