"""Continual summaries at their boundaries (issue 26, mutation testing): which rows and cells each mean takes,
worked out by hand on tiny matrices. With test_metrics_edges.py and test_transfer.py's formula test they are
``metrics/continual_summary.py``'s own tests for ``benchmarks/mutation.sh``."""

import math

import pytest

from plasticity_lightning.metrics.continual_summary import (
    accuracy_matrix_summary,
    first_and_last,
    matrix_coverage,
    per_task_series,
    seen_accuracy,
    transfer_summary,
)

NAN = math.nan


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k]) for k in a
    )


def test_forgetting_takes_the_best_of_the_earlier_rows_including_the_tasks_own_and_never_the_current_one():
    rows = {2: [0.6, 0.85, 0.7], 0: [0.9, NAN, NAN], 1: [0.5, 0.8, NAN]}  # keys out of order: the last is 2
    summary = accuracy_matrix_summary(rows)
    # task 0: best of rows 0 and 1 (0.9) − 0.6 = 0.3; task 1: row 1 only, 0.8 − 0.85 = −0.05 (improved)
    assert _same(summary, {"new_task_acc": 0.7, "avg_seen_acc": (0.6 + 0.85 + 0.7) / 3, "avg_forgetting": 0.125})
    # a NaN earlier cell is left out of the best (max() would keep a leading NaN)
    gaps = accuracy_matrix_summary({0: [NAN, NAN], 1: [0.4, 0.9], 2: [0.3, 0.9, 0.5]})
    assert _same(gaps, {"new_task_acc": 0.5, "avg_seen_acc": (0.3 + 0.9 + 0.5) / 3, "avg_forgetting": (0.1 + 0.0) / 2})
    # a task not evaluated now has no forgetting; nor does one never evaluated before
    unseen = accuracy_matrix_summary({0: [0.9, NAN, NAN], 1: [NAN, 0.8, NAN], 2: [NAN, 0.6, 0.7]})
    assert _same(unseen, {"new_task_acc": 0.7, "avg_seen_acc": NAN, "avg_forgetting": 0.2})
    assert _same(
        accuracy_matrix_summary({0: [0.25]}), {"new_task_acc": 0.25, "avg_seen_acc": 0.25, "avg_forgetting": NAN}
    )


def test_first_and_last_ignore_infinities_and_windows_longer_than_the_series():
    assert first_and_last([math.inf, 2.0, -math.inf, 4.0], 2) == (2.0, 4.0)
    assert first_and_last([1.0, 3.0], 5) == (2.0, 2.0)
    assert first_and_last([1.0, 2.0, 3.0, 6.0], 3) == (2.0, 11.0 / 3)


def test_transfer_reads_only_the_cells_that_exist():
    # row 1 missing, row 2 shorter than the others, b longer than every row
    rows = {0: [0.9, 0.3, 0.2], 2: [0.6, 0.5]}
    got = transfer_summary(rows, [0.1, 0.2, 0.3, 0.4])
    # bwt: task 0 only (0.6 − 0.9); task 1's diagonal is missing
    # forward from row 0: k = 1 (0.3 − 0.2, also the next task) and k = 2 (0.2 − 0.3); row 2 has no future cell
    assert _same(got, {"bwt": -0.3, "fwt_next": 0.1, "fwt_all": 0.0})
    # b shorter than the rows: only the tasks b covers
    short = transfer_summary({0: [0.9, 0.4, 0.6], 1: [0.8, 0.7, 0.5]}, [0.1, 0.2])
    assert _same(short, {"bwt": -0.1, "fwt_next": 0.2, "fwt_all": 0.2})
    # a NaN b entry leaves its pair out; without any future cell forward transfer is NaN
    nan_b = transfer_summary({0: [0.9, 0.4, 0.6], 1: [0.8, 0.7, 0.5]}, [0.1, NAN, 0.2])
    assert _same(nan_b, {"bwt": -0.1, "fwt_next": 0.3, "fwt_all": (0.4 + 0.3) / 2})
    assert _same(transfer_summary({0: [0.9]}, [0.1]), {"bwt": NAN, "fwt_next": NAN, "fwt_all": NAN})


def test_seen_accuracy_and_coverage_of_a_matrix_with_a_missing_row():
    rows = {0: [0.8, NAN, NAN], 2: [0.5, 0.6, 0.7]}
    series = seen_accuracy(rows, 3)
    assert series[0] == 0.8 and math.isnan(series[1]) and series[2] == pytest.approx(0.6)
    assert matrix_coverage(rows) == "seen"  # the rows it has measured every seen task
    assert matrix_coverage({0: [0.8, NAN], 1: [0.6, NAN]}) == "partial"  # the current task unmeasured
    assert matrix_coverage({0: [NAN, 0.1], 1: [NAN, NAN]}) == "none"  # only a future task measured


def test_per_task_series_ignores_measurements_outside_the_stream():
    series = per_task_series([None, -1, 3, 1, 0, 1], [9.0, 8.0, 7.0, 6.0, 5.0, 4.0], num_tasks=2)
    # task 0's first is 5.0, task 1's 6.0; the last value (4.0) came after task 1's first one: the end state
    assert series == [5.0, 6.0, 4.0]
    # the last task measured only at the very end: no end state
    ended = per_task_series([0, 1], [1.0, 2.0], 2)
    assert ended[:2] == [1.0, 2.0] and math.isnan(ended[2])


def test_an_infinite_cell_is_not_a_measurement_in_the_seen_mean():
    rows = {0: [0.5, NAN], 1: [math.inf, 0.5]}
    assert math.isnan(accuracy_matrix_summary(rows)["avg_seen_acc"])
    assert seen_accuracy(rows, 2)[0] == 0.5 and math.isnan(seen_accuracy(rows, 2)[1])


def test_transfer_of_rows_shorter_than_the_stream_and_of_no_rows():
    # rows that hold only the first task's accuracy: the missing cells are NaN, not an error
    assert _same(transfer_summary({0: [0.9], 1: [0.6], 2: [0.5]}), {"bwt": 0.5 - 0.9, "fwt_next": NAN, "fwt_all": NAN})
    assert _same(transfer_summary({}), {"bwt": NAN, "fwt_next": NAN, "fwt_all": NAN})


def test_per_task_accuracy_names_the_shapes_it_got_in_full():
    import re

    import torch

    from plasticity_lightning.metrics.continual import per_task_accuracy

    message = "Expected `preds` ([N] or [N, C]), `target` [N] and `task_ids` [N] with matching N, got (2,), (1,), (2,)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        per_task_accuracy(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0, 0]), 2)
