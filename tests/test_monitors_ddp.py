"""Two CPU processes under DDP log the same monitor values as one process on the same probe."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import lightning.pytorch as pl
    import torch
    from plasticity_lightning import (MLP, DigitsDataModule, DormantUnitMonitor, EntropyMonitor, GradientFlowMonitor,
                                      PermutedInputs, RankMonitor, WeightMonitor)

    devices, out = int(sys.argv[1]), sys.argv[2]
    pl.seed_everything(0)
    monitors = [RankMonitor(probe_size=256), DormantUnitMonitor(probe_size=256), EntropyMonitor(probe_size=256),
                WeightMonitor(), GradientFlowMonitor(every_n_steps=4)]

    class Dump(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            with open(f"{out}.rank{trainer.global_rank}.json", "w") as f:
                json.dump({type(m).__name__: m.history for m in monitors}, f)

    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_epochs=2, limit_train_batches=6, limit_val_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[*monitors, Dump()])
    model = MLP(hidden_sizes=[32, 32], optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer.fit(model, DigitsDataModule(batch_size=32, schedule=PermutedInputs(num_tasks=2, epochs_per_task=1)))
    """
)


def _run(tmp_path, devices):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"devices{devices}"
    result = subprocess.run(
        [sys.executable, str(script), str(devices), str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"devices{devices}.rank{rank}.json").read_text()) for rank in range(devices)]


def _values(record):
    return {k: v for k, v in record.items() if "/" in k}


@pytest.mark.timeout(600)
def test_ddp_ranks_agree_and_match_one_process(tmp_path):
    (single,) = _run(tmp_path, 1)
    rank0, rank1 = _run(tmp_path, 2)
    for monitor, history in rank0.items():
        assert history, f"{monitor} measured nothing"
        # every rank measured the same rows with the same weights: identical values, bit for bit
        assert history == rank1[monitor], monitor
    for monitor in ("RankMonitor", "DormantUnitMonitor", "EntropyMonitor", "WeightMonitor"):
        first_ddp, first_single = rank0[monitor][0], single[monitor][0]
        assert first_ddp["step"] == first_single["step"] == 0
        # before any update the weights are the same seeded initialisation: DDP equals one process
        ddp_values, single_values = _values(first_ddp), _values(first_single)
        assert ddp_values.keys() == single_values.keys()
        for key, value in single_values.items():
            assert ddp_values[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (monitor, key)
