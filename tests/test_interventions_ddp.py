"""Two CPU processes under DDP: every intervention takes the same decisions on every rank."""

import textwrap

import pytest
import torch
from conftest import run_ddp_script

SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning.pytorch as pl
    import torch
    from plasticity_lightning import (MLP, ContinualBackprop, DigitsDataModule, HeadReset, L2Init, PermutedInputs,
                                      ReDo, ShrinkAndPerturb, SurgeCollapse)

    out, variant = sys.argv[1], sys.argv[2]

    class Dump(pl.Callback):
        def __init__(self, cbp, redo, name):
            self.cbp, self.redo, self.name = cbp, redo, name

        def on_fit_end(self, trainer, pl_module):
            torch.save({"params": {k: v.cpu() for k, v in pl_module.state_dict().items()},
                        "replaced": {k: s.replaced for k, s in self.cbp.states.items()},
                        "recycled": dict(self.redo.replaced)}, f"{out}{self.name}.rank{trainer.global_rank}.pt")

    def fit(model, data, callbacks, max_epochs=2, **kwargs):
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=max_epochs, limit_train_batches=8,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks, **kwargs)
        trainer.fit(model, data)

    # BatchNorm: each rank's running statistics differ until DDP re-broadcasts them at the next forward, so
    # eval-mode probe features differ between ranks; ReDo and CBP must still agree
    class BNNet(pl.LightningModule):

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 48), torch.nn.BatchNorm1d(48),
                                           torch.nn.ReLU(), torch.nn.Linear(48, 48), torch.nn.BatchNorm1d(48),
                                           torch.nn.ReLU(), torch.nn.Linear(48, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    pl.seed_everything(0)
    if variant == "mlp":
        cbp = ContinualBackprop(replacement_rate=0.02, maturity_threshold=3, accumulate=False,
                                utility="adaptable_contribution")
        redo = ReDo(every_n_steps=4, tau=0.3, probe_size=64)
        others = [ShrinkAndPerturb(noise="gaussian", shrink=1.0, perturb=1e-3, every_n_steps=3),
                  L2Init(weight=1e-3), HeadReset(), SurgeCollapse(collapse_every_n_steps=5, surge_every_n_steps=7),
                  SurgeCollapse(mode="entropy_gated", entropy_threshold=100.0, gradient_threshold=1e-2, seed=3)]
        model = MLP(hidden_sizes=[32, 32], optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
        data = DigitsDataModule(batch_size=16, schedule=PermutedInputs(num_tasks=2, epochs_per_task=1))
        fit(model, data, [cbp, redo, *others, Dump(cbp, redo, "")], limit_val_batches=2)
    elif variant == "regression":  # weight constraints and the adaptive loss: deterministic, so ranks agree
        from plasticity_lightning import (AdaptiveLossWeights, JamesSteinShrinkage, OscillationDampener,
                                          ParticleDataModule, WeightPrecision)

        class DumpRegression(pl.Callback):
            def on_fit_end(self, trainer, pl_module):
                torch.save({"params": {k: v.cpu() for k, v in pl_module.state_dict().items()},
                            "applied": [c.applications for c in constraints]},
                           f"{out}.regression.rank{trainer.global_rank}.pt")

        constraints = [OscillationDampener(mode="adaptive", every_n_steps=2, every_n_epochs=None),
                       JamesSteinShrinkage(variance=1e-3),
                       WeightPrecision(bits=12, mode="ieee_bits", max_additional_bits=4)]
        model = MLP(hidden_sizes=[16, 16], task="regression", loss="adaptive_physics_aware")
        fit(model, ParticleDataModule(n_particles=400, batch_size=16),
            [*constraints, AdaptiveLossWeights(), DumpRegression()], max_epochs=6)
    elif variant == "restore":  # per-task early stopping on a value that differs between ranks: rank 0 decides
        from plasticity_lightning import RestoreBestPerTask

        class RankLocalScore(pl.Callback):
            scores = {0: [0.1, 0.9, 0.2, 0.3, 0.8, 0.1], 1: [0.9, 0.1, 0.2, 0.8, 0.1, 0.3]}

            def on_validation_end(self, trainer, pl_module):
                if not trainer.sanity_checking:
                    score = self.scores[trainer.global_rank][trainer.current_epoch]
                    trainer.callback_metrics["val/local"] = torch.tensor(score)

        class DumpRestore(pl.Callback):
            def on_fit_end(self, trainer, pl_module):
                torch.save({"params": {k: v.cpu() for k, v in pl_module.state_dict().items()},
                            "restored": restore.restored}, f"{out}.restore.rank{trainer.global_rank}.pt")

        restore = RestoreBestPerTask(monitor="val/local")
        model = MLP(hidden_sizes=[32], optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
        data = DigitsDataModule(batch_size=16, schedule=PermutedInputs(num_tasks=2, epochs_per_task=3))
        fit(model, data, [RankLocalScore(), restore, DumpRestore()], max_epochs=6, limit_val_batches=2)
    else:
        redo = ReDo(every_n_steps=3, tau=0.5, probe_size=64)
        cbp = ContinualBackprop(replacement_rate=0.02, maturity_threshold=3, accumulate=False)
        fit(BNNet(), DigitsDataModule(batch_size=16), [redo, cbp, Dump(cbp, redo, ".bn")])
    """
)


@pytest.mark.timeout(600)
def test_interventions_leave_every_rank_with_identical_weights(tmp_path):
    out = run_ddp_script(tmp_path, SCRIPT, ["mlp", "bn"])
    for run in ("", ".bn"):
        rank0, rank1 = (torch.load(f"{out}{run}.rank{rank}.pt") for rank in (0, 1))
        assert sum(rank0["replaced"].values()) > 0 and sum(rank0["recycled"].values()) > 0, run
        assert rank0["replaced"] == rank1["replaced"] and rank0["recycled"] == rank1["recycled"], run
        for name, value in rank0["params"].items():
            if "running_" in name or "num_batches" in name:
                continue  # BN buffers are rank-local until DDP broadcasts rank 0's at the next forward
            assert torch.equal(value, rank1["params"][name]), (run, name)


@pytest.mark.timeout(600)
def test_constraints_and_adaptive_loss_keep_ranks_identical(tmp_path):
    out = run_ddp_script(tmp_path, SCRIPT, ["regression"])
    rank0, rank1 = (torch.load(f"{out}.regression.rank{rank}.pt") for rank in (0, 1))
    assert rank0["applied"] == rank1["applied"] and min(rank0["applied"]) >= 6
    assert len(rank0["params"]["criterion.loss_history"]) == 6  # one update per validation
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name


@pytest.mark.timeout(600)
def test_restore_best_per_task_follows_rank_zero(tmp_path):
    out = run_ddp_script(tmp_path, SCRIPT, ["restore"])
    rank0, rank1 = (torch.load(f"{out}.restore.rank{rank}.pt") for rank in (0, 1))
    # rank 0's values choose epochs 1 and 4; rank 1's own would have chosen 0 and 3
    assert [(r["task"], r["epoch"]) for r in rank0["restored"]] == [(0, 1), (1, 4)]
    assert [(r["task"], r["epoch"]) for r in rank1["restored"]] == [(0, 1), (1, 4)]
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
