"""Issue 26: the edges of reports/data.py's per-epoch table that tests/test_report_data.py leaves open (found by a
full mutmut run): ties in ``step`` beyond numpy's small-array insertion sort, epochs that are not in step order,
the dtypes of what it returns, and no stray column from the sort. Expected values are worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from plasticity_lightning.reports.data import RunData, load_run, read_epoch_table


def _csv(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.csv").write_text(text)
    return folder / "metrics.csv"


def test_rows_at_one_step_keep_their_logging_order_in_long_tables(tmp_path):
    # 20 rows logged at step 2, then 20 at step 1; v counts the logging calls. A stable sort puts the step-1 rows
    # (v 20..39) first and keeps each group's order, so the last value of epoch 0 is v = 19; numpy's quicksort on
    # 40 rows reorders the ties (it would give 7)
    rows = [f"0,{2 if i < 20 else 1},{i}" for i in range(40)]
    path = _csv(tmp_path, "epoch,step,v\n" + "\n".join(rows) + "\n")
    epochs, values = read_epoch_table(path)
    assert list(epochs) == [0] and sorted(values) == ["v"]  # no column left behind by the sort
    assert values["v"].tolist() == [19.0]
    run = load_run(tmp_path)
    assert run.values("v").tolist() == [*range(20, 40), *range(20)]
    assert run.epoch_table()[1]["v"].tolist() == [19.0]
    # without an epoch column: no per-epoch table, and nothing else
    no_epoch = _csv(tmp_path / "n", "step,v\n" + "\n".join(f"{i},{i}" for i in range(3)) + "\n")
    epochs, values = read_epoch_table(no_epoch)
    assert epochs.dtype.kind == "i" and epochs.size == 0 and values == {}


def test_epochs_come_back_sorted_as_integers_with_float_values(tmp_path):
    # an epoch logged at an earlier step than a smaller one (a resumed run renumbered): epochs still ascend
    path = _csv(tmp_path, "epoch,step,a\n1,1,10\n0,2,20\n1,3,30\n")
    epochs, values = read_epoch_table(path)
    assert epochs.tolist() == [0, 1] and epochs.dtype.kind == "i"
    assert values["a"].tolist() == [20.0, 30.0]
    # a RunData built by hand from integer columns: epochs are integers, values floats
    table = pd.DataFrame({"step": [1, 2, 3], "epoch": [2, 2, 0], "n": [4, 5, 6]})
    epochs, values = RunData(tmp_path, table).epoch_table()
    assert epochs.tolist() == [0, 2] and epochs.dtype.kind == "i"
    assert values["n"].dtype == np.float64 and values["n"].tolist() == [6.0, 5.0]
    empty, none = RunData(tmp_path, pd.DataFrame({"step": [1.0], "epoch": [np.nan], "x": [1.0]})).epoch_table()
    assert empty.dtype.kind == "i" and empty.size == 0 and none == {}
