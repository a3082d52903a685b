"""Head growth, attention entropy and the prune → measure → grow → learn cycle."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_trainer
from test_heads import _LM, _LMWithPerplexity, _token_loaders, tiny_gpt2

from plasticity_lightning import (
    AttentionEntropyMonitor,
    HeadGrowth,
    HeadImportance,
    HeadPruning,
    PlasticityConfigError,
    PlasticityCycle,
)
from plasticity_lightning.policies.base import settings_owner
from plasticity_lightning.policies.heads import (
    CYCLE_REVIVER_SETTINGS,
    CycleSettings,
    HeadReviver,
    ReviverSettings,
    heads_to_grow,
    updated_rating,
)
from plasticity_lightning.surgery import HeadGates

HEAD_DIM, WIDTH = 8, 32  # tiny_gpt2: 4 heads of 8 in a 32-wide model


def qkv_columns(head: int) -> list[int]:
    return [k * WIDTH + head * HEAD_DIM + i for k in range(3) for i in range(HEAD_DIM)]


def out_rows(head: int) -> list[int]:
    return list(range(head * HEAD_DIM, (head + 1) * HEAD_DIM))


def test_revival_resets_exactly_the_heads_slices_and_their_optimizer_state():
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 61, (2, 12))
    model(x, labels=x).loss.backward()
    optimizer.step()
    before = copy.deepcopy(model.state_dict())
    gates = HeadGates(model)
    gates.set(1, 2, 0.0)
    HeadReviver(gates, output_scale=0.5, initial_gate=0.25).revive(
        [(1, 2)], step=7, generator=torch.Generator().manual_seed(0), optimizers=[optimizer]
    )
    attn = model.transformer.h[1].attn
    cols, rows = qkv_columns(2), out_rows(2)
    other_cols = [c for c in range(3 * WIDTH) if c not in cols]
    other_rows = [r for r in range(WIDTH) if r not in rows]
    w, b, p = attn.c_attn.weight, attn.c_attn.bias, attn.c_proj.weight
    old = {
        k.removeprefix("transformer.h.1.attn."): v for k, v in before.items() if k.startswith("transformer.h.1.attn")
    }
    assert not torch.equal(w[:, cols], old["c_attn.weight"][:, cols]) and torch.equal(b[cols], torch.zeros(24))
    assert torch.equal(w[:, other_cols], old["c_attn.weight"][:, other_cols])
    assert torch.equal(b[other_cols], old["c_attn.bias"][other_cols])
    assert torch.equal(p[other_rows], old["c_proj.weight"][other_rows]) and not torch.equal(
        p[rows], old["c_proj.weight"][rows]
    )
    assert p[rows].std().item() == pytest.approx(0.02 * 0.5, rel=0.2)  # output_scale · std
    for key in ("exp_avg", "exp_avg_sq"):
        state_w, state_p = optimizer.state[w][key], optimizer.state[p][key]
        assert (state_w[:, cols] == 0).all() and (state_w[:, other_cols] != 0).all()
        assert (state_p[rows] == 0).all() and (state_p[other_rows] != 0).all()
    for name, value in model.state_dict().items():  # nothing outside the head moved
        if not name.startswith("transformer.h.1.attn.c_"):
            assert torch.equal(value, before[name]), name
    assert gates.gates[1, 2].item() == pytest.approx(0.25 + 0.75 / 100)  # first step of a 100-step ramp


def test_gate_ramp_and_learning_rate_boost_schedule():
    gates = HeadGates(tiny_gpt2())
    reviver = HeadReviver(gates, warmup_steps=4, initial_gate=0.2, lr_multiplier=5.0, boost_steps=8)
    assert [reviver.gate_at(age) for age in (0, 1, 2, 3, 9)] == pytest.approx([0.4, 0.6, 0.8, 1.0, 1.0])
    assert [reviver.lr_factor_at(age) for age in (0, 2, 4, 8, 20)] == pytest.approx([5.0, 4.0, 3.0, 1.0, 1.0])
    reviver.revive([(0, 1), (2, 3)], step=10)
    reviver.update(12)
    assert gates.gates[0, 1].item() == pytest.approx(0.8) and gates.gates[2, 3].item() == pytest.approx(0.8)
    reviver.update(18)  # ramp and boost over: the heads are ordinary again
    assert reviver.reviving == [] and gates.gates[0, 1].item() == 1.0
    with pytest.raises(PlasticityConfigError, match=r"HeadReviver.initial_gate=1.5 is invalid"):
        HeadReviver(gates, initial_gate=1.5)
    with pytest.raises(PlasticityConfigError, match=r"HeadReviver.warmup_steps=-1 is invalid"):
        HeadGrowth(reviver=ReviverSettings(warmup_steps=-1))


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_revived_heads_learn_at_the_boosted_rate_and_the_others_at_the_optimizers(make_optimizer):
    boosted = tiny_gpt2()
    gates = HeadGates(boosted)
    reviver = HeadReviver(gates, warmup_steps=0, lr_multiplier=4.0, boost_steps=10)
    reviver.revive([(0, 1)], step=0, generator=torch.Generator().manual_seed(1))
    plain = copy.deepcopy(boosted)  # the same weights (and all-one gates), without the boost
    start = copy.deepcopy(boosted.state_dict())
    opt_boosted, opt_plain = make_optimizer(boosted.parameters()), make_optimizer(plain.parameters())
    reviver.attach([opt_boosted])
    x = torch.randint(0, 61, (4, 12), generator=torch.Generator().manual_seed(2))
    for model, optimizer in ((boosted, opt_boosted), (plain, opt_plain)):
        model(x, labels=x).loss.backward()
        optimizer.step()
    reviver.detach()

    def delta(model, name):
        return model.state_dict()[name] - start[name]

    cols, rows = qkv_columns(1), out_rows(1)
    name_w, name_b, name_p = (f"transformer.h.0.attn.{n}" for n in ("c_attn.weight", "c_attn.bias", "c_proj.weight"))
    assert torch.allclose(delta(boosted, name_w)[:, cols], 4 * delta(plain, name_w)[:, cols], rtol=1e-4, atol=1e-9)
    assert torch.allclose(delta(boosted, name_b)[cols], 4 * delta(plain, name_b)[cols], rtol=1e-4, atol=1e-9)
    assert torch.allclose(delta(boosted, name_p)[rows], 4 * delta(plain, name_p)[rows], rtol=1e-4, atol=1e-9)
    assert delta(plain, name_w)[:, cols].abs().max() > 0  # the head did learn
    other = [c for c in range(3 * WIDTH) if c not in cols]
    assert torch.equal(delta(boosted, name_w)[:, other], delta(plain, name_w)[:, other])
    for name in start:
        if not name.startswith("transformer.h.0.attn.c_"):
            assert torch.equal(boosted.state_dict()[name], plain.state_dict()[name]), name


def test_choosing_heads_to_revive():
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    scores = torch.tensor([[0.1, 0.2, 0.9, 0.3], [5.0, 5.0, 0.4, 5.0], [0.8, 9.0, 9.0, 0.5]])
    # highest scores among the dead heads only
    assert heads_to_grow("gradient", mask, 3, scores) == [(0, 2), (2, 0), (2, 3)]
    balanced = heads_to_grow("balanced", mask, 3, generator=torch.Generator().manual_seed(0))
    # layer 0 (1 live) first, then layers 0 and 2 tie at 2 live: the lower one
    assert [layer for layer, _ in balanced] == [0, 0, 2] and all(mask[h] == 0 for h in balanced)
    assert len(set(balanced)) == 3
    assert heads_to_grow("gradient", torch.ones(3, 4), 2, scores) == []  # nothing dead, nothing revived


def test_head_growth_revives_dead_heads_by_gradient_importance_in_a_fit(tmp_path):
    _, train, val = _token_loaders()

    importance = HeadImportance(num_batches=6)
    pruning = HeadPruning(fraction=0.5, max_fraction=0.5, tolerance=10.0)
    growth = HeadGrowth(fraction=0.5, choice="gradient", every_n_validations=1, reviver=ReviverSettings(warmup_steps=4))
    trainer = make_trainer(tmp_path, callbacks=[importance, pruning, growth], max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(_LMWithPerplexity(), train, val)
    # each epoch: prune up to the cap of 6 dead heads, then revive half of the dead
    revived = [h["revived"] for h in growth.history]
    assert [len(h["pruned"]) for h in pruning.history] == [6, 3] and [len(r) for r in revived] == [3, 3]
    pruned = set(pruning.history[0]["pruned"])
    window = torch.tensor(pruning.history[0]["importance"])  # the window both callbacks saw at epoch 0
    assert revived[0] == sorted(pruned, key=lambda lh: (-float(window[lh]), lh))[:3]
    # epoch 1 pruned the heads revived at epoch 0 (lr 0: they stayed near silent); they stay pruned
    assert set(pruning.history[1]["pruned"]) == set(revived[0])
    assert all(importance.gates.mask[h].item() == 0.0 for h in revived[0])
    assert int((importance.gates.mask == 0).sum()) == 3
    ramping = {(layer, head) for layer, head, _ in growth.reviver.reviving}
    assert set(revived[1]) <= ramping  # revived at the last step: at the first value of the ramp
    assert all(importance.gates.mask[h].item() == pytest.approx(0.25) for h in revived[1])
    with pytest.raises(PlasticityConfigError, match="needs HeadImportance\\(method='gradient'\\)"):
        make_trainer(
            tmp_path / "b",
            callbacks=[HeadImportance(method="weight_magnitude"), HeadGrowth(choice="gradient")],
            max_steps=1,
        ).fit(_LMWithPerplexity(), train, val)


def _attention_entropy_by_hand(model, ids: torch.Tensor) -> np.ndarray:
    """Per-head entropy from the hidden states entering each attention block: q·kᵀ/√d, causal softmax, −Σ p ln p."""
    inputs = {}
    handles = [
        block.attn.c_attn.register_forward_hook(lambda m, a, out, i=i: inputs.__setitem__(i, out.detach()))
        for i, block in enumerate(model.transformer.h)
    ]
    model.eval()
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    result = []
    for i in range(len(model.transformer.h)):
        qkv = inputs[i].double().numpy()  # [N, T, 3·W]
        n, t, _ = qkv.shape
        q, k = (qkv[..., j * WIDTH : (j + 1) * WIDTH].reshape(n, t, 4, HEAD_DIM) for j in (0, 1))
        scores = np.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(HEAD_DIM)
        scores = np.where(np.tril(np.ones((t, t), dtype=bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(-1)  # [N, heads, T]
        result.append(entropy.mean(axis=(0, 2)))
    return np.stack(result)


def test_attention_entropy_monitor_matches_a_computation_by_hand(tmp_path):
    data, train, val = _token_loaders()

    class SdpaLM(_LMWithPerplexity):
        def __init__(self):
            super().__init__()
            self.model = tiny_gpt2(attn="sdpa").train()

    monitor = AttentionEntropyMonitor(every_n_epochs=1, probe_size=8)
    module = SdpaLM()
    make_trainer(tmp_path, callbacks=[monitor], max_epochs=1).fit(module, train, val)
    assert module.model.config._attn_implementation == "sdpa" and module.model.training  # left as it was
    expected = _attention_entropy_by_hand(module.model, data[24:32])
    assert np.allclose(monitor.entropy.numpy(), expected, atol=1e-5)
    logged = monitor.history[-1]
    assert logged["2/head_3"] == pytest.approx(expected[2, 3], abs=1e-5)
    assert logged["0/mean"] == pytest.approx(expected[0].mean(), abs=1e-5)
    assert (expected <= math.log(12) + 1e-9).all() and expected.min() > 0.1  # a sanity bound on the reference


def test_entropy_importance_is_the_entropy_gap_of_the_last_batch(tmp_path):
    data, train, _ = _token_loaders()
    importance = HeadImportance(num_batches=6, method="entropy", normalize=None)
    module = _LM()
    make_trainer(tmp_path, callbacks=[importance], max_epochs=1).fit(module, train)
    expected = math.log(12) - _attention_entropy_by_hand(module.model, data[20:24])
    assert np.allclose(importance.importance.numpy(), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the cycle


class _Tokenizer:
    """Characters to token ids (1-60): enough to prompt a model over 61 tokens."""

    def __call__(self, text):
        return {"input_ids": [ord(c) % 60 + 1 for c in text]}

    def decode(self, ids):
        return " ".join(map(str, ids))


class _CycleLM(__import__("lightning.pytorch").pytorch.LightningModule):
    """A tiny GPT-2 that learns (AdamW), without dropout: runs are reproducible across a resume."""

    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(
            n_layer=2, n_head=4, n_embd=32, vocab_size=61, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch, batch_idx):
        return self.model(batch[0], labels=batch[0]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.model(batch[0], labels=batch[0]).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _cycle(**kwargs):
    """A small PlasticityCycle; ``kwargs`` are its own arguments or fields of its ``cycle`` or ``reviver`` group."""
    settings = {
        "start_step": 3,
        "learn_steps": 4,
        "max_cycles": 2,
        "probe_size": 8,
        "prompts": ["The old", "A dog"],
        "max_new_tokens": 8,
        "tokenizer": _Tokenizer(),
        "warmup_steps": 2,
        "boost_steps": 4,
        **kwargs,
    }
    groups = {"cycle": CycleSettings(), "reviver": CYCLE_REVIVER_SETTINGS}
    for group, declared in groups.items():
        fields = {name: settings.pop(name) for name in declared.values() if name in settings}
        groups[group] = dataclasses.replace(declared, **fields)
    return PlasticityCycle(**settings, **groups)


def _fit_cycle(root, cycle, max_steps, ckpt=None, extra=()):
    _, train, val = _token_loaders()
    module = _CycleLM()
    trainer = make_trainer(root, callbacks=[HeadImportance(num_batches=2), *extra, cycle], max_steps=max_steps)
    trainer.fit(module, train, val, ckpt_path=ckpt)
    return trainer, module


class _Recorder(__import__("lightning.pytorch").pytorch.Callback):
    """Copies the weights and optimizer state at the step the cycle starts (it runs just before the cycle)."""

    def __init__(self, step):
        self.step, self.state, self.optimizer = step, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.state = copy.deepcopy(pl_module.state_dict())
            self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])


def test_a_failed_cycle_restores_the_exact_previous_weights(tmp_path):
    # max_token_repetition is > 0 for any text, so the degeneration check fails and the cycle must revert
    cycle = _cycle(max_cycles=1, degeneration_metric="max_token_repetition", max_degeneration=0.0)
    recorder = _Recorder(step=3)
    trainer, module = _fit_cycle(tmp_path, cycle, max_steps=7, extra=[recorder])
    (record,) = cycle.history
    assert record["pruned"] and record["grown"] and not record["success"] and record["reverted"]
    assert record["start_step"] == 3 and record["end_step"] == 7
    assert record["after"]["degeneration"] > 0
    for name, value in module.state_dict().items():
        assert torch.equal(value, recorder.state[name]), name
    restored = trainer.optimizers[0].state_dict()["state"]
    for i, saved in recorder.optimizer.items():
        assert all(torch.equal(restored[i][key], saved[key]) for key in ("exp_avg", "exp_avg_sq", "step")), i
    assert bool((trainer.callbacks[0].gates.mask == 1).all()) and cycle.reviver.reviving == []
    start = {"random": 0.5}
    assert cycle.ratings[f"prune/{record['prune_strategy']}"] == pytest.approx(
        0.8 * start.get(record["prune_strategy"], 1.0)
    )
    assert cycle.ratings[f"grow/{record['growth_strategy']}"] == pytest.approx(
        0.8 * start.get(record["growth_strategy"], 1.0)
    )
    assert cycle.memory == [] and cycle.stopped == "max_cycles"


def _gain(record):
    return (record["before"]["perplexity"] - record["after"]["perplexity"]) / record["before"]["perplexity"]


def test_successful_cycles_are_kept_rated_remembered_and_written(tmp_path):
    cycle = _cycle(max_perplexity_increase=10.0, max_degeneration=None, memory_replay=0.0)
    trainer, _ = _fit_cycle(tmp_path, cycle, max_steps=12)
    assert [c["success"] for c in cycle.history] == [True, True] and cycle.stopped == "max_cycles"
    first, second = cycle.history
    assert (first["start_step"], first["end_step"], second["start_step"]) == (3, 7, 7)
    assert second["prune_level"] == pytest.approx(first["prune_level"] * (1.2 if _gain(first) > 0.05 else 1.1))
    assert len(cycle.memory) == 2 and cycle.memory[0]["prune_strategy"] == first["prune_strategy"]
    kept = first["after"]["live_heads"]
    assert cycle.memory[0]["improvement"] == pytest.approx(_gain(first) + 0.5 * (8 - kept) / 8)
    # pruned heads are gated off before the growth, and revived ones count as live again
    assert first["after_pruning"]["live_heads"] == 8 - len(first["pruned"])
    assert kept == second["before"]["live_heads"] == 8 - len(first["pruned"]) + len(first["grown"])
    rating = {"random": 0.5}.get(first["prune_strategy"], 1.0)
    for record in cycle.history:
        if record["prune_strategy"] == first["prune_strategy"]:
            rating = updated_rating(rating, True, _gain(record))
    assert cycle.ratings[f"prune/{first['prune_strategy']}"] == pytest.approx(rating)
    written = json.loads((tmp_path / "plasticity_cycle.json").read_text())
    assert written["ratings"] == pytest.approx(cycle.ratings) and len(written["cycles"]) == 2
    assert updated_rating(1.0, True, 0.2) == pytest.approx(1.2) and updated_rating(9.0, True, 0.5) == 10.0
    assert trainer.callback_metrics["cycle/success"].item() == 1.0


def test_a_run_resumed_mid_cycle_ends_like_the_uninterrupted_one(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, ckpt=None, checkpoints=None):
        cycle = _cycle(max_perplexity_increase=10.0, max_degeneration=None, memory_replay=0.5, max_cycles=3)
        _, train, val = _token_loaders()
        module = _CycleLM()
        callbacks = [HeadImportance(num_batches=2), cycle, *([checkpoints] if checkpoints else [])]
        trainer = make_trainer(root, callbacks=callbacks, max_steps=12, enable_checkpointing=checkpoints is not None)
        trainer.fit(module, train, val, ckpt_path=ckpt)
        return cycle, module

    # the uninterrupted run saves a checkpoint after every epoch (6 steps): the first falls inside cycle 1 (3-7)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    full, full_model = run(tmp_path / "full", checkpoints=saver)
    assert len(full.history) == 2 and full.current is None  # a third cycle would not end by step 12
    mid_cycle = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=False)
    state = next(v for k, v in mid_cycle["callbacks"].items() if k.startswith("PlasticityCycle"))
    assert state["current"] is not None and state["snapshot"] is not None and state["cycles"] == []
    resumed, resumed_model = run(tmp_path / "resumed", ckpt=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert json.dumps(resumed.record()) == json.dumps(full.record())
    for name, value in full_model.state_dict().items():
        assert torch.allclose(resumed_model.state_dict()[name], value, atol=1e-6), name


def test_cycle_configuration_errors(tmp_path):
    with pytest.raises(PlasticityConfigError, match=r"CycleController.pruning_strategies=\['loudest'\] is invalid"):
        _cycle(pruning_strategies=["loudest"])
    with pytest.raises(PlasticityConfigError, match=r"CycleController.prune_level=1.0 is invalid"):
        CycleSettings(prune_level=1.0)
    with (
        pytest.raises(PlasticityConfigError, match=r"PlasticityCycle.growth_strategies=\['random', 'random'\]"),
        settings_owner("PlasticityCycle"),
    ):
        CycleSettings(growth_strategies=["random", "random"])
    with (
        pytest.raises(PlasticityConfigError, match=r"PlasticityCycle.adapt='no' is invalid"),
        settings_owner("PlasticityCycle"),
    ):
        CycleSettings(adapt="no")
    with pytest.raises(PlasticityConfigError, match=r"PlasticityCycle.cycle=\{'learn_steps': 3\} is invalid; expected"):
        PlasticityCycle(cycle={"learn_steps": 3})
    with pytest.raises(PlasticityConfigError, match=r"PlasticityCycle.probe_size=0 is invalid"):
        PlasticityCycle(probe_size=0)
    with pytest.raises(PlasticityConfigError, match=r"HeadReviver.lr_multiplier=inf is invalid"):
        HeadGrowth(reviver=ReviverSettings(lr_multiplier=float("inf")))
    with pytest.raises(PlasticityConfigError, match=r"head \(7, 0\) is out of range"):
        HeadReviver(HeadGates(tiny_gpt2())).revive([(7, 0)], step=0)
    _, train, _ = _token_loaders()
    no_validation = make_trainer(tmp_path / "nv", callbacks=[HeadImportance(), _cycle()], max_steps=1)
    with pytest.raises(PlasticityConfigError, match="PlasticityCycle measures on validation blocks"):
        no_validation.fit(_CycleLM(), train)
    with pytest.raises(PlasticityConfigError, match="remove HeadPruning from the trainer"):
        _fit_cycle(tmp_path, _cycle(), max_steps=1, extra=[HeadPruning()])
    _, train, val = _token_loaders()
    trainer = make_trainer(tmp_path, callbacks=[HeadImportance(method="entropy"), _cycle()], max_steps=1)
    with pytest.raises(PlasticityConfigError, match="'gradient' strategies need HeadImportance"):
        trainer.fit(_CycleLM(), train, val)


def test_the_boost_acts_on_the_optimizer_a_fit_uses(tmp_path):
    """Inside a fit: the first step after a revival moves the revived head's output rows lr_multiplier x lr x grad."""
    import lightning.pytorch as pl

    _, train, val = _token_loaders()

    class SGDLM(_LMWithPerplexity):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Watch(pl.Callback):
        def __init__(self):
            self.grad = self.before = self.delta = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 6:  # the first step after growth at the end of epoch 0
                layer, head = growth.history[0]["revived"][0]
                self.weight = pl_module.model.transformer.h[layer].attn.c_proj.weight
                self.rows = slice(head * 8, (head + 1) * 8)
                self.grad = self.weight.grad[self.rows].clone()
                self.before = self.weight.detach()[self.rows].clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 7:
                self.delta = self.weight.detach()[self.rows] - self.before

    importance = HeadImportance(num_batches=6)
    pruning = HeadPruning(fraction=0.25, max_fraction=0.25, tolerance=10.0)
    growth = HeadGrowth(
        fraction=1.0, choice="random", reviver=ReviverSettings(warmup_steps=0, lr_multiplier=3.0, boost_steps=1000)
    )
    watch = Watch()
    trainer = make_trainer(
        tmp_path, callbacks=[importance, pruning, growth, watch], max_steps=7, num_sanity_val_steps=0
    )
    trainer.fit(SGDLM(), train, val)
    assert watch.grad.abs().max() > 0
    assert torch.allclose(watch.delta, -0.1 * 3.0 * watch.grad, rtol=1e-4, atol=1e-9)
