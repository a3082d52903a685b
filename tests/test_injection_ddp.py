"""Two CPU processes under DDP: layer resets, plasticity injection and the random-init row agree on every rank."""

import textwrap

import pytest
import torch
from conftest import run_ddp_script

SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning.pytorch as pl
    import torch
    from plasticity_lightning import (MLP, DigitsDataModule, LayerReset, PermutedInputs, PlasticityInjection,
                                      TaskAccuracyTable)

    out = sys.argv[1]

    class Dump(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            torch.save({"params": {k: v.cpu() for k, v in pl_module.state_dict().items()},
                        "frozen": injection.policy.state_dict()["frozen"], "injections": injection.injections,
                        "resets": reset.resets, "random_init": table.random_init},
                       f"{out}.rank{trainer.global_rank}.pt")

    pl.seed_everything(0)
    reset, injection, table = LayerReset(layers=["hidden.0"]), PlasticityInjection(), TaskAccuracyTable()
    model = MLP(hidden_sizes=[32, 32], optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    data = DigitsDataModule(batch_size=16, schedule=PermutedInputs(num_tasks=2, epochs_per_task=1, eval_on="all"))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=4,
                         limit_val_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[reset, injection, table, Dump()])
    trainer.fit(model, data)
    """
)


@pytest.mark.slow  # one 2-process fit: ~100 s wall on the loaded 2-core machine, over the default tier's budget
@pytest.mark.timeout(600)
def test_resets_injection_and_the_random_init_row_are_identical_on_every_rank(tmp_path):
    out = run_ddp_script(tmp_path, SCRIPT, ["ddp"])
    rank0, rank1 = (torch.load(f"{out}.rank{rank}.pt") for rank in (0, 1))
    assert rank0["injections"] == rank1["injections"] == 1 and rank0["resets"] == rank1["resets"] == 1
    assert len(rank0["random_init"]) == 2 and rank0["random_init"] == rank1["random_init"]
    for frozen0, frozen1 in zip(rank0["frozen"], rank1["frozen"], strict=True):
        assert all(torch.equal(frozen0[name], frozen1[name]) for name in frozen0)
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
