"""``plasticity tune``: search files, config keys, objectives, bad input, failing trials, pruning, best.yaml."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from plasticity_lightning.cli import main
from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.tune.search import SearchSpec, apply, resolve
from plasticity_lightning.tune.study import TuneSetup, load_study, objective_values

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")

# Two permuted-digit tasks of two epochs, three batches each: a trial takes about a second.
TINY = {
    "trainer": {
        "max_epochs": 4,
        "limit_train_batches": 3,
        "limit_val_batches": 2,
        "log_every_n_steps": 1,
        "enable_checkpointing": False,
        "callbacks": [{"class_path": "plasticity_lightning.callbacks.TaskAccuracyTable"}],
    },
    "model": {"init_args": {"hidden_sizes": [16]}},
    "data": {
        "init_args": {
            "schedule": {
                "class_path": "plasticity_lightning.data.PermutedInputs",
                "init_args": {"num_tasks": 2, "epochs_per_task": 2, "seed": 0},
            }
        }
    },
}
OBJECTIVE = {"metric": "continual/new_task_acc", "reduce": "mean_last", "window": 2, "direction": "maximize"}


def _write(path: Path, data: object) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _tune(tmp_path: Path, search: dict, *extra: str, trials: int = 2) -> list[str]:
    tiny = _write(tmp_path / "tiny.yaml", TINY)
    search_file = _write(tmp_path / "search.yaml", search)
    return [
        "tune",
        "--config",
        QUICKSTART,
        "--config",
        tiny,
        "--search",
        search_file,
        "--trials",
        str(trials),
        "--out",
        str(tmp_path / "tune"),
        *extra,
    ]


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("plasticity: error:")]
    assert len(lines) == 1
    return lines[0]


def _study(folder: Path, name: str = "search") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.sqlite'}")


# ---------------------------------------------------------------------------------------------------- search files
def test_search_file_distributions_and_labels():
    spec = SearchSpec.from_dict(
        {
            "objective": "val/acc",
            "params": {
                "model.optimizer.lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
                "model.hidden_sizes": [[16], [32, 32]],
                "trainer.callbacks+": {"choices": {"none": None, "redo": {"class_path": "x.ReDo"}}},
                "trainer.max_epochs": {"type": "int", "low": 2, "high": 8, "step": 2},
            },
        }
    )
    lr, hidden, callbacks, epochs = spec.params
    assert lr.distribution() == optuna.distributions.FloatDistribution(1e-3, 0.3, log=True)
    assert epochs.distribution() == optuna.distributions.IntDistribution(2, 8, step=2)
    # lists are not Optuna values: they are stored by name and put back into the config whole
    assert hidden.labels == ["[16]", "[32, 32]"] and hidden.value("[32, 32]") == [32, 32]
    assert callbacks.labels == ["none", "redo"] and callbacks.value("redo") == {"class_path": "x.ReDo"}
    assert spec.objectives[0].direction == "maximize" and spec.objectives[0].reduce == "last"
    assert lr.label_of(0.05) == 0.05 and lr.label_of(0.5) is None and epochs.label_of(4) == 4
    assert callbacks.label_of(None) == "none"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"a.b": {"type": "float", "low": 2.0, "high": 1.0}}, "a.b: low=2.0 > high=1.0; expected low <= high"),
        (
            {"a.b": {"type": "float", "low": 0.0, "high": 1.0, "log": True}},
            "a.b: log scale over [0.0, 1.0] includes values <= 0; expected low > 0 with log: true",
        ),
        ({"a.b": {"type": "int", "low": 1.5, "high": 3}}, "a.b: low=1.5 is invalid; expected an integer"),
        ({"a.b": {"type": "float", "low": 1, "high": 2, "scale": 3}}, "a.b: unknown field 'scale' for a float"),
        ({"a.b": {"type": "normal"}}, "a.b: type='normal' is invalid; expected float, int or categorical"),
        ({"a.b": []}, "a.b: choices is empty"),
        ({"a.b": {"choices": [{"init_args": {}}]}}, "is a mapping without class_path"),
        ({"a+": {"type": "int", "low": 1, "high": 2}}, "a+: appending to a list needs a categorical distribution"),
    ],
)
def test_search_file_bad_distributions(params, message):
    with pytest.raises(PlasticityConfigError, match=r"search file s\.yaml: ") as err:
        SearchSpec.from_dict({"objective": "val/acc", "params": params}, source="s.yaml")
    assert message in str(err.value)


def test_search_file_bad_fields():
    with pytest.raises(PlasticityConfigError, match=r"unknown field 'trials'; allowed: objective, objectives"):
        SearchSpec.from_dict({"objective": "x", "params": {"a": [1]}, "trials": 3})
    with pytest.raises(PlasticityConfigError, match=r"objective 'x': direction='up' is invalid; expected maximize"):
        SearchSpec.from_dict({"objective": {"metric": "x", "direction": "up"}, "params": {"a": [1]}})
    with pytest.raises(PlasticityConfigError, match=r"objective 'x': window=3 needs reduce: mean_last"):
        SearchSpec.from_dict({"objective": {"metric": "x", "window": 3}, "params": {"a": [1]}})
    with pytest.raises(PlasticityConfigError, match=r"pruning with 2 objectives is not possible"):
        SearchSpec.from_dict({"objectives": ["x", "y"], "params": {"a": [1]}, "pruning": {"monitor": "x"}})
    with pytest.raises(PlasticityConfigError, match=r"sampler.class_path='optuna.pruners.NopPruner' is not a"):
        SearchSpec.from_dict(
            {"objective": "x", "params": {"a": [1]}, "sampler": "optuna.pruners.NopPruner"}
        ).build_sampler()


def test_keys_resolve_like_the_command_line():
    config = {
        "model": {
            "class_path": "m.MLP",
            "init_args": {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}},
        },
        "trainer": {
            "callbacks": [
                {"class_path": "plasticity_lightning.callbacks.TaskAccuracyTable", "init_args": {}},
                {"class_path": "plasticity_lightning.callbacks.ReDo", "init_args": {"tau": 0.025}},
            ]
        },
    }
    container, slot = resolve(config, "model.optimizer.lr")  # init_args left out, as in --model.optimizer.lr
    assert container[slot] == 0.1
    spec = SearchSpec.from_dict(
        {
            "objective": "x",
            "params": {
                "trainer.callbacks.ReDo.tau": {"type": "float", "low": 0, "high": 1},
                "trainer.callbacks.1.init_args.tau": {"type": "float", "low": 0, "high": 1},
                "trainer.callbacks+": {"choices": {"none": None, "l2": {"class_path": "c.L2Init"}}},
            },
        }
    )
    apply(config, spec.params[0], 0.5)
    assert config["trainer"]["callbacks"][1]["init_args"]["tau"] == 0.5
    apply(config, spec.params[1], 0.25)
    assert config["trainer"]["callbacks"][1]["init_args"]["tau"] == 0.25
    apply(config, spec.params[2], spec.params[2].value("none"))
    assert len(config["trainer"]["callbacks"]) == 2
    apply(config, spec.params[2], spec.params[2].value("l2"))
    assert config["trainer"]["callbacks"][-1] == {"class_path": "c.L2Init"}
    with pytest.raises(PlasticityConfigError, match=r"unknown key 'model.optimizer.lrr': 'model.optimizer.lrr' is not"):
        resolve(config, "model.optimizer.lrr")
    with pytest.raises(
        PlasticityConfigError, match=r"no element of class CBP in the list \(it holds TaskAccuracyTable"
    ):
        resolve(config, "trainer.callbacks.CBP.rate")


# ---------------------------------------------------------------------------------------------------- objectives
def test_objective_values_against_pandas(tmp_path):
    """mean_last over continual keys is the mean of the last tasks' values; other keys by logging call."""
    rows = []
    rng = np.random.default_rng(0)
    accuracy = rng.uniform(0.5, 1.0, size=6)
    for task, value in enumerate(accuracy):
        rows.append({"step": 10 * task, "val/acc": rng.uniform(), "continual/new_task_acc": None})
        rows.append({"step": 10 * task + 9, "continual/new_task_acc": value, "continual/task": task})
    rows.append({"step": 70, "val/acc": float("nan")})
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)
    table = pd.read_csv(run / "metrics.csv")
    spec = SearchSpec.from_dict(
        {
            "objectives": [
                {"metric": "continual/new_task_acc", "reduce": "mean_last", "window": 4},
                {"metric": "val/acc", "reduce": "max", "direction": "minimize"},
                {"metric": "val/acc"},
                {"metric": "continual/new_task_acc", "reduce": "mean_last"},
            ],
            "params": {"a": [1]},
        }
    )
    values = objective_values(run, spec)
    logged = table["val/acc"].dropna().to_numpy()
    assert values[0] == pytest.approx(accuracy[-4:].mean(), rel=1e-12)
    assert values[1] == pytest.approx(logged.max(), rel=1e-12)
    assert values[2] == pytest.approx(logged[-1], rel=1e-12)  # the last finite value, not the NaN row
    assert values[3] == pytest.approx(accuracy[-1], rel=1e-12)  # default window: a tenth of 6 tasks, at least one
    never = SearchSpec.from_dict({"objective": "train/loss", "params": {"a": [1]}})
    with pytest.raises(ValueError, match="objective train/loss was never logged"):
        objective_values(run, never)


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_search_files_exit_2_before_any_trial(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = {"objective": OBJECTIVE, "params": {"model.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.1}}}
    unknown = {**good, "params": {"model.optimizer.lrr": {"type": "float", "low": 0.01, "high": 0.1}}}
    line = _error(capsys, _tune(tmp_path, unknown))
    assert "unknown key 'model.optimizer.lrr': 'model.optimizer.lrr' is not in the config (there: " in line
    flipped = {**good, "params": {"model.optimizer.lr": {"type": "float", "low": 0.1, "high": 0.01}}}
    assert "model.optimizer.lr: low=0.1 > high=0.01; expected low <= high" in _error(capsys, _tune(tmp_path, flipped))
    log_zero = {**good, "params": {"model.optimizer.lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}}
    assert "log scale over [0, 0.1] includes values <= 0" in _error(capsys, _tune(tmp_path, log_zero))
    line = _error(capsys, _tune(tmp_path, good, "--storage", "nosuchdb://x/y"))
    assert "--storage 'nosuchdb://x/y' cannot be opened: " in line
    line = _error(capsys, _tune(tmp_path, good, "--storage", f"sqlite:///{tmp_path}/missing/dir/s.db"))
    assert f"--storage 'sqlite:///{tmp_path}/missing/dir/s.db' cannot be opened: OperationalError" in line
    never = {**good, "objective": {"metric": "continual/new_task_accuracy"}}
    line = _error(capsys, _tune(tmp_path, never))
    assert (
        "objective metric 'continual/new_task_accuracy' is never logged by the recipe (a 3-epoch probe logged: " in line
    )
    assert "continual/new_task_acc," in line  # what the recipe does log, to pick from
    monitor = {**good, "pruning": {"monitor": "val/accuracy"}}
    assert "pruning.monitor 'val/accuracy' is not in trainer.callback_metrics" in _error(
        capsys, _tune(tmp_path, monitor)
    )
    # none of these started a trial
    assert not (tmp_path / "tune" / "trials").exists()
    storage = f"sqlite:///{tmp_path / 'tune' / 'study.sqlite'}"
    assert optuna.get_all_study_summaries(storage) == []


@pytest.mark.parametrize(("option", "value"), [("--trials", "0"), ("--workers", "two"), ("--retries", "-1")])
def test_bad_options_exit_2_in_one_line(tmp_path, capsys, option, value):
    """The command's own options go through the one CommandParser: one line naming the option and the value."""
    line = _error(capsys, ["tune", "--config", "r.yaml", "--search", "s.yaml", "--trials", "2", option, value])
    assert f'plasticity tune: Parser key "{option[2:]}"' in line and "Not of type" in line and value in line


# ---------------------------------------------------------------------------------------------------- studies
def test_tune_best_yaml_reproduces_the_best_trial(tmp_path, monkeypatch, capsys):
    """Trial 0 is the recipe's own values; best.yaml run by `plasticity fit` gives the best trial's number again."""
    monkeypatch.chdir(tmp_path)
    search = {
        "objective": OBJECTIVE,
        "params": {
            "model.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
            "model.optimizer.momentum": {"type": "float", "low": 0.0, "high": 0.95},
        },
        "sampler": {"class_path": "optuna.samplers.RandomSampler", "init_args": {"seed": 3}},
    }
    main(_tune(tmp_path, search, trials=2))
    out = capsys.readouterr().out
    folder = tmp_path / "tune"
    study = _study(folder)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert study.trials[0].params == {"model.optimizer.lr": 0.05, "model.optimizer.momentum": 0.9}  # the recipe's
    for trial in study.trials:
        run = Path(trial.user_attrs["run_dir"])
        assert run == folder / "trials" / f"trial_{trial.number:04d}"
        logged = yaml.safe_load((run / "config.yaml").read_text())  # what `fit` saved: the sampled values
        assert logged["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(
            trial.params["model.optimizer.lr"]
        )
        table = pd.read_csv(run / "metrics.csv")  # independent: the mean of the two tasks' new-task accuracy
        assert trial.value == pytest.approx(table["continual/new_task_acc"].dropna().to_numpy().mean(), rel=1e-12)
    best = study.best_trial
    assert f"best: trial {best.number}: {best.value:.6g}" in out
    assert (folder / "report" / "report.html").is_file()
    page = (folder / "report" / "report.html").read_text()
    assert 'data-chart-id="history-0"' in page and 'id="trials"' in page and "https://" not in page.split("<body>")[1]

    main(["fit", "--config", str(folder / "best.yaml")])
    runs = sorted((tmp_path / "runs" / "quickstart").glob("version_*"))
    assert len(runs) == 1
    again = pd.read_csv(runs[0] / "metrics.csv")["continual/new_task_acc"].dropna().to_numpy()
    assert again.mean() == best.value  # same seed, same values: the same number, bit for bit
    report = main(["report", str(runs[0])])
    assert report is None and (runs[0] / "report" / "report.html").is_file()


def test_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    search = {
        "objective": OBJECTIVE,
        "params": {"model.optimizer.lr": [0.05, -1.0]},  # SGD refuses a negative learning rate
        "sampler": "optuna.samplers.BruteForceSampler",
    }
    main(_tune(tmp_path, search, trials=2))
    study = _study(tmp_path / "tune")
    states = {t.params["model.optimizer.lr"]: t for t in study.trials}
    assert states[0.05].state == optuna.trial.TrialState.COMPLETE
    failed = states[-1.0]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs["fail_reason"] == "MLP.optimizer: Invalid learning rate: -1.0"
    assert "trial 1: fail (MLP.optimizer: Invalid learning rate: -1.0)" in capsys.readouterr().out
    best = yaml.safe_load((tmp_path / "tune" / "best.yaml").read_text())  # its header lines are YAML comments
    assert best["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.05


def test_pruned_trials_stop_early_and_rerun_resumes(tmp_path, monkeypatch, capsys):
    """A pruner that prunes at the first report stops the fit after its first epoch; rerunning adds no trial, and
    rerunning with another search under the same study name is refused."""
    monkeypatch.chdir(tmp_path)
    search = {
        "objective": {"metric": "val/acc", "reduce": "max"},
        "params": {"model.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.1}},
        "pruning": {
            "monitor": "val/acc",
            "pruner": {"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"lower": 2.0}},
        },
    }
    argv = _tune(tmp_path, search, trials=2)
    main(argv)
    study = _study(tmp_path / "tune")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    for trial in study.trials:
        assert list(trial.intermediate_values) == [0]
        epochs = pd.read_csv(Path(trial.user_attrs["run_dir"]) / "metrics.csv")["epoch"].dropna()
        assert epochs.max() == 0  # stopped after epoch 0 of 4
    assert not (tmp_path / "tune" / "best.yaml").exists()
    main(argv)  # the same command again: the study is complete, nothing runs
    assert len(_study(tmp_path / "tune").trials) == 2
    other = {**search, "params": {"model.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.2}}}
    line = _error(capsys, _tune(tmp_path, other, trials=2))
    assert "was started with another recipe or search file; rerun it with the same --config and --search" in line


def test_load_study_uses_the_search_files_pruner(tmp_path):
    spec = SearchSpec.from_dict(
        {
            "objective": "x",
            "params": {"a": [1]},
            "pruning": {"monitor": "x", "pruner": "optuna.pruners.PercentilePruner"},
        },
    )
    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="s", storage=url)
    with pytest.raises(PlasticityConfigError, match=r"pruning.pruner: .*percentile"):
        spec.build_pruner()  # PercentilePruner needs its percentile
    spec.pruner["init_args"] = {"percentile": 25.0}
    study = load_study(TuneSetup({}, spec, tmp_path, url, "s", 1))
    assert isinstance(study.pruner, optuna.pruners.PercentilePruner)
