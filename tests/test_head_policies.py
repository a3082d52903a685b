"""The attention-head algorithms as plain objects (policies/heads): a hand-written loop, their state, and the reviver
settings declared once for the callbacks."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math

import jsonargparse
import pytest
import torch
from test_heads import tiny_gpt2

from plasticity_lightning import HeadGrowth, PlasticityConfigError, PlasticityCycle
from plasticity_lightning.metrics.text import degeneration_summary
from plasticity_lightning.nn.generation import generate_seeded
from plasticity_lightning.policies.base import settings_owner
from plasticity_lightning.policies.heads import (
    CYCLE_REVIVER_SETTINGS,
    CycleController,
    CycleSettings,
    HeadImportanceScores,
    HeadReviver,
    IterativeHeadPruner,
    NonFiniteScores,
    ReviverSettings,
    cycle_measures,
    lowest_heads,
)
from plasticity_lightning.policies.heads import reviver as reviver_module
from plasticity_lightning.surgery import HeadGates, head_importance
from plasticity_lightning.surgery.heads import head_weight_norms


def defaults(function) -> dict[str, object]:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()}


def test_the_callbacks_take_the_declared_settings_as_their_defaults():
    # one declaration each: the callbacks' grouped arguments default to it, the controller to the same settings
    growth, cycle = defaults(HeadGrowth.__init__), defaults(PlasticityCycle.__init__)
    assert growth["reviver"] == ReviverSettings() and cycle["reviver"] == CYCLE_REVIVER_SETTINGS
    assert cycle["cycle"] == CycleSettings() == CycleController().settings
    assert PlasticityCycle().reviver_settings == CYCLE_REVIVER_SETTINGS  # re-owned, same values
    assert PlasticityCycle().reviver_settings.owner == "PlasticityCycle"
    # the cycle's shorter ramp and boost end within its default learning phase (the reason for its own defaults)
    assert max(CYCLE_REVIVER_SETTINGS.warmup_steps, CYCLE_REVIVER_SETTINGS.boost_steps) <= CycleSettings().learn_steps


def test_a_yaml_group_changes_only_the_fields_it_names():
    # what LightningCLI does with `init_args: {cycle: {...}, reviver: {...}}`: the rest keep the declared defaults
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PlasticityCycle, "cycle_callback")
    config = parser.parse_args(["--cycle_callback.cycle.learn_steps=7", "--cycle_callback.reviver.warmup_steps=3"])
    callback = parser.instantiate(config).cycle_callback
    assert callback.controller.settings == dataclasses.replace(CycleSettings(), learn_steps=7)
    assert callback.reviver_settings == dataclasses.replace(CYCLE_REVIVER_SETTINGS, warmup_steps=3)
    assert callback.learn_steps == 7 and callback.reviver_settings.boost_steps == 100
    with pytest.raises(PlasticityConfigError, match=r"\.prune_level=1.5 is invalid"):
        parser.instantiate(parser.parse_args(["--cycle_callback.cycle.prune_level=1.5"]))


def test_reviver_settings_are_validated_once_at_construction(monkeypatch):
    calls = []
    original = ReviverSettings.__post_init__
    monkeypatch.setattr(ReviverSettings, "__post_init__", lambda self: (calls.append(1), original(self)))
    settings = ReviverSettings(warmup_steps=7)
    growth = HeadGrowth(reviver=settings)  # re-owned: validated again (2)
    HeadReviver(HeadGates(tiny_gpt2()), growth.reviver_settings)  # what the callback does at fit start: not again
    assert len(calls) == 2 and growth.reviver_settings.warmup_steps == 7
    with pytest.raises(PlasticityConfigError, match=r"HeadReviver.boost_steps=-1 is invalid"):
        ReviverSettings(boost_steps=-1)
    with (
        pytest.raises(PlasticityConfigError, match=r"PlasticityCycle.lr_multiplier=inf is invalid"),
        settings_owner("PlasticityCycle"),
    ):
        ReviverSettings(lr_multiplier=math.inf)
    with pytest.raises(PlasticityConfigError, match=r"HeadGrowth.reviver=\{'warmup_steps': 3\} is invalid; expected"):
        HeadGrowth(reviver={"warmup_steps": 3})
    with pytest.raises(PlasticityConfigError, match=r"HeadReviver: unknown setting\(s\) warmup"):
        HeadReviver(HeadGates(tiny_gpt2()), warmup=3)
    assert reviver_module.HeadReviver is HeadReviver


def test_a_hand_written_loop_scores_prunes_and_revives_heads():
    model = tiny_gpt2().train()
    for module in model.modules():  # no dropout: the scores are reproducible
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: one window equals the functional twin
    batches = [torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    reports = []
    scores = HeadImportanceScores(num_batches=3)
    scores.announce = reports.append
    scores.bind(model)
    assert scores.bound_layers == ["transformer.h.0.attn", "transformer.h.1.attn", "transformer.h.2.attn"]
    assert reports == [
        f"HeadImportanceScores: gates on 3 attention modules of 4 heads ({', '.join(scores.bound_layers)})"
    ]
    windows = []
    for ids in batches:
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        scores.accumulate()
        optimizer.step()
        windows.append(scores.step(ids))
    assert windows[:2] == [None, None]
    scores.gates.remove()  # the functional twin attaches its own gates
    expected = head_importance(model, batches)
    torch.testing.assert_close(windows[2], expected)
    scores.bind(model)  # gates back on (all open)
    pruned = lowest_heads(windows[2], scores.gates.mask > 0, 2)
    for layer, head in pruned:
        scores.gates.set(layer, head, 0.0)
    reviver = HeadReviver(scores.gates, optimizer=optimizer, warmup_steps=4, seed=3)
    reviver.revive(pruned[:1], step=3)
    assert reviver.bound_layers == scores.bound_layers
    assert float(scores.gates.mask[pruned[0]]) == pytest.approx(0.25) and float(scores.gates.mask[pruned[1]]) == 0.0
    state = reviver.state_dict()
    assert state["reviving"] == [(*pruned[0], 3)] and state["step"] == 3


def test_head_policies_resume_from_their_state_and_read_old_reviver_checkpoints():
    gates = HeadGates(tiny_gpt2())
    reviver = HeadReviver(gates)
    reviver.load_state_dict({"reviving": [[0, 1, 5]], "step": 7})  # a checkpoint written before the reviver's generator
    assert reviver.reviving == [(0, 1, 5)] and reviver.step == 7
    first = CycleController(CycleSettings(memory_replay=0.5), seed=4)
    plan = first.plan()
    first.begin(10, {**plan, "before": {"perplexity": 20.0, "live_heads": 12}})
    first.conclude({"perplexity": 15.0, "live_heads": 11, "degeneration": 0.1}, success=True, step=14)
    second = CycleController(CycleSettings(memory_replay=0.5), seed=4)
    second.load_state_dict(first.state_dict())
    assert second.record() == first.record() and second.memory[0]["improvement"] == pytest.approx(0.25 + 0.5 / 12)
    assert [second.plan() for _ in range(5)] == [first.plan() for _ in range(5)]  # the generator resumed too
    # NaN fails every judgement; a rise within the tolerance passes
    assert not first.judge({"perplexity": 10.0}, {"perplexity": math.nan, "degeneration": 0.0})
    assert first.judge({"perplexity": 10.0}, {"perplexity": 11.4, "degeneration": 0.5})


def test_importance_and_pruner_resume_mid_window_from_their_state():
    """An interrupted plain loop: the importance window and the pruner's baseline continue from state_dict."""
    batches = [torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(4)]

    def window(scores, model, chunk):
        out = None
        for ids in chunk:
            model.zero_grad()
            model(ids, labels=ids).loss.backward()
            scores.accumulate()
            out = scores.step(ids)
        return out

    whole = tiny_gpt2()
    expected = window(HeadImportanceScores(whole, num_batches=4), whole, batches)
    first = tiny_gpt2()
    scores = HeadImportanceScores(first, num_batches=4)
    assert window(scores, first, batches[:2]) is None
    pruner = IterativeHeadPruner(fraction=0.1, tolerance=0.1)
    assert pruner.step(scores.gates, 10.0, lambda: torch.rand(3, 4, generator=torch.Generator().manual_seed(0))).heads
    saved = copy.deepcopy((scores.state_dict(), pruner.state_dict()))
    second = tiny_gpt2()
    resumed = HeadImportanceScores(num_batches=4)
    resumed.load_state_dict(saved[0])
    resumed.bind(second)  # the loaded window and gates go onto the model
    assert torch.equal(resumed.gates.mask, scores.gates.mask) and float(resumed.gates.mask.sum()) == 11
    resumed.gates.load(torch.ones(3, 4))  # all heads open, as in the uninterrupted window
    torch.testing.assert_close(window(resumed, second, batches[2:]), expected)
    again = IterativeHeadPruner(fraction=0.1, tolerance=0.1)
    again.load_state_dict(saved[1])
    assert again.baseline == 10.0 and again.step(resumed.gates, 11.5, lambda: torch.ones(3, 4)).reverted


def test_a_hand_written_loop_runs_judges_and_reverts_whole_cycles():
    """The controller drives a cycle without a trainer: prune the lowest-magnitude heads, revive, learn, judge."""
    torch.manual_seed(0)
    model = tiny_gpt2().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    gates = HeadGates(model)
    reviver = HeadReviver(gates, CYCLE_REVIVER_SETTINGS, optimizer=optimizer)
    probe = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(5))
    degeneration = [0.3]

    def measure():
        with torch.no_grad():
            loss = float(model(probe, labels=probe).loss)
        return {
            "perplexity": math.exp(loss),
            "degeneration": degeneration[0],
            "live_heads": int((gates.mask > 0).sum()),
        }

    def train(steps):
        for step in range(steps):
            reviver.update(step)
            optimizer.zero_grad()
            model(probe, labels=probe).loss.backward()
            optimizer.step()

    train(2)  # Adam has state to snapshot
    settings = {"learn_steps": 3, "max_degeneration": 0.5, "memory_replay": 0.0, "adapt": False}
    controller = CycleController(
        CycleSettings(pruning_strategies=["magnitude"], growth_strategies=["random"], **settings)
    )
    weights, moments = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()["state"])
    norms = torch.stack([head_weight_norms(module) for _, module in gates.layers])
    assert controller.ready(2, start_step=2) and not controller.ready(1, start_step=2)
    record = controller.start(2, model, gates, reviver, measure, optimizers=[optimizer])
    # 12 live heads: int(0.2 * 12) = 2 pruned, the two of lowest weight norm (one layer keeps >= 1 head)
    expected = sorted(lowest_heads(norms, torch.ones(3, 4, dtype=torch.bool), 2, "magnitude"))
    assert sorted(map(tuple, record["pruned"])) == expected and record["after_pruning"]["live_heads"] == 10
    (grown,) = record["grown"]  # int(0.5 * 2 dead) = 1 revived, at its ramp's first gate
    assert grown in record["pruned"] and float(gates.gates[tuple(grown)]) == pytest.approx(1 / 20)
    assert controller.current is record and not controller.due(4) and controller.due(5)
    train(3)
    degeneration[0] = 0.9  # above max_degeneration: the cycle fails and is reverted
    done = controller.finish(5, model, gates, reviver, measure, optimizers=[optimizer])
    assert not done["success"] and done["reverted"] and controller.current is None and controller.snapshot is None
    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())
    restored = optimizer.state_dict()["state"]
    assert all(torch.equal(restored[i]["exp_avg"], moments[i]["exp_avg"]) for i in moments)
    assert bool((gates.mask == 1).all()) and reviver.reviving == []
    assert controller.ratings["prune/magnitude"] == pytest.approx(0.8) and controller.memory == []
    # a NaN first perplexity: nothing is pruned, NonFiniteScores is raised and the next try is learn_steps later
    degeneration[0] = 0.1
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = math.nan
    with pytest.raises(NonFiniteScores, match="perplexity"):
        controller.start(6, model, gates, reviver, measure)
    assert controller.current is None and controller.retry_step == 9 and bool((gates.mask == 1).all())
    assert not controller.ready(8, start_step=2) and controller.ready(9, start_step=2)


def test_cycle_measures_in_a_plain_loop_agree_with_a_computation_by_hand():
    from test_head_growth import _Tokenizer

    model = tiny_gpt2().train()
    gates = HeadGates(model)
    gates.set(2, 1, 0.0)
    probe = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(5))
    measures = cycle_measures(model, gates, probe, _Tokenizer(), ["ab", "cde"], max_new_tokens=6, seed=3)
    assert model.training  # measured in eval mode, handed back as it came
    model.eval()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(probe).logits[:, :-1].reshape(-1, 61), probe[:, 1:].reshape(-1))
    continuations = [
        generate_seeded(model, torch.tensor([_Tokenizer()(p)["input_ids"]]), 6, seed=3 + i)[0, len(p) :].tolist()
        for i, p in enumerate(["ab", "cde"])
    ]
    assert measures["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert measures["degeneration"] == degeneration_summary(continuations)["repeated_3gram_rate"]
    assert measures["live_heads"] == 11
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = math.nan
    diverged = cycle_measures(model, gates, probe, _Tokenizer(), ["ab"])
    assert math.isnan(diverged["perplexity"]) and math.isnan(diverged["degeneration"])  # never reported as 0


def test_seeded_generation_leaves_the_global_rng_and_the_training_mode_alone():
    model = tiny_gpt2().train()
    prompt = torch.tensor([[1, 2, 3]])
    before = torch.get_rng_state()
    first = generate_seeded(model, prompt, 5, seed=2)
    assert torch.equal(torch.get_rng_state(), before) and model.training
    assert torch.equal(generate_seeded(model, prompt, 5, seed=2), first) and first.shape == (1, 8)
    with pytest.raises(
        PlasticityConfigError, match=r"max_new_tokens=20 after a 3-token prompt exceeds Mine.n_positions=16"
    ):
        generate_seeded(model, prompt, 20, owner="Mine")


def test_state_keys_are_those_of_existing_checkpoints():
    # a checkpoint keeps each callback's state under its state_key: these are the keys written before the heads and
    # the state_key were restructured (issue 19), so those checkpoints still load
    from plasticity_lightning.callbacks import (
        AttentionEntropyMonitor,
        HeadImportance,
        HeadPruning,
        ReDo,
        RestoreBestPerTask,
        TaskAccuracyTable,
    )

    assert {
        HeadImportance().state_key,
        HeadPruning().state_key,
        HeadGrowth(seed=1, choice="gradient").state_key,
        PlasticityCycle(cycle=CycleSettings(learn_steps=30)).state_key,
        ReDo().state_key,
        RestoreBestPerTask().state_key,
        AttentionEntropyMonitor(every_n_steps=5).state_key,
        TaskAccuracyTable().state_key,
    } == {
        "HeadImportance{'prefix': 'heads', 'num_batches': 50, 'method': 'gradient', 'normalize': 'layer'}",
        "HeadPruning{'prefix': 'heads', 'fraction': 0.1, 'max_fraction': 0.5, 'monitor': 'val/perplexity'}",
        "HeadGrowth{'prefix': 'heads', 'seed': 1, 'choice': 'gradient', 'fraction': 0.5}",
        "PlasticityCycle{'prefix': 'cycle', 'seed': 0, 'start_step': 100, 'learn_steps': 30}",
        "ReDo{'prefix': 'redo', 'seed': 0, 'layers': None, 'pairs': None, 'every_n_steps': 1000, 'tau': 0.025}",
        "RestoreBestPerTask{'monitor': 'val/acc', 'mode': 'max'}",
        "AttentionEntropyMonitor{'prefix': 'attention_entropy', 'layers': None, 'every_n_epochs': None, "
        "'every_n_steps': 5, 'probe_size': 16, 'probe_source': 'val'}",
        "TaskAccuracyTable{'stage': 'val'}",
    }
