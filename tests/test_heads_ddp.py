"""Two CPU processes under DDP: head pruning, growth and the plasticity cycle gate, revive and revert alike on
every rank (each rank sees different training batches, so only reduced statistics and shared seeds can agree)."""

import textwrap

import pytest
import torch
from conftest import run_ddp_script

SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import GPT2Config, GPT2LMHeadModel
    from plasticity_lightning import HeadGrowth, HeadImportance, HeadPruning, PlasticityCycle
    from plasticity_lightning.policies.heads import CycleSettings, ReviverSettings

    out, variant = sys.argv[1], sys.argv[2]

    class Tokenizer:
        def __call__(self, text):
            return {"input_ids": [ord(c) % 60 + 1 for c in text]}

        def decode(self, ids):
            return " ".join(map(str, ids))

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            config = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=61, n_positions=32, bos_token_id=0,
                                eos_token_id=0)
            self.model = GPT2LMHeadModel(config)

        def training_step(self, batch, batch_idx):
            return self.model(batch[0], labels=batch[0]).loss

        def validation_step(self, batch, batch_idx):
            # no sync_dist: each rank logs its own shard's value; HeadPruning must still decide alike
            self.log("val/perplexity", self.model(batch[0], labels=batch[0]).loss.exp())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    class Dump(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            torch.save({"params": {k: v.cpu() for k, v in pl_module.state_dict().items()},
                        "gates": trainer.callbacks[0].gates.mask.cpu(),
                        "histories": [c.history for c in trainer.callbacks[1:] if hasattr(c, "history")]},
                       f"{out}.{variant}.rank{trainer.global_rank}.pt")

    data = torch.randint(0, 61, (80, 12), generator=torch.Generator().manual_seed(3))
    train = DataLoader(TensorDataset(data[:64]), batch_size=4, shuffle=True)
    val = DataLoader(TensorDataset(data[64:]), batch_size=4)
    if variant == "prune_grow":
        callbacks = [HeadImportance(num_batches=4), HeadPruning(fraction=0.25, max_fraction=0.5, tolerance=10.0),
                     HeadGrowth(choice="entropy_gap", fraction=0.5, probe_size=8,
                                reviver=ReviverSettings(warmup_steps=3, boost_steps=6))]
        limits = {"max_epochs": 3}
    else:
        callbacks = [HeadImportance(num_batches=2),
                     PlasticityCycle(start_step=2,
                                     cycle=CycleSettings(learn_steps=3, max_cycles=3, max_degeneration=0.0),
                                     probe_size=8, prompts=["ab", "cd"], max_new_tokens=6, tokenizer=Tokenizer(),
                                     degeneration_metric="max_token_repetition",
                                     reviver=ReviverSettings(warmup_steps=2, boost_steps=3))]
        limits = {"max_steps": 16}
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[*callbacks, Dump()], **limits)
    trainer.fit(LM(), train, val)
    """
)


@pytest.mark.timeout(600)
def test_head_callbacks_leave_every_rank_with_identical_gates_and_weights(tmp_path):
    out = run_ddp_script(tmp_path, SCRIPT, ["prune_grow", "cycle"])
    for variant in ("prune_grow", "cycle"):
        rank0, rank1 = (torch.load(f"{out}.{variant}.rank{rank}.pt", weights_only=False) for rank in (0, 1))
        assert torch.equal(rank0["gates"], rank1["gates"]), variant
        assert rank0["histories"] == rank1["histories"], variant
        for name, value in rank0["params"].items():
            assert torch.equal(value, rank1["params"][name]), (variant, name)
    prune_grow = torch.load(f"{out}.prune_grow.rank0.pt", weights_only=False)["histories"]
    assert sum(len(h["pruned"]) for h in prune_grow[0]) >= 3 and sum(len(h["revived"]) for h in prune_grow[1]) >= 2
    cycles = torch.load(f"{out}.cycle.rank0.pt", weights_only=False)["histories"][0]
    # every cycle fails the degeneration bound (max_token_repetition > 0): the restore runs under DDP
    assert len(cycles) == 3 and all(c["pruned"] and c["grown"] and c["reverted"] for c in cycles)
