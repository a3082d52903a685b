"""Issue 23 items 3, 6, 7, 9 under two-process DDP: S&P toward θ₀, Normalize-and-Project and Parseval leave every rank
with identical weights, and GraMa's per-unit sums are reduced across ranks before the dormant share is taken."""

import textwrap

import pytest
import torch
from conftest import run_ddp_script

SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning.pytorch as pl
    import torch
    from plasticity_lightning import (MLP, DigitsDataModule, GradientDormancyMonitor, NormalizeAndProject,
                                      ParsevalRegularization, PermutedInputs, ShrinkAndPerturb, WeightChangeMonitor)

    out = sys.argv[1]
    pl.seed_everything(0)
    grama = GradientDormancyMonitor(tau=0.5, every_n_steps=2)
    change = WeightChangeMonitor(every_n_steps=3)

    class Dump(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            torch.save({"params": {k: v.cpu() for k, v in pl_module.state_dict().items()},
                        "grama": [dict(e) for e in grama.history], "change": [dict(e) for e in change.history]},
                       f"{out}.rank{trainer.global_rank}.pt")

    callbacks = [ShrinkAndPerturb(noise="initial", shrink=0.99, perturb=0.01, on_task_change=False, every_n_steps=1),
                 NormalizeAndProject(), ParsevalRegularization(weight=1e-2), grama, change, Dump()]
    model = MLP(hidden_sizes=[32, 32], norm="layer", optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    data = DigitsDataModule(batch_size=16, schedule=PermutedInputs(num_tasks=2, epochs_per_task=1))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=6,
                         limit_val_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, data)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_toolbox_keeps_ranks_identical_and_reduces_grama(tmp_path):
    out = run_ddp_script(tmp_path, SCRIPT, ["toolbox"])
    rank0, rank1 = (torch.load(f"{out}.rank{rank}.pt") for rank in (0, 1))
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    # each rank saw its own batches; the logged GraMa shares are the reduced ones, so equal, and not trivially 0 or 1
    assert [e["step"] for e in rank0["grama"]] == [2, 4, 6, 8, 10, 12]
    for a, b in zip(rank0["grama"], rank1["grama"], strict=True):
        assert a == b
    shares = [v for e in rank0["grama"] for k, v in e.items() if k.endswith("grama_dormant_fraction")]
    assert any(0 < v < 1 for v in shares)
    assert rank0["change"] == rank1["change"] and rank0["change"]
