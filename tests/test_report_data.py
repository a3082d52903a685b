"""The report's data path (:mod:`plasticity_lightning.reports.data`) on hand-written run folders: what is found,
how a ``metrics.csv`` or TensorBoard log becomes one table, which kind of run it is, its series, tasks and accuracy
matrix, the optional files, and one clear line for each unusable input. Expected values are worked out by hand or
with pandas from the same text. These are the module's own tests for ``benchmarks/mutation.sh`` (the report tests
that train runs are too slow to repeat per mutant)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.core.errors import DataNotFoundError
from plasticity_lightning.reports.data import (
    RunData,
    find_run_dirs,
    finished_task_values,
    load_run,
    read_epoch_table,
    read_metrics_csv,
    read_tensorboard,
)

NAN = math.nan


def full(message: str) -> str:
    return f"^{re.escape(message)}$"


def _run(folder: Path, text: str, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.csv").write_text(text)
    for name, content in files.items():
        (folder / name.replace("__", ".")).write_text(content)
    return folder


def _table(text: str, folder: Path) -> RunData:
    return load_run(_run(folder, text))


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float), equal_nan=True)


# ---------------------------------------------------------------------------------------------- finding runs
def test_run_folders_are_found_below_a_path_and_never_inside_a_report(tmp_path):
    a = _run(tmp_path / "exp" / "b" / "version_0", "step,x\n1,1\n")
    b = _run(tmp_path / "exp" / "a" / "version_1", "step,x\n1,1\n")
    tb = tmp_path / "exp" / "tb"
    tb.mkdir()
    (tb / "events.out.tfevents.1.host").write_bytes(b"")
    _run(tmp_path / "exp" / "a" / "report" / "old", "step,x\n1,1\n")  # a report's own folder is not a run
    assert find_run_dirs(tmp_path / "exp") == sorted([a, b, tb])
    assert find_run_dirs(a) == [a] and find_run_dirs(tb) == [tb]
    with pytest.raises(DataNotFoundError, match=full(f"{tmp_path / 'nowhere'}: no such file or directory")):
        find_run_dirs(tmp_path / "nowhere")
    not_a_run = (
        "{} is not a run: no metrics.csv (CSVLogger) or events.out.tfevents.* (TensorBoardLogger) at or below it; "
        "give a run directory such as runs/<name>/version_0"
    )
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "notes.txt", tmp_path / "empty"):
        with pytest.raises(DataNotFoundError, match=full(not_a_run.format(path))):
            find_run_dirs(path)


def test_load_run_refuses_a_folder_of_several_runs_naming_them(tmp_path):
    runs = [_run(tmp_path / f"v{i}", "step,x\n1,1\n") for i in range(8)]
    listing = ", ".join(str(p) for p in runs[:6])
    message = f"{tmp_path} holds 8 runs ({listing}); name one of them, or use --compare"
    with pytest.raises(PlasticityConfigError, match=full(message)):
        load_run(tmp_path)
    assert load_run(runs[3]).directory == runs[3]


# ---------------------------------------------------------------------------------------------- metrics.csv
def test_metrics_csv_becomes_a_float_table(tmp_path):
    text = "epoch,step,train/loss,val/acc,big\n0,4,0.5,,1\n0,9,0.25,0.75,99999999999999999999\n"
    table = read_metrics_csv(_run(tmp_path, text) / "metrics.csv")
    # pandas reads the 20-digit integer as text; the table converts it to a number
    assert list(table.columns) == ["epoch", "step", "train/loss", "val/acc", "big"]
    assert all(dtype == np.float64 for dtype in table.dtypes)
    assert _same(table["big"], [1.0, 1e20]) and _same(table["val/acc"], [NAN, 0.75])
    assert _same(table["step"], [4, 9]) and _same(table["train/loss"], [0.5, 0.25])
    # only a step and an epoch logged on a row, and other rows with values: fine
    assert len(read_metrics_csv(_run(tmp_path / "b", "epoch,step,x\n0,1,\n0,2,3\n") / "metrics.csv")) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", "{}: a binary file, not a CSVLogger metrics.csv"),
        (b"step,x\n1,\xff\n", "{}: not UTF-8 text (byte 9), not a CSVLogger metrics.csv"),
        (b" \n\n", "{}: empty file, the run logged nothing"),
        (
            b"a,b,c,d,e,f,g\n1,2,3,4,5,6,7\n",
            "{}: no 'step' column (columns: a, b, c, d, e), not a CSVLogger metrics.csv",
        ),
        (b"epoch,step,x\n", "{}: header only, the run logged no values"),
        (b"step,x,y\n1,0.5,1\n2,1_000,2\n", "{}: column 'x', data row 2 holds '1_000', not a number"),
        (b"step,x\n1,0.5\n2, abc \n", "{}: column 'x', data row 2 holds 'abc', not a number"),
        (b"step,x\n1,0.5\n,0.25\n", "{}: data row 2 has no step"),
        (b"epoch,step,x\n0,1,\n0,2,\n", "{}: no logged values, only steps"),
    ],
)
def test_unusable_metrics_csv_gets_one_line_naming_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "metrics.csv"
    path.write_bytes(content)
    with pytest.raises(PlasticityConfigError, match=full(message.format(path))):
        read_metrics_csv(path)


def test_malformed_csv_names_the_parser_problem_on_one_line(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text('epoch,step,val/loss\n0,1,0.5,7,8\n"unclosed\n')
    with pytest.raises(PlasticityConfigError, match=rf"^{re.escape(str(path))}: malformed CSV \(Error tokenizing") as e:
        read_metrics_csv(path)
    assert "\n" not in str(e.value) and "  " not in str(e.value)


# ---------------------------------------------------------------------------------------------- TensorBoard
def _events(folder: Path, scalars: list[tuple[str, float, int, float]]) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(folder))
    for tag, value, step, wall in scalars:
        writer.add_scalar(tag, value, step, walltime=wall)
    writer.close()
    return folder


def test_tensorboard_scalars_become_one_row_per_step_and_occurrence(tmp_path):
    folder = _events(
        tmp_path / "tb",
        [
            ("val/acc", 0.5, 2, 10.0),
            ("train/loss", 1.0, 2, 11.0),
            ("val/acc", 0.25, 0, 12.0),  # logged later, at an earlier step: rows follow wall time
            ("val/acc", 0.75, 2, 13.0),  # a second value at step 2: a second row
        ],
    )
    table = read_tensorboard(folder)
    assert list(table["step"]) == [2.0, 0.0, 2.0] and table["step"].dtype == np.float64
    assert _same(table["val/acc"], [0.5, 0.25, 0.75]) and _same(table["train/loss"], [1.0, NAN, NAN])
    assert sorted(table.columns) == ["step", "train/loss", "val/acc"] and table.columns.name is None
    run = load_run(folder)
    assert run.source == "tensorboard" and _same(run.table["step"], [0.0, 2.0, 2.0])  # sorted by step, ties kept
    assert _same(run.values("val/acc"), [0.25, 0.5, 0.75]) and run.values("epoch").shape == (3,)
    empty = _events(tmp_path / "empty", [])
    with pytest.raises(PlasticityConfigError, match=full(f"{empty}: the TensorBoard event files hold no scalars")):
        read_tensorboard(empty)


# ---------------------------------------------------------------------------------------------- kinds of run
def test_what_kind_of_run_it_is(tmp_path):
    plain = _table("epoch,step,val/loss,val/acc\n0,1,0.5,0.9\n", tmp_path / "plain")
    assert plain.columns == ["val/loss", "val/acc"] and plain.task == "classification" and not plain.continual
    assert plain.num_tasks == 0 and plain.seed is None and plain.accuracy_matrix == {}
    regression = _table("epoch,step,val/loss,val/r2\n0,1,0.5,0.9\n", tmp_path / "regression")
    assert regression.task == "regression"
    hparams = _run(
        tmp_path / "hparams",
        "step,val/r2\n1,0.5\n",
        hparams__yaml="task: classification\nwidths: !!python/tuple [4, 8]\n",
    )
    run = load_run(hparams)
    assert run.task == "classification" and run.hparams == {"task": "classification", "widths": [4, 8]}
    np.savez(hparams / "predictions.npz", task=np.array("regression"), y=np.arange(3.0))
    run = load_run(hparams)
    assert run.task == "regression" and _same(run.predictions["y"], [0, 1, 2])
    seeds = {"seed_everything: 7\n": 7, "seed_everything: 7.0\n": 7, "seed_everything: true\n": None, "a: 1\n": None}
    for text, seed in seeds.items():
        assert load_run(_run(tmp_path / "seed", "step,x\n1,1\n", config__yaml=text)).seed == seed
    assert load_run(_run(tmp_path / "list", "step,x\n1,1\n", config__yaml="- 1\n- 2\n")).config == {}


def test_has_values_and_series_skip_what_was_not_logged(tmp_path):
    run = _table("epoch,step,a,b,c\n0,1,0.5,,\n0,2,,inf,\n1,3,0.25,,\n", tmp_path)
    assert run.has("a") and not run.has("b") and not run.has("c") and not run.has("missing")
    assert _same(run.values("missing"), [NAN, NAN, NAN])
    steps, values = run.series("a")
    assert _same(steps, [1, 3]) and _same(values, [0.5, 0.25])
    assert [len(part) for part in run.series("missing")] == [0, 0] and [len(part) for part in run.series("b")] == [0, 0]
    assert run.by_task("missing") == ([], [])
    assert run.by_task("a") == ([None, None], [0.5, 0.25])  # no tasks in this run


def test_rows_belong_to_tasks_the_way_measurements_and_training_see_them(tmp_path):
    # step 1: a measurement before any task id; steps 2 and 5: task ids; step 4: a validation row without one
    text = (
        "epoch,step,task_id,m,val/acc_task_0,val/acc_task_1\n"
        "0,1,,10,,\n0,2,0,,,\n0,4,,11,0.5,\n1,5,1,,,\n1,6,,12,0.25,0.75\n"
    )
    run = _table(text, tmp_path)
    assert _same(run.row_tasks, [0, 0, 1, 1, 1])  # the task logged next (a measurement precedes its task)
    assert _same(run.training_tasks, [0, 0, 0, 1, 1])  # the last task logged before (a row follows its steps)
    assert run.by_task("m") == ([0, 1, 1], [10.0, 11.0, 12.0])
    assert run.continual and run.num_tasks == 2
    assert _matrix_equal(run.accuracy_matrix, {0: [0.5, NAN], 1: [0.25, 0.75]})
    only_first = _table("step,task_id,x\n1,,1\n2,3,2\n", tmp_path / "ff")
    assert _same(only_first.training_tasks, [3, 3]) and _same(only_first.row_tasks, [3, 3])
    untasked = _table("step,x\n1,1\n", tmp_path / "none")
    assert _same(untasked.row_tasks, [NAN]) and _same(untasked.training_tasks, [NAN])


def _matrix_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)


def test_tasks_counted_from_ids_the_matrix_file_or_the_evaluated_columns(tmp_path):
    by_columns = _table("step,val/acc_task_0,val/acc_task_2,val/acc_task_x\n1,0.5,0.25,1\n", tmp_path / "c")
    assert by_columns.continual and by_columns.num_tasks == 3
    assert by_columns.accuracy_matrix == {}  # no task id: no row to put the values in
    ids = _table("step,task_id,val/acc_task_4\n1,2,0.5\n", tmp_path / "i")
    assert ids.num_tasks == 3 and ids.accuracy_matrix == {}  # task 4's column lies beyond the tasks trained
    matrix = "after_task,acc_task_0,acc_task_1,complete\n0,0.9,,1\n1,0.7,0.8,1\n2,0.6,0.5,0\n"
    with_file = load_run(_run(tmp_path / "f", "step,task_id,x\n1,0,1\n", task_accuracy__csv=matrix))
    assert _matrix_equal(with_file.accuracy_matrix, {0: [0.9, NAN], 1: [0.7, 0.8]})  # the incomplete row is left out
    assert with_file.num_tasks == 2 and with_file.continual
    only_file = load_run(
        _run(tmp_path / "o", "step,x\n1,1\n", task_accuracy__csv="after_task,acc_task_0\n0,0.5\n3,0.25\n")
    )
    assert (
        only_file.continual
        and only_file.num_tasks == 4
        and _matrix_equal(only_file.task_accuracy, {0: [0.5], 3: [0.25]})
    )
    bad = _run(tmp_path / "bad", "step,x\n1,1\n", task_accuracy__csv="task,acc_task_0\n0,0.5\n")
    with pytest.raises(
        PlasticityConfigError,
        match=full(f"{bad / 'task_accuracy.csv'}: no 'after_task' column, not a task-accuracy table"),
    ):
        load_run(bad)


def test_epoch_table_takes_the_last_value_of_each_epoch(tmp_path):
    text = "epoch,step,a,b\n,1,5,\n0,2,1,\n,3,2,\n1,4,,7\n,5,3,\n"
    run = _table(text, tmp_path)
    epochs, values = run.epoch_table()
    # epochs per row: bfill for the first row (0), ffill after: 0 0 0 1 1
    assert list(epochs) == [0, 1] and sorted(values) == ["a", "b"]
    assert _same(values["a"], [2, 3]) and _same(values["b"], [NAN, 7])
    epochs, values = read_epoch_table(tmp_path / "metrics.csv")
    assert list(epochs) == [0, 1] and _same(values["a"], [2, 3])
    none = _table("step,a\n1,1\n", tmp_path / "n")
    assert [len(part) for part in none.epoch_table()] == [0, 0]
    blank = _table("epoch,step,a\n,1,1\n", tmp_path / "blank")
    assert [len(part) for part in blank.epoch_table()] == [0, 0]
    assert [len(part) for part in read_epoch_table(tmp_path / "n" / "metrics.csv")] == [0, 0]


def test_finished_task_values_pair_each_value_with_its_task(tmp_path):
    text = "step,continual/task,continual/new_task_acc,x\n1,,,1\n2,0,0.5,\n3,2,0.25,\n"
    run = _table(text, tmp_path)
    assert finished_task_values(run, "continual/new_task_acc") == {0: 0.5, 2: 0.25}
    old = _table("step,continual/new_task_acc\n1,0.5\n2,0.25\n", tmp_path / "old")  # before continual/task existed
    assert finished_task_values(old, "continual/new_task_acc") == {0: 0.5, 1: 0.25}
    gap = _table("step,continual/task,continual/new_task_acc\n1,,0.5\n2,1,0.25\n", tmp_path / "gap")
    assert finished_task_values(gap, "continual/new_task_acc") == {0: 0.5, 1: 0.25}  # a value without its task
    assert finished_task_values(run, "x") == {0: 1.0} and finished_task_values(run, "missing") == {}


def test_optional_files_are_read_and_broken_ones_named(tmp_path):
    cycle = {"decisions": [{"step": 3, "action": "prune"}]}
    folder = _run(
        tmp_path / "run",
        "step,x\n2,1\n1,2\n",
        learning_dynamics__json=json.dumps({"pattern": "normal"}),
        plasticity_cycle__json=json.dumps(cycle),
        config__yaml="seed_everything: 3\nmodel:\n  width: 4\n",
    )
    run = load_run(folder)
    assert run.dynamics == {"pattern": "normal"} and run.cycle == cycle and run.config["model"] == {"width": 4}
    assert run.source == "csv" and _same(run.table["step"], [1, 2]) and _same(run.values("x"), [2, 1])
    assert "epoch" in run.table.columns and run.predictions is None and run.task_accuracy is None
    assert load_run(_run(tmp_path / "bare", "step,x\n1,1\n")).hparams == {}
    for name, text, what in [
        ("learning_dynamics.json", "{oops", "not valid JSON"),
        ("plasticity_cycle.json", "[1,", "not valid JSON"),
        ("hparams.yaml", "a: [1,\n", "not valid YAML"),
        ("config.yaml", "a: b: c\n", "not valid YAML"),
    ]:
        broken = _run(tmp_path / name, "step,x\n1,1\n")
        (broken / name).write_text(text)
        with pytest.raises(PlasticityConfigError, match=full(f"{broken / name}: {what}")):
            load_run(broken)
    unsafe = _run(tmp_path / "unsafe", "step,x\n1,1\n", hparams__yaml="f: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(PlasticityConfigError, match="not valid YAML"):
        load_run(unsafe)  # safe loading: no Python objects but tuples
    assert pd.read_csv(folder / "metrics.csv").shape == (2, 2)  # reading changed nothing on disk
