"""The `plasticity` command: recipes, config composition, subcommands and error messages."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import RECIPES, REPO

from plasticity_lightning.cli import PlasticityCLI, main


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    # main(args) stands in for the command line; pytest's own arguments must not look like plasticity's
    monkeypatch.setattr(sys, "argv", ["plasticity"])


CIFAR_RECIPES = {r.name for r in RECIPES if "CIFAR10" in r.read_text()}  # CIFAR-10 and CIFAR-100 datamodules
OFFLINE = ["--data.init_args.synthetic=true", "--data.init_args.num_workers=0"]


# the distilgpt2 recipe needs pretrained weights and WikiText from the hub: its offline switch is the documented one
HUB_RECIPES = {"head_plasticity_distilgpt2.yaml"}
HUB_OFFLINE = [
    "--model.init_args.pretrained=false",
    "--data.init_args.dataset_name=null",
    "--data.init_args.corpus=shakespeare",
    "--data.init_args.max_tokens=20000",
]


def _offline_args(recipe: Path) -> list[str]:
    if recipe.name in HUB_RECIPES:
        return HUB_OFFLINE
    return OFFLINE if recipe.name in CIFAR_RECIPES else []


def _console_script(args: list[str]) -> subprocess.CompletedProcess:
    """Run the installed `plasticity` script, as a user would, and require success."""
    script = Path(sys.executable).with_name("plasticity")
    result = subprocess.run([script, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _print_config(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (None, 0)
    return capsys.readouterr().out


def test_recipes_exist():
    assert {
        "quickstart.yaml",
        "mlp_spirals.yaml",
        "convnet_cifar10_pairs.yaml",
        "resnet18_cifar100.yaml",
        "cbp_cifar.yaml",
        *(f"plasticity_loss_digits_{v}.yaml" for v in ("cbp", "redo", "shrink_perturb", "l2_init")),
        "head_plasticity_tiny_gpt2.yaml",
        "head_plasticity_distilgpt2.yaml",
        *(f"particles_{v}.yaml" for v in ("baseline", "weight_precision", "james_stein", "adaptive_loss")),
    } <= {r.name for r in RECIPES}
    assert {"convnet_cifar10_pairs.yaml", "resnet18_cifar100.yaml", "cbp_cifar.yaml"} == CIFAR_RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_recipe_print_config_round_trips(recipe, in_tmp, capsys):
    first = _print_config(["--config", str(recipe)], capsys)
    dumped = in_tmp / "dumped.yaml"
    dumped.write_text(first)
    assert _print_config(["--config", str(dumped)], capsys) == first
    config = yaml.safe_load(first)
    assert config["model"]["class_path"].startswith("plasticity_lightning.models.")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_recipe_fast_dev_run(recipe, in_tmp):
    main(
        [
            "fit",
            "--config",
            str(recipe),
            "--trainer.fast_dev_run=1",
            "--trainer.accelerator=cpu",
            *_offline_args(recipe),
        ]
    )


def test_quickstart_through_the_console_script_prints_per_task_accuracy(in_tmp):
    args = [
        "fit",
        "--config",
        str(REPO / "recipes" / "quickstart.yaml"),
        "--trainer.max_epochs=6",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.schedule.init_args.epochs_per_task=2",
    ]
    result = _console_script(args)
    output = result.stdout + result.stderr
    assert "Task 0 done: accuracy on it" in output and "Task 2 done" in output
    run = in_tmp / "runs" / "quickstart" / "version_0"
    assert (run / "task_accuracy.csv").exists() and (run / "checkpoints" / "last.ckpt").exists()
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    accuracies = [float(r["val/acc_task_0"]) for r in rows if r.get("val/acc_task_0")]
    assert len(accuracies) == 6 and accuracies[1] > 0.8  # task 0 is learned before the first switch


def test_module_entry_point_prints_the_version():
    import plasticity_lightning

    result = subprocess.run(
        [sys.executable, "-m", "plasticity_lightning", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"plasticity {plasticity_lightning.__version__}"


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"], ["test", "--help"]])
def test_help(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: plasticity")
    if args[0] == "fit":
        assert "--model.help [CLASS_PATH_OR_NAME]" in text and "--trainer.max_epochs" in text


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_other_subcommands(subcommand, in_tmp):
    main([subcommand, "--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.fast_dev_run=1"])


def test_short_class_names_on_the_command_line(in_tmp):
    main(
        [
            "fit",
            "--model",
            "MLP",
            "--model.hidden_sizes=[8]",
            "--data",
            "ToyDataModule",
            "--data.dataset",
            "moons",
            "--trainer.fast_dev_run=1",
        ]
    )


def test_fragments_compose(in_tmp, capsys):
    recipe = str(REPO / "recipes" / "mlp_spirals.yaml")
    fragments = ["configs/trainer/cpu.yaml", "configs/logger/tensorboard.yaml", "configs/callbacks/task_accuracy.yaml"]
    args = ["--config", recipe]
    for fragment in fragments:
        args += ["--config", str(REPO / fragment)]
    config = yaml.safe_load(_print_config(args, capsys))
    assert config["trainer"]["accelerator"] == "cpu" and config["trainer"]["precision"] == "32-true"
    assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    assert [c["class_path"] for c in config["trainer"]["callbacks"]] == [
        "plasticity_lightning.callbacks.TaskAccuracyTable"
    ]
    assert config["model"]["init_args"]["activation"] == "sine"  # the recipe's values survive


SEARCH_FILES = REPO / "configs" / "search"  # `plasticity tune --search` files, not `fit` fragments


@pytest.mark.parametrize(
    "fragment",
    sorted(p for p in (REPO / "configs").rglob("*.yaml") if SEARCH_FILES not in p.parents),
    ids=lambda p: p.stem,
)
def test_every_fragment_parses_with_the_quickstart(fragment, in_tmp, capsys):
    _print_config(["--config", str(REPO / "recipes" / "quickstart.yaml"), "--config", str(fragment)], capsys)


@pytest.mark.parametrize("search", sorted(SEARCH_FILES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_search_file_parses_and_its_keys_exist_in_the_recipe_it_names(search, in_tmp, capsys):
    from plasticity_lightning.tune.search import SearchSpec, check_keys

    spec = SearchSpec.from_yaml(search)
    assert spec.params and spec.objectives
    configs = re.findall(r"--config (\S+)", search.read_text())  # the command its header shows
    assert configs and configs[0].startswith("recipes/")
    config = yaml.safe_load(_print_config([arg for c in configs for arg in ("--config", str(REPO / c))], capsys))
    check_keys(config, spec)  # raises one line naming an unknown key


def test_wandb_fragment_runs_offline(in_tmp, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(in_tmp))
    args = [
        "fit",
        "--config",
        str(REPO / "recipes" / "quickstart.yaml"),
        "--config",
        str(REPO / "configs" / "logger" / "wandb.yaml"),
        "--trainer.logger.init_args.offline=true",
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
    ]
    try:
        main(args)
    finally:
        wandb.finish()  # the CLI leaves its run open, as a script would; later tests need a fresh one
    assert list(in_tmp.rglob("offline-run-*")), "W&B wrote no offline run"


def _run_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("plasticity: error:")]
    assert len(lines) == 1
    assert "usage:" not in err and "Traceback" not in err  # no page of usage text, no traceback
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.activation", "foo"], "MLP.activation='foo' is not supported; choose one of: relu"),
        (["--model.hidden_sizes", "[64, -3]"], "MLP.hidden_sizes[1]=-3 is invalid"),
        (["--data.schedule.num_tasks", "0"], "PermutedInputs.num_tasks=0 is invalid"),
    ],
)
def test_bad_values_give_one_line(extra, message, in_tmp, capsys):
    line = _run_error(
        ["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), *extra, "--trainer.fast_dev_run=1"], capsys
    )
    assert message in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trainer.max_epochs", "abc"], "trainer.max_epochs='abc' is invalid; expected int"),
        (["--model", "MLPX"], "--model MLPX: no such class; use one of CausalLM, ConvNet, MLP, ResNet18"),
        (
            ["--data", "CIFAR1000DataModule"],
            "--data CIFAR1000DataModule: no such class; use one of BinaryGaussianDataModule, CIFAR100DataModule",
        ),
        (["--model.optimizer.init_args.lr", "-1", "--trainer.fast_dev_run=1"], "MLP.optimizer: Invalid learning rate"),
    ],
)
def test_parser_errors_are_one_line_too(extra, message, in_tmp, capsys):
    line = _run_error(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), *extra], capsys)
    assert message in line


def test_unknown_dataset_gives_one_line(in_tmp, capsys):
    line = _run_error(["fit", "--model", "MLP", "--data", "ToyDataModule", "--data.dataset", "swiss_roll"], capsys)
    assert "ToyDataModule.dataset='swiss_roll' is not supported; choose one of: xor, moons, circles, spirals" in line


def test_missing_cifar_without_the_switch_gives_one_line(in_tmp, capsys):
    line = _run_error(
        [
            "fit",
            "--config",
            str(REPO / "recipes" / "resnet18_cifar100.yaml"),
            "--data.init_args.download=false",
            "--data.init_args.num_workers=0",
            "--trainer.fast_dev_run=1",
        ],
        capsys,
    )
    assert "CIFAR100DataModule: no CIFAR100 files in data_dir='data'" in line and "synthetic: true" in line


def test_traceback_on_request(in_tmp, monkeypatch):
    monkeypatch.setenv("PLASTICITY_TRACEBACK", "1")
    with pytest.raises(Exception, match=r"MLP\.activation='foo'"):
        main(["fit", "--model", "MLP", "--model.activation", "foo", "--data", "DigitsDataModule"])


def test_monitors_fragment_on_the_quickstart(in_tmp):
    main(
        [
            "fit",
            "--config",
            str(REPO / "recipes" / "quickstart.yaml"),
            "--config",
            str(REPO / "configs" / "callbacks" / "monitors.yaml"),
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.schedule.init_args.epochs_per_task=1",
        ]
    )
    run = in_tmp / "runs" / "quickstart" / "version_0"
    with (run / "metrics.csv").open() as f:
        columns = next(csv.reader(f))
    for key in (
        "plasticity/hidden.1.act/effective_rank",
        "plasticity/all/low_activity_fraction",
        "plasticity/predictions/prediction_entropy",
        "plasticity/all/distance_from_init",
        "plasticity/grad/global_norm",
        "dynamics/convergence_epoch",
    ):
        assert key in columns, key
    assert (run / "learning_dynamics.json").exists() and (run / "task_accuracy.csv").exists()


def _plasticity_loss_run(in_tmp, tasks: int) -> list[dict[str, str]]:
    main(
        [
            "fit",
            "--config",
            str(REPO / "recipes" / "plasticity_loss_digits.yaml"),
            "--trainer.enable_progress_bar=false",
            f"--trainer.max_epochs={2 * tasks}",
            f"--data.init_args.schedule.init_args.num_tasks={tasks}",
        ]
    )
    with (in_tmp / "runs" / "plasticity_loss_digits" / "version_0" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _task_start_series(rows, key):
    # one value per task start (the end-of-training measurement comes last)
    return [float(r[key]) for r in rows if r.get(key)]


def test_plasticity_loss_recipe_shows_rank_falling_and_dormancy_rising(in_tmp):
    rows = _plasticity_loss_run(in_tmp, tasks=30)
    rank = _task_start_series(rows, "plasticity/hidden.1.act/effective_rank")
    dormant = _task_start_series(rows, "plasticity/all/low_activity_fraction")
    assert len(rank) == len(dormant) == 31  # 30 task starts + the end of training
    assert sum(rank[-5:]) / 5 < 0.9 * sum(rank[:5]) / 5
    assert sum(dormant[-5:]) / 5 > 2 * sum(dormant[:5]) / 5


@pytest.mark.slow
def test_plasticity_loss_recipe_in_full(in_tmp):
    rows = _plasticity_loss_run(in_tmp, tasks=50)
    rank = _task_start_series(rows, "plasticity/hidden.1.act/effective_rank")
    dormant = _task_start_series(rows, "plasticity/all/low_activity_fraction")
    new_task = [float(r["continual/new_task_acc"]) for r in rows if r.get("continual/new_task_acc")]
    assert len(new_task) == 50
    assert sum(rank[-10:]) / 10 < 0.75 * sum(rank[:10]) / 10
    assert sum(dormant[-10:]) / 10 > 3 * sum(dormant[:10]) / 10
    assert sum(new_task[-10:]) / 10 < sum(new_task[:10]) / 10  # new tasks are learned less well


def test_duplicate_monitors_keep_the_first_and_say_when_settings_differ():
    from plasticity_lightning import DormantUnitMonitor, RankMonitor
    from plasticity_lightning.cli import _without_duplicates

    recipe, fragment = DormantUnitMonitor(tau=0.1), DormantUnitMonitor()
    with pytest.warns(UserWarning, match=r"DormantUnitMonitor is configured twice with different settings"):
        kept = _without_duplicates([recipe, RankMonitor(), fragment])
    assert kept[0] is recipe and len(kept) == 2
    other_prefix = DormantUnitMonitor(prefix="strict", tau=0.0)  # another prefix logs other keys: both run
    assert len(_without_duplicates([recipe, other_prefix])) == 2


def test_tiny_head_plasticity_recipe_runs_cycles_end_to_end(in_tmp):
    """The CPU head recipe, shortened: cycles run, their record is written and the monitors log per head."""
    config = yaml.safe_load((REPO / "recipes" / "head_plasticity_tiny_gpt2.yaml").read_text())
    config["trainer"].update(max_steps=30, val_check_interval=10, limit_val_batches=2, enable_progress_bar=False)
    short = {
        "PlasticityCycle": {
            "start_step": 6,
            "cycle": {"learn_steps": 8, "max_cycles": 3},
            "probe_size": 8,
            "max_new_tokens": 8,
        },
        "AttentionEntropyMonitor": {"every_n_steps": 10},
        "DegenerationMonitor": {"every_n_steps": 15, "max_new_tokens": 8},
    }
    for callback in config["trainer"]["callbacks"]:
        callback.setdefault("init_args", {}).update(short.get(callback["class_path"].rsplit(".", 1)[1], {}))
    config["data"]["init_args"]["max_tokens"] = 60_000
    recipe = in_tmp / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(recipe)])
    run = in_tmp / "runs" / "head_plasticity_tiny_gpt2" / "version_0"
    record = json.loads((run / "plasticity_cycle.json").read_text())
    assert len(record["cycles"]) == 3 and all(c["pruned"] and c["grown"] for c in record["cycles"])
    assert all(c["end_step"] - c["start_step"] == c["learn_steps"] for c in record["cycles"])
    with (run / "metrics.csv").open() as f:
        columns = set(next(csv.reader(f)))
    expected = {"attention_entropy/3/head_3", "degeneration/distinct_1", "cycle/perplexity_after", "val/perplexity"}
    assert expected <= columns


def test_cbp_cifar_follows_dohares_per_task_protocol():
    config = yaml.safe_load((REPO / "recipes" / "cbp_cifar.yaml").read_text())
    schedule = config["data"]["init_args"]["schedule"]["init_args"]
    lr = config["model"]["init_args"]["lr_scheduler"]
    assert lr["class_path"].endswith("PeriodicMultiStepLR")
    # the period (200) and the run's length (20 tasks x 200) are linked to the schedule, not repeated: see
    # test_the_stream_length_and_the_task_period_are_written_once for the values the built trainer gets
    assert lr["init_args"] == {"milestones": [60, 120, 160], "gamma": 0.2} and schedule["epochs_per_task"] == 200
    assert "max_epochs" not in config["trainer"] and schedule["classes_per_task"] == 5
    callbacks = [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]]
    # the monitors measure, at each task change, the network that early stopping kept
    assert callbacks.index("RestoreBestPerTask") < callbacks.index("RankMonitor")


def _small_mlp_checkpoint(tmp: Path, *extra: str) -> Path:
    """A 32-unit tanh MLP trained two steps on digits; the path of its last.ckpt."""
    main(
        [
            "fit",
            "--model=MLP",
            "--model.hidden_sizes=[32]",
            "--model.activation=tanh",
            "--model.optimizer=SGD",  # the quickstart's optimizer, so the run can resume with it
            "--model.optimizer.init_args.lr=0.05",
            "--model.optimizer.init_args.momentum=0.9",
            "--data=DigitsDataModule",
            *extra,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp}",
        ]
    )
    (path,) = tmp.glob("*/version_0/checkpoints/last.ckpt")
    return path


def test_a_checkpoint_of_another_architecture_is_refused_naming_both(in_tmp, capsys):
    checkpoint = _small_mlp_checkpoint(in_tmp / "small")
    line = _run_error(
        ["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), f"--ckpt_path={checkpoint}"], capsys
    )
    assert "holds a MLP with hidden_sizes=[32], activation='tanh'" in line
    assert "the recipe asks for hidden_sizes=[256, 256], activation='relu'" in line
    assert "--model_from_checkpoint true" in line


def test_model_from_checkpoint_trains_the_checkpoints_model(in_tmp):
    checkpoint = _small_mlp_checkpoint(in_tmp / "small")
    cli = PlasticityCLI(
        args=[
            "fit",
            "--config",
            str(REPO / "recipes" / "quickstart.yaml"),
            f"--ckpt_path={checkpoint}",
            "--model_from_checkpoint=true",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    widths = [module.out_features for module in cli.model.modules() if isinstance(module, torch.nn.Linear)]
    assert widths == [32, 10] and cli.trainer.current_epoch == 2


def test_a_checkpoint_model_that_does_not_fit_the_data_is_blamed_on_the_checkpoint(in_tmp, capsys):
    checkpoint = _small_mlp_checkpoint(in_tmp / "toy", "--data=ToyDataModule")  # 2 inputs, 2 classes
    line = _run_error(
        [
            "fit",
            "--config",
            str(REPO / "recipes" / "quickstart.yaml"),
            f"--ckpt_path={checkpoint}",
            "--model_from_checkpoint=true",
        ],
        capsys,
    )
    assert "the model built from --ckpt_path=" in line and "does not fit this run" in line
    assert "MLP.input_dim=2 does not match the datamodule" in line


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs two CPU cores for two DDP processes")
def test_ddp_fragment_alone_runs_two_cpu_processes(in_tmp):
    # the fragment alone (no --trainer.devices) starts two CPU processes on a machine without GPUs, and they train
    # a continual run together
    args = [
        "fit",
        "--config",
        str(REPO / "recipes" / "quickstart.yaml"),
        "--config",
        str(REPO / "configs" / "trainer" / "cpu.yaml"),
        "--config",
        str(REPO / "configs" / "trainer" / "ddp.yaml"),
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.schedule.init_args.epochs_per_task=1",
    ]
    result = _console_script(args)
    output = result.stdout + result.stderr
    assert "running 2 CPU processes" in output and "--trainer.devices N" in output
    assert "MEMBER: 2/2" in output  # Lightning's line for the second of two processes
    with (in_tmp / "runs" / "quickstart" / "version_0" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/acc_task_1")]
    assert len(rows) == 1 and 0 <= float(rows[0]["val/acc_task_0"]) <= 1


def test_validate_with_ckpt_path_last_keeps_the_runs_metrics(in_tmp):
    quick = ["--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.limit_val_batches=2"]
    quick += ["--trainer.enable_progress_bar=false"]
    main(["fit", *quick, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"])
    metrics = in_tmp / "runs" / "quickstart" / "version_0" / "metrics.csv"
    before = metrics.read_text()
    main(["validate", *quick, "--ckpt_path=last"])
    assert metrics.read_text() == before  # Lightning's CSV writer would have replaced it in the same folder
    assert (in_tmp / "runs" / "quickstart" / "version_1" / "metrics.csv").is_file()


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from plasticity_lightning.cli import SUBCOMMANDS, main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", *SUBCOMMANDS):
        assert f"\n    {name} " in listed, name
    for _, description in SUBCOMMANDS.values():
        assert description in listed


def test_report_subcommand_runs_without_lightning(tmp_path: Path) -> None:
    # `plasticity report` must not pay for importing Lightning: a bad run directory is refused in a fresh
    # interpreter that never loads it
    probe = (
        "import sys\n"
        "from plasticity_lightning.cli import main\n"
        "try:\n"
        f"    main(['report', {str(tmp_path)!r}])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 2, exit.code\n"
        "assert 'lightning' not in sys.modules and 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1 and "plasticity: error:" in result.stderr


def _built(args: list[str]) -> PlasticityCLI:
    return PlasticityCLI(args=[*args, "--trainer.logger=false", "--trainer.enable_progress_bar=false"], run=False)


def test_the_stream_length_and_the_task_period_are_written_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cifar = ["--config", str(REPO / "recipes" / "cbp_cifar.yaml"), *OFFLINE]
    cli = _built(cifar)
    schedule = cli.datamodule.schedule
    assert (schedule.epochs_per_task, cli.datamodule.num_classes // schedule.classes_per_task) == (200, 20)
    assert cli.trainer.max_epochs == 200 * 20  # nothing in the recipe says 4000
    period = cli.model.lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)).period
    assert period == 200
    # one override moves everything linked to it; an explicit value is kept
    cli = _built([*cifar, "--data.init_args.schedule.init_args.epochs_per_task=170"])
    scheduler = cli.model.lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    assert (cli.trainer.max_epochs, scheduler.period) == (3400, 170)
    cli = _built([*cifar, "--trainer.max_epochs=7", "--model.init_args.lr_scheduler.init_args.period=165"])
    scheduler = cli.model.lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    assert (cli.trainer.max_epochs, scheduler.period) == (7, 165)
    # steps per task give max_steps; a stream without a schedule keeps Lightning's own default
    quick = ["--config", str(REPO / "recipes" / "quickstart.yaml")]
    recipe = (REPO / "recipes" / "quickstart.yaml").read_text().replace("epochs_per_task: 3", "steps_per_task: 4")
    (tmp_path / "steps.yaml").write_text(recipe)
    cli = _built(["--config", str(tmp_path / "steps.yaml")])
    assert (cli.trainer.max_steps, cli.trainer.max_epochs) == (10 * 4, None)
    assert _built([*quick, "--data.init_args.schedule=null"]).trainer.max_epochs is None  # Lightning decides


def test_a_period_without_a_schedule_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = ["--config", str(REPO / "recipes" / "quickstart.yaml"), "--data.init_args.schedule=null"]
    periodic = "plasticity_lightning.optim.PeriodicMultiStepLR"
    scheduler = [f"--model.init_args.lr_scheduler={periodic}", "--trainer.max_epochs=1"]
    scheduler += ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0"]
    with pytest.raises(SystemExit) as exited:
        main(["fit", *recipe, *scheduler, "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    error = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(error) == 1
    assert "PeriodicMultiStepLR.period is not set; pass period" in error[0]
