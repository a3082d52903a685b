"""Head surgery and the head callbacks on attention that is not GPT-2's: Llama's q/k/v/o projections, with and
without grouped K/V heads. Every head found with zero configuration, gated where the output projection receives it;
each operation against an independent computation on the weights."""

import copy
import math

import pytest
import torch
from conftest import make_trainer
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.callbacks import AttentionEntropyMonitor, HeadGrowth, HeadImportance, HeadPruning
from plasticity_lightning.data import TextDataModule
from plasticity_lightning.models.causal_lm import CausalLM
from plasticity_lightning.policies.heads import HeadReviver, ReviverSettings
from plasticity_lightning.surgery import HeadGates, head_weight_norms, prune_heads_, reinit_heads
from plasticity_lightning.surgery.heads import attention_layouts

D = 8  # head width: 32 wide, 4 heads


def tiny_llama(kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=61,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(seed))


def columns(head: int) -> slice:
    return slice(head * D, (head + 1) * D)


def test_llama_heads_are_found_and_a_zero_gate_is_a_head_without_output_weights():
    model = tiny_llama()
    layouts = attention_layouts(model)
    assert [(name, layout.kind, layout.num_heads) for name, layout in layouts] == [
        ("model.layers.0.self_attn", "qkvo", 4),
        ("model.layers.1.self_attn", "qkvo", 4),
    ]
    x = ids()
    reference = copy.deepcopy(model)
    with torch.no_grad():  # the independent twin: heads (0, 1) and (1, 3) lose their o_proj input columns
        reference.model.layers[0].self_attn.o_proj.weight[:, columns(1)] = 0.0
        reference.model.layers[1].self_attn.o_proj.weight[:, columns(3)] = 0.0
        expected = reference(x).logits
    gates = HeadGates(model)
    gates.set(0, 1, 0.0)
    gates.set(1, 3, 0.0)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, expected, atol=1e-6)
    gates.set(0, 1, 0.5)
    with torch.no_grad():
        gated = model(x).logits
    gates.fold_()  # the half gate baked into o_proj: the same function, no hooks left
    assert not gates.attached_to(model)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, gated, atol=1e-6)
    with pytest.raises(PlasticityConfigError, match=r"prune_heads_: model.layers.0.self_attn has the 'qkvo' layout"):
        prune_heads_(model, {0: [1]})


def test_llama_gate_gradient_is_the_derivative_of_the_loss():
    # ∂L/∂ξ_h at ξ = 1 equals Σ W ⊙ ∂L/∂W over head h's o_proj columns (chain rule through o_proj(x ⊙ ξ)): the
    # weight gradient, which autograd computes without the gates, is the independent route
    model = tiny_llama()
    gates = HeadGates(model, differentiable=True)
    model(ids(), labels=ids()).loss.backward()
    for layer in range(2):
        weight = model.model.layers[layer].self_attn.o_proj.weight
        expected = [float((weight * weight.grad)[:, columns(h)].sum()) for h in range(4)]
        assert gates.gates.grad[layer].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_llama_head_reinit_norms_and_optimizer_state_touch_exactly_the_heads_weights(kv_heads):
    model = tiny_llama(kv_heads).train()
    attn = model.model.layers[1].self_attn
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(ids(), labels=ids()).loss.backward()
    optimizer.step()
    before = {n: p.detach().clone() for n, p in attn.named_parameters()}
    # norms: the head's query rows, its K/V rows when it owns them, its o_proj columns
    owned = ["q_proj"] + (["k_proj", "v_proj"] if kv_heads == 4 else [])
    expected = [
        math.sqrt(
            sum(float(before[f"{p}.weight"][columns(h)].pow(2).sum()) for p in owned)
            + float(before["o_proj.weight"][:, columns(h)].pow(2).sum())
        )
        for h in range(4)
    ]
    assert head_weight_norms(attn).tolist() == pytest.approx(expected, rel=1e-5)

    reinit_heads(
        attn, [2], std=0.02, output_scale=0.0, generator=torch.Generator().manual_seed(0), optimizers=[optimizer]
    )
    after = dict(attn.named_parameters())
    others = [h for h in range(4) if h != 2]
    for name in ("q_proj", "k_proj", "v_proj"):
        new, old = after[f"{name}.weight"], before[f"{name}.weight"]
        if name not in owned:  # a K/V head shared with head 3 is not head 2's to re-draw
            assert torch.equal(new, old), name
            continue
        assert 0.005 < float(new[columns(2)].std()) < 0.04  # N(0, 0.02²) draws
        assert all(torch.equal(new[columns(h)], old[columns(h)]) for h in others), name
        state = optimizer.state[new]
        assert (state["exp_avg"][columns(2)] == 0).all() and (state["exp_avg"][columns(0)] != 0).any()
    assert (after["o_proj.weight"][:, columns(2)] == 0).all()  # output_scale 0: silent
    assert all(
        torch.equal(after["o_proj.weight"][:, columns(h)], before["o_proj.weight"][:, columns(h)]) for h in others
    )
    assert (optimizer.state[after["o_proj.weight"]]["exp_avg_sq"][:, columns(2)] == 0).all()


def test_the_reviver_boosts_exactly_the_revived_heads_weights_of_a_llama():
    model = tiny_llama().train()
    gates = HeadGates(model)
    gates.set(0, 3, 0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reviver = HeadReviver(gates, warmup_steps=2, lr_multiplier=3.0, boost_steps=10, output_scale=1.0)
    reviver.attach([optimizer])
    reviver.revive([(0, 3)], step=0, generator=torch.Generator().manual_seed(0), optimizers=[optimizer])
    attn = model.model.layers[0].self_attn
    before = {n: p.detach().clone() for n, p in attn.named_parameters()}
    model(ids(), labels=ids()).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in attn.named_parameters()}
    optimizer.step()
    after = dict(attn.named_parameters())
    # SGD: a step of -lr·grad, three times as large on the revived head's query rows and o_proj columns (factor
    # 1 + 2·(1 - 0/10) at its first step)
    q_step = before["q_proj.weight"] - after["q_proj.weight"]
    assert torch.allclose(q_step[columns(3)], 0.3 * grads["q_proj.weight"][columns(3)], atol=1e-7)
    assert torch.allclose(q_step[columns(0)], 0.1 * grads["q_proj.weight"][columns(0)], atol=1e-7)
    o_step = before["o_proj.weight"] - after["o_proj.weight"]
    assert torch.allclose(o_step[:, columns(3)], 0.3 * grads["o_proj.weight"][:, columns(3)], atol=1e-7)
    k_step = before["k_proj.weight"] - after["k_proj.weight"]  # shared by heads 2 and 3: not boosted
    assert torch.allclose(k_step, 0.1 * grads["k_proj.weight"], atol=1e-7)
    assert gates.gates[0, 3].item() == 0.5


def test_head_callbacks_on_a_llama_causal_lm_with_zero_configuration(corpus):
    data = TextDataModule(
        text_files=[str(corpus / "texts")], block_size=12, batch_size=8, vocab_size=300, data_dir=str(corpus / "c")
    )
    model = CausalLM(
        pretrained=False,
        architecture="llama",
        attn_implementation="eager",
        config={
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    )
    importance = HeadImportance(num_batches=4)
    pruning = HeadPruning(fraction=0.25, max_fraction=0.5, tolerance=10.0)
    growth = HeadGrowth(
        fraction=0.5, choice="entropy_gap", every_n_validations=1, reviver=ReviverSettings(warmup_steps=2), probe_size=4
    )
    entropy = AttentionEntropyMonitor(probe_size=4, every_n_epochs=1)
    trainer = make_trainer(
        corpus,
        callbacks=[importance, pruning, growth, entropy],
        max_epochs=2,
        num_sanity_val_steps=0,
        limit_train_batches=8,
        limit_val_batches=2,
    )
    trainer.fit(model, data)
    assert [len(h["pruned"]) for h in pruning.history] == [2, 2]  # 25% of 8 heads per validation
    assert [len(h["revived"]) for h in growth.history] == [1, 1]  # half the dead heads (2 each time), at least one
    assert importance.gates.num_layers == 2 and importance.importance.shape == (2, 4)
    assert torch.isfinite(importance.importance).all()
    # entropies of 4 heads × 2 layers, within [0, ln 12] (causal attention over at most 12 positions)
    assert entropy.entropy.shape == (2, 4) and bool(((entropy.entropy >= 0) & (entropy.entropy <= math.log(12))).all())


def test_attention_without_a_known_layout_is_named_in_one_line():
    model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24))
    with pytest.raises(PlasticityConfigError, match=r"no attention modules whose heads can be sliced.*BertAttention"):
        HeadGates(model)
