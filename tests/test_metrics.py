import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plasticity_lightning import PerTaskAccuracy, per_task_accuracy


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


def _ddp_worker(rank, world_size, port, preds, target, task_ids, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metric = PerTaskAccuracy(num_tasks=4)
        # each rank sees a different, uneven share of the rows
        rows = slice(0, 130) if rank == 0 else slice(130, None)
        metric.update(preds[rows], target[rows], task_ids[rows])
        results[rank] = metric.compute()
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process():
    torch.manual_seed(1)
    preds, target, task_ids = torch.randint(0, 3, (200,)), torch.randint(0, 3, (200,)), torch.randint(0, 4, (200,))
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), preds, target, task_ids, results), nprocs=2, join=True)
    expected = per_task_accuracy(preds, target, task_ids, 4)
    assert torch.allclose(results[0], expected) and torch.allclose(results[1], expected)
