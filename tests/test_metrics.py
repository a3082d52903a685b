import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plasticity_lightning import PerTaskAccuracy, per_task_accuracy
from plasticity_lightning.metrics.collapse import SoftmaxCollapse


def _numpy_per_task(preds, target, task_ids, num_tasks):
    out = np.full(num_tasks, np.nan)
    for k in range(num_tasks):
        rows = task_ids == k
        if rows.any():
            out[k] = np.mean(preds[rows] == target[rows])
    return out


@pytest.mark.parametrize("seed", range(3))
def test_functional_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    n, classes, tasks = 500, 7, 6
    logits = rng.normal(size=(n, classes))
    target = rng.integers(0, classes, n)
    task_ids = rng.integers(0, tasks - 1, n)  # the last task never occurs
    result = per_task_accuracy(torch.tensor(logits), torch.tensor(target), torch.tensor(task_ids), tasks)
    expected = _numpy_per_task(logits.argmax(1), target, task_ids, tasks)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6)
    assert torch.isnan(result[-1])


def test_metric_accumulates_like_the_functional():
    torch.manual_seed(0)
    preds, target, task_ids = torch.randint(0, 4, (300,)), torch.randint(0, 4, (300,)), torch.randint(0, 3, (300,))
    metric = PerTaskAccuracy(num_tasks=3)
    for chunk in range(0, 300, 70):
        metric.update(preds[chunk : chunk + 70], target[chunk : chunk + 70], task_ids[chunk : chunk + 70])
    assert torch.allclose(metric.compute(), per_task_accuracy(preds, target, task_ids, 3))
    metric.reset()
    assert metric.total.sum() == 0


def test_input_validation():
    with pytest.raises(ValueError, match=r"Expected every task id in \[0, 2\)"):
        per_task_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="matching N"):
        per_task_accuracy(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match=r"PerTaskAccuracy.num_tasks=0 is invalid"):
        PerTaskAccuracy(num_tasks=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collapse_rows(n: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Two-class logits with a gap of 200 (collapsed in float32: exp(-200) underflows) or of 0.5-5 (not), targets on
    the maximum or off it, and the flags by construction: collapsed, zero loss."""
    rng = np.random.default_rng(2)
    gap = np.where(rng.random(n) < 0.5, 200.0, rng.uniform(0.5, 5.0, n))
    on_max = rng.random(n) < 0.5
    logits = np.stack([np.zeros(n), gap], axis=1) + rng.normal(size=(n, 1))  # a common shift changes neither flag
    collapsed = gap == 200.0
    return torch.tensor(logits), torch.tensor(on_max.astype(np.int64)), collapsed, collapsed & on_max


def _ddp_worker(rank, world_size, port, preds, target, task_ids, logits, labels, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metric = PerTaskAccuracy(num_tasks=4)
        # each rank sees a different, uneven share of the rows
        rows = slice(0, 130) if rank == 0 else slice(130, None)
        metric.update(preds[rows], target[rows], task_ids[rows])
        # SoftmaxCollapse in the same two processes (one launch): 23 and 37 rows, two updates each; a second metric
        # gets one +inf logit in one row of rank 1 only
        finite, poisoned = SoftmaxCollapse(), SoftmaxCollapse()
        start, stop = (0, 23) if rank == 0 else (23, len(logits))
        for chunk in (slice(start, start + 7), slice(start + 7, stop)):
            finite.update(logits[chunk], labels[chunk])
            bad = logits[chunk].clone()
            if rank == 1:
                bad[0, 1] = math.inf
            poisoned.update(bad, labels[chunk])
        results[rank] = (metric.compute(), finite.compute(), poisoned.compute())
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process():
    torch.manual_seed(1)
    preds, target, task_ids = torch.randint(0, 3, (200,)), torch.randint(0, 3, (200,)), torch.randint(0, 4, (200,))
    logits, labels, collapsed, zero = _collapse_rows(60)
    manager = mp.Manager()
    results = manager.dict()
    args = (2, _free_port(), preds, target, task_ids, logits, labels, results)
    mp.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    expected = per_task_accuracy(preds, target, task_ids, 4)
    assert torch.allclose(results[0][0], expected) and torch.allclose(results[1][0], expected)

    # the construction, not the code under test, says which rows collapse; the two ranks' own shares differ
    assert collapsed[:23].mean() != collapsed[23:].mean() and zero[:23].mean() != zero[23:].mean()
    norm = np.linalg.norm(logits.numpy(), axis=1).mean()
    for rank in (0, 1):
        _, finite, poisoned = results[rank]
        assert float(finite["softmax_collapse"]) == collapsed.mean()
        assert float(finite["zero_terms"]) == zero.mean()
        assert math.isclose(float(finite["logit_norm"]), norm, rel_tol=1e-12)
        # rank 0 saw no bad row itself: the summed count of non-finite rows makes its shares NaN too
        assert math.isnan(float(poisoned["softmax_collapse"])) and math.isnan(float(poisoned["zero_terms"]))
        assert float(poisoned["logit_norm"]) == math.inf
