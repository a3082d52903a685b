"""Attention-head surgery on GPT-2: gates against structural removal, re-initialisation slices, importance."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.surgery import HeadGates, attention_modules, prune_heads_, reinit_heads


def tiny_gpt2(attn: str = "eager", seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=3, n_head=4, n_embd=32, vocab_size=61, n_positions=16, attn_implementation=attn)
    return GPT2LMHeadModel(config).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_zero_gate_equals_removing_the_head(attn):
    model = tiny_gpt2(attn)
    x = ids()
    with torch.no_grad():
        reference = model(x).logits
    gates = HeadGates(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference)  # all-ones gates change nothing
    removed = {0: [1], 1: [0, 3], 2: [2]}
    for layer, heads in removed.items():
        for head in heads:
            gates.set(layer, head, 0.0)
    with torch.no_grad():
        gated = model(x).logits
    assert not torch.allclose(gated, reference, atol=1e-4)
    gates.remove()
    kept = prune_heads_(model, removed)
    assert kept == {0: [0, 2, 3], 1: [1, 2], 2: [0, 1, 3]}
    attn0 = model.transformer.h[1].attn
    assert attn0.num_heads == 2 and tuple(attn0.c_attn.weight.shape) == (32, 48) and attn0.c_proj.weight.shape[0] == 16
    with torch.no_grad():
        pruned = model(x).logits
    assert torch.allclose(pruned, gated, atol=1e-5)


def test_pruning_refuses_to_remove_every_head_of_a_layer():
    with pytest.raises(PlasticityConfigError, match="removing every head of layer 0"):
        prune_heads_(tiny_gpt2(), {0: [0, 1, 2, 3]})
    with pytest.raises(PlasticityConfigError, match="layer 7 out of range"):
        prune_heads_(tiny_gpt2(), {7: [0]})


def test_gate_gradient_is_the_derivative_of_the_loss():
    model = tiny_gpt2().double()  # float64: the finite difference resolves gradients of ~1e-4
    x = ids()
    gates = HeadGates(model, differentiable=True)

    def loss():  # HF's own loss casts logits to float32; keep float64 throughout
        logits = model(x).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    loss().backward()
    grad = gates.gates.grad.clone()
    eps = 1e-3
    for layer, head in [(0, 1), (2, 3)]:
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                gates.gates[layer, head] = 1 + sign * eps
                losses.append(loss().item())
                gates.gates[layer, head] = 1.0
        finite_difference = (losses[0] - losses[1]) / (2 * eps)
        assert grad[layer, head].item() == pytest.approx(finite_difference, rel=1e-4, abs=1e-9)


def test_reinit_heads_touches_exactly_its_slices_and_optimizer_state():
    model = tiny_gpt2().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = ids()
    model(x, labels=x).loss.backward()
    optimizer.step()
    attn = attention_modules(model)[1][1]
    before = {name: p.detach().clone() for name, p in attn.named_parameters()}
    state_before = {name: optimizer.state[p]["exp_avg"].clone() for name, p in attn.named_parameters()}
    reinit_heads(attn, [2], output_scale=0.1, generator=torch.Generator().manual_seed(0), optimizers=[optimizer])
    head = torch.arange(16, 24)
    columns = torch.cat([head, head + 32, head + 64])
    other_columns = torch.tensor([c for c in range(96) if c not in set(columns.tolist())])
    other_rows = torch.tensor([r for r in range(32) if r not in set(head.tolist())])
    weight, proj = attn.c_attn.weight.detach(), attn.c_proj.weight.detach()
    assert torch.equal(weight[:, other_columns], before["c_attn.weight"][:, other_columns])
    assert not torch.equal(weight[:, columns], before["c_attn.weight"][:, columns])
    assert (attn.c_attn.bias[columns] == 0).all()
    assert torch.equal(proj[other_rows], before["c_proj.weight"][other_rows])
    assert proj[head].std().item() == pytest.approx(0.002, rel=0.3)  # output_scale 0.1 of std 0.02
    state = {name: optimizer.state[p]["exp_avg"] for name, p in attn.named_parameters()}
    assert (state["c_attn.weight"][:, columns] == 0).all() and (state["c_proj.weight"][head] == 0).all()
    assert torch.equal(state["c_attn.weight"][:, other_columns], state_before["c_attn.weight"][:, other_columns])
    assert torch.equal(state["c_proj.bias"], state_before["c_proj.bias"])  # the output bias is shared by all heads


class _LM(__import__("lightning.pytorch").pytorch.LightningModule):
    """A user's LightningModule around a tiny GPT-2 (the callbacks assume nothing else)."""

    def __init__(self):
        super().__init__()
        self.model = tiny_gpt2().train()
        for module in self.model.modules():  # no dropout: the test recomputes the same gradients
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0

    def training_step(self, batch, batch_idx):
        return self.model(batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights stay put: importance is reproducible


def test_head_importance_is_the_mean_absolute_gate_gradient_normalised_per_layer(tmp_path):
    import copy

    from conftest import make_trainer
    from torch.utils.data import DataLoader, TensorDataset

    from plasticity_lightning import HeadImportance

    data = torch.randint(0, 61, (16, 12), generator=torch.Generator().manual_seed(3))
    loader = DataLoader(TensorDataset(data), batch_size=4)
    module = _LM()
    reference_model = copy.deepcopy(module.model)
    callback = HeadImportance(num_batches=4)
    make_trainer(tmp_path, callbacks=[callback], max_epochs=1).fit(module, loader)
    gates = HeadGates(reference_model, differentiable=True)
    total = torch.zeros(3, 4)
    for (batch,) in loader:
        reference_model(batch, labels=batch).loss.backward()
        total += gates.gates.grad.abs()
        gates.gates.grad = None
    expected = total / 4
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert torch.allclose(callback.importance, expected, rtol=1e-4, atol=1e-7)
    from plasticity_lightning.surgery import head_importance  # the functional twin runs its own passes

    functional = head_importance(reference_model, [batch for (batch,) in loader])
    assert torch.allclose(functional, expected, rtol=1e-4, atol=1e-7)
    assert all(p.grad is not None for p in reference_model.parameters())  # the caller's gradients are left alone
    # the gates stay on the model after the fit (validate/test see pruned heads), no longer differentiable
    assert callback.gates.attached_to(module) and not callback.gates.gates.requires_grad
    magnitude = HeadImportance(method="weight_magnitude", normalize=None)
    magnitude.on_fit_start(None, module)
    norms = magnitude.compute()
    attn = module.model.transformer.h[0].attn
    head1 = torch.cat(
        [
            attn.c_attn.weight[:, [8 + i + k * 32 for k in range(3) for i in range(8)]].flatten(),
            attn.c_proj.weight[8:16].flatten(),
        ]
    )
    assert norms[0, 1].item() == pytest.approx(head1.norm().item(), rel=1e-5)


class _LMWithPerplexity(_LM):
    def validation_step(self, batch, batch_idx):
        self.log("val/perplexity", self.model(batch[0], labels=batch[0]).loss.exp())


def _token_loaders():
    """Random token ids: 6 training batches and 2 validation batches of 4 sequences."""
    from torch.utils.data import DataLoader, TensorDataset

    data = torch.randint(0, 61, (32, 12), generator=torch.Generator().manual_seed(3))
    return data, DataLoader(TensorDataset(data[:24]), batch_size=4), DataLoader(TensorDataset(data[24:]), batch_size=4)


def test_pruning_choice_never_takes_a_layers_last_head():
    from plasticity_lightning.policies.heads import lowest_heads

    importance = torch.tensor([[0.0, 0.1, 0.2], [0.9, 0.8, 0.7]])
    alive = torch.tensor([[True, True, False], [True, True, True]])
    # layer 0 has two heads left: only one may go, then the cheapest of layer 1
    assert lowest_heads(importance, alive, 3) == [(0, 0), (1, 2), (1, 1)]
    assert lowest_heads(importance, torch.tensor([[True, False, False], [False, True, False]]), 2) == []


def test_iterative_pruning_by_importance_and_revert_beyond_tolerance(tmp_path):
    from conftest import make_trainer

    from plasticity_lightning import HeadImportance, HeadPruning
    from plasticity_lightning.policies.heads import lowest_heads

    _, train, val = _token_loaders()
    importance = HeadImportance(num_batches=6)
    pruning = HeadPruning(fraction=0.25, max_fraction=0.5, tolerance=1.0)  # generous: prunes until the cap
    make_trainer(tmp_path, callbacks=[importance, pruning], max_epochs=3, num_sanity_val_steps=0).fit(
        _LMWithPerplexity(), train, val
    )
    assert [len(h["pruned"]) for h in pruning.history] == [3, 3, 0]  # 25% of 12 heads per epoch, cap 50%
    assert int((pruning.mask == 0).sum()) == 6 and (pruning.mask.sum(dim=1) >= 1).all()
    alive = torch.ones(3, 4, dtype=torch.bool)
    for step in pruning.history[:2]:  # each step took the least important alive heads of its window
        assert step["pruned"] == lowest_heads(torch.tensor(step["importance"]), alive, 3)
        for layer, head in step["pruned"]:
            alive[layer, head] = False
    assert torch.equal(pruning.mask > 0, alive)

    class Worsening(_LM):  # perplexity rises every epoch, whatever is pruned
        def validation_step(self, batch, batch_idx):
            self.log("val/perplexity", 10.0 + self.current_epoch)

    strict = HeadPruning(fraction=0.25, tolerance=0.05)
    make_trainer(
        tmp_path / "b", callbacks=[HeadImportance(num_batches=6), strict], max_epochs=4, num_sanity_val_steps=0
    ).fit(Worsening(), train, val)
    # epoch 0: baseline 10, prune 3; epoch 1: 11 > 10.5 -> undo that step and stop for good
    assert [(h["perplexity"], len(h["pruned"]), h["reverted"]) for h in strict.history] == [
        (10.0, 3, False),
        (11.0, 0, True),
    ]
    assert strict.stopped and bool((strict.mask == 1).all())


def test_head_pruning_decides_as_the_bare_pruner_fed_its_perplexities_and_importance(tmp_path):
    from conftest import make_trainer

    from plasticity_lightning import HeadImportance, HeadPruning
    from plasticity_lightning.policies.heads import IterativeHeadPruner
    from plasticity_lightning.surgery.heads import HeadGates

    class Worsening(_LMWithPerplexity):  # perplexity rises by 0.3 per epoch: the third step breaks a 0.5 tolerance
        def validation_step(self, batch, batch_idx):
            self.log("val/perplexity", 1.0 + 0.3 * self.current_epoch)

    _, train, val = _token_loaders()
    pruning = HeadPruning(fraction=0.25, max_fraction=0.75, tolerance=0.5)
    make_trainer(
        tmp_path, callbacks=[HeadImportance(num_batches=6), pruning], max_epochs=4, num_sanity_val_steps=0
    ).fit(Worsening(), train, val)
    bare, gates = IterativeHeadPruner(fraction=0.25, max_fraction=0.75, tolerance=0.5), HeadGates(tiny_gpt2())
    for record in pruning.history:  # no trainer: the callback's inputs, the pruner's decisions
        step = bare.step(gates, record["perplexity"], lambda record=record: torch.tensor(record["importance"]))
        assert (step.heads, step.reverted) == (record["pruned"], record["reverted"])
    assert [(len(h["pruned"]), h["reverted"]) for h in pruning.history] == [(3, False), (3, False), (0, True)]
    assert torch.equal(gates.mask, pruning.mask) and bare.state_dict() == pruning.pruner.state_dict()


def test_pruning_resumes_from_a_checkpoint_with_its_mask(tmp_path):
    from conftest import make_trainer

    from plasticity_lightning import HeadImportance, HeadPruning

    data, train, val = _token_loaders()

    def run(root, epochs, ckpt=None):
        pruning = HeadPruning(fraction=0.25, max_fraction=0.75, tolerance=1.0)
        trainer = make_trainer(
            root, callbacks=[HeadImportance(num_batches=6), pruning], max_epochs=epochs, num_sanity_val_steps=0
        )
        module = _LMWithPerplexity()
        trainer.fit(module, train, val, ckpt_path=ckpt)
        return trainer, pruning, module

    _, full, full_model = run(tmp_path / "full", 3)
    half_trainer, _, _ = run(tmp_path / "half", 2)
    half_trainer.save_checkpoint(tmp_path / "half.ckpt")
    _, resumed, resumed_model = run(tmp_path / "resumed", 3, tmp_path / "half.ckpt")
    assert [h["pruned"] for h in resumed.history] == [h["pruned"] for h in full.history]
    assert torch.equal(resumed.mask, full.mask) and int((full.mask == 0).sum()) == 9
    x = data[24:28]
    gates = HeadGates(resumed_model.model)  # the saved model carries no gates: apply the mask to compare outputs
    gates.load(resumed.mask)
    reference = HeadGates(full_model.model)
    reference.load(full.mask)
    with torch.no_grad():
        assert torch.allclose(resumed_model.model(x).logits, full_model.model(x).logits, atol=1e-6)


def test_attention_that_is_not_gpt2_fused_layout_is_refused():
    model = tiny_gpt2()
    attn = model.transformer.h[1].attn
    attn.c_attn = torch.nn.Linear(32, 96)  # a Linear stores [out, in]: slicing columns would cut the wrong weights
    with pytest.raises(PlasticityConfigError, match=r"transformer.h.1.attn: c_attn weight \(96, 32\)"):
        HeadGates(model)


def test_gate_gradients_are_unscaled_and_overflowing_steps_skipped():
    from types import SimpleNamespace

    from plasticity_lightning import HeadImportance

    class Scaler:
        def is_enabled(self):
            return True

        def get_scale(self):
            return 1024.0

    module = _LM()
    callback = HeadImportance(num_batches=10)
    callback.on_fit_start(None, module)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=Scaler()))
    callback.gates.gates.grad = torch.full((3, 4), -2048.0)
    callback.on_after_backward(trainer, module)
    assert torch.equal(callback.policy.sum, torch.full((3, 4), 2.0))  # |grad| / loss scale
    callback.gates.gates.grad = torch.full((3, 4), float("inf"))
    callback.on_after_backward(trainer, module)
    assert torch.equal(callback.policy.sum, torch.full((3, 4), 2.0)) and callback.gates.gates.grad is None


def test_pruned_heads_persist_after_the_fit_and_fold_into_the_weights(tmp_path):
    from conftest import make_trainer

    from plasticity_lightning import HeadImportance, HeadPruning

    data, train, val = _token_loaders()
    importance, pruning = HeadImportance(num_batches=6), HeadPruning(fraction=0.25, max_fraction=0.5, tolerance=10.0)
    module = _LMWithPerplexity()
    trainer = make_trainer(tmp_path, callbacks=[importance, pruning], max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(module, train, val)
    mask = importance.gates.mask
    assert int((mask == 0).sum()) == 3
    trainer.validate(module, val)  # validation outside the fit: nothing is pruned, the gates still apply
    assert torch.equal(importance.gates.mask, mask) and len(pruning.history) == 1
    x = data[24:28]
    with torch.no_grad():
        gated = module.model(x).logits
    # a second fit of the same model keeps the pruned heads
    make_trainer(tmp_path / "b", callbacks=[importance], max_epochs=1, num_sanity_val_steps=0).fit(module, train)
    assert torch.equal(importance.gates.mask, mask)
    importance.gates.fold_()  # baked into c_proj: no hooks, same function
    with torch.no_grad():
        assert torch.allclose(module.model(x).logits, gated, atol=1e-6)
    assert not importance.gates._handles
