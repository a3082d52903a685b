"""Any model, zero configuration: the monitors and interventions on models nobody here wrote. Each model is built from
its config (no download) and wrapped in the thinnest LightningModule (its own forward, cross-entropy), as a user
would. One short fit runs RankMonitor, DormantUnitMonitor, ContinualBackprop and ReDo with no arguments that name a
layer. Each callback must log finite values; at the last step, where CBP and ReDo both replace units, every replaced
unit's outgoing weights are zero, its incoming weights re-drawn and nothing else changed, so the network computes
what it computed before minus the old units' contribution (the gated MLP of Llama included, and Phi3's fused
``gate_up_proj``, where a unit owns one row in each half). The LSTM and GRU language models have no producer →
consumer pair: its monitors work, and the interventions fail with one line that names ``pairs=``.
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from torch import nn

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.callbacks import ContinualBackprop, DormantUnitMonitor, RankMonitor, ReDo, SurgeCollapse
from plasticity_lightning.surgery.topology import unit_weight

STEPS = 2


def _shared_zoo():
    """benchmarks/_zoo.py, which benchmarks/any_model.py also builds its models and data with (loaded by path)."""
    import importlib.util
    import sys
    from pathlib import Path

    if "benchmarks_zoo" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "_zoo.py"
        spec = importlib.util.spec_from_file_location("benchmarks_zoo", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks_zoo"] = module  # Lightning deep-copies the wrapped model: its class must resolve
        spec.loader.exec_module(module)
    return sys.modules["benchmarks_zoo"]


_zoo = _shared_zoo()
VOCAB, SEQ, Wrapped, _data = _zoo.VOCAB, _zoo.SEQ, _zoo.Wrapped, _zoo.random_data


class TransformerLM(nn.Module):
    """``nn.TransformerEncoder`` LM, sequence-first as torch's default (functional ReLU inside each layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids).transpose(0, 1)).transpose(0, 1))


class LSTMLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


class GRULM(LSTMLM):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(16, 32, batch_first=True)


def _hf(kind: str) -> nn.Module:
    import transformers as tf

    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if kind in ("opt", "gpt_neox"):  # fc1 → fc2 inside the decoder layer; dense_h_to_4h → dense_4h_to_h
        width = {"ffn_dim": 24, "word_embed_proj_dim": 16} if kind == "opt" else {"intermediate_size": 24}
        config = tf.AutoConfig.for_model(
            kind,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=SEQ,
            **width,
            **special,
        )
        return tf.AutoModelForCausalLM.from_config(config)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(
            tf.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=SEQ, vocab_size=VOCAB, **special)
        )
    if kind in ("phi3", "llama"):  # phi3: gate and up in one weight, gate, up = gate_up_proj(x).chunk(2, dim=-1)
        return _zoo.hf_causal_lm(kind)
    config = tf.BertConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        num_labels=4,
        pad_token_id=0,
    )
    return tf.BertForSequenceClassification(config)


def _torchvision(kind: str) -> nn.Module:
    import torchvision

    if kind == "vit_b_16":
        return torchvision.models.vit_b_16(image_size=16, num_classes=4)
    if kind == "vit":  # vit_b_16's class, a tiny configuration
        return torchvision.models.VisionTransformer(16, 8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    return getattr(torchvision.models, kind)(num_classes=4)


def _timm(kind: str) -> nn.Module:
    timm = pytest.importorskip("timm")  # the optional `test` extra installs it
    if kind == "vit_tiny":
        return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, num_classes=4)
    return timm.create_model("convnext_atto", depths=(1, 1, 1, 1), num_classes=4)


# name → (builder, input kind)
ZOO = {
    "resnet18": (lambda: _torchvision("resnet18"), "image"),
    "mobilenet_v3_small": (lambda: _torchvision("mobilenet_v3_small"), "image"),
    "vit": (lambda: _torchvision("vit"), "image"),
    "vit_b_16": (lambda: _torchvision("vit_b_16"), "image"),  # 86M parameters, ~8 s on 2 cores, as the issue asks
    "transformer_lm": (TransformerLM, "tokens"),
    "lstm_lm": (LSTMLM, "tokens"),
    "gru_lm": (GRULM, "tokens"),
    "gpt2": (lambda: _hf("gpt2"), "tokens"),
    "llama": (lambda: _hf("llama"), "tokens"),
    "phi3": (lambda: _hf("phi3"), "tokens"),
    "opt": (lambda: _hf("opt"), "tokens"),
    "gpt_neox": (lambda: _hf("gpt_neox"), "tokens"),
    "bert": (lambda: _hf("bert"), "sentence"),
    "timm_vit_tiny": (lambda: _timm("vit_tiny"), "image"),
    "timm_convnext_atto": (lambda: _timm("convnext_atto"), "image32"),  # four stride-2 stages
}


class _SnapshotBeforeSurgery(pl.Callback):
    """Keeps the model as the last optimizer step left it, before CBP and ReDo (after it in the list) act."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == STEPS:
            self.model = copy.deepcopy(pl_module)


def _replaced_units(pairs, after: nn.Module) -> dict[str, torch.Tensor]:
    """Each producer's replaced units: those whose outgoing weights are all zero (trained weights never are exactly),
    except in the consumer's own replaced rows, which were re-drawn after (a consumer that is also a producer)."""
    replaced: dict[str, torch.Tensor] = {}
    producers = {pair.producer for pair in pairs}
    for pair in sorted(pairs, key=lambda p: p.consumer in producers):  # chains' last pairs first
        weight = unit_weight(after.get_submodule(pair.consumer)).detach()
        rows = torch.ones(weight.shape[0], dtype=torch.bool)
        if pair.consumer in producers:
            rows[replaced[pair.consumer]] = False
        zero = (weight[rows].reshape(int(rows.sum()), pair.num_units, -1) == 0).all(dim=(0, 2))
        replaced[pair.producer] = torch.nonzero(zero).flatten()
    return replaced


def _producer_rows(model: nn.Module, pair) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(name, incoming weights ``[units, ...]``, bias) of every producer of the pair's units in ``model``, read from
    the model's own layers: a fused producer's ``pair.fused`` row blocks (``chunk`` along its output) one by one."""
    rows = []
    for name in (pair.producer, *pair.partners):
        layer = model.get_submodule(name)
        blocks = pair.fused if name == pair.producer else 1
        weights = unit_weight(layer).detach().chunk(blocks, dim=0)
        biases = layer.bias.detach().chunk(blocks) if layer.bias is not None else [None] * blocks
        rows += [(f"{name}[{k}]", w, b) for k, (w, b) in enumerate(zip(weights, biases, strict=True))]
    return rows


def _check_surgery(pairs, before: nn.Module, after: nn.Module, x: torch.Tensor) -> int:
    """Replaced units: outgoing weights zero, incoming re-drawn, bias zero, nothing else touched; returns how many.
    Then ``before`` without the replaced units' outgoing weights must compute what ``after`` computes."""
    replaced = _replaced_units(pairs, after)
    for pair in pairs:
        units = replaced[pair.producer]
        keep = torch.ones(pair.num_units, dtype=torch.bool)
        keep[units] = False
        olds, news = _producer_rows(before, pair), _producer_rows(after, pair)
        assert len(news) == 1 + len(pair.partners) + pair.fused - 1
        for (name, old, _), (_, new, bias) in zip(olds, news, strict=True):
            assert old.shape[0] == pair.num_units, name
            assert torch.equal(old[keep], new[keep]), f"{name}: a unit that was not replaced changed"
            assert (old[units] != new[units]).flatten(1).any(dim=1).all(), f"{name}: a replaced unit kept its weights"
            assert bias is None or (bias[units] == 0).all()
        old_consumer = unit_weight(before.get_submodule(pair.consumer))
        with torch.no_grad():  # the old units' contribution, removed
            old_consumer.reshape(old_consumer.shape[0], pair.num_units, -1)[:, units] = 0.0
    before.eval(), after.eval()
    with torch.no_grad():
        expected, got = before(x), after(x)
    assert torch.allclose(expected, got, atol=1e-5, rtol=1e-4), (expected - got).abs().max()
    return sum(units.numel() for units in replaced.values())


@pytest.mark.parametrize("name", list(ZOO))
def test_monitors_and_interventions_work_with_zero_configuration(name, tmp_path):
    build, kind = ZOO[name]
    torch.manual_seed(0)
    model = Wrapped(build())
    data = _data(kind)
    monitors = [RankMonitor(), DormantUnitMonitor()]
    cbp = ContinualBackprop(replacement_rate=0.2, maturity_threshold=0)
    redo = ReDo(every_n_steps=STEPS, tau=0.5, seed=1)  # its own draws: seed 0 would repeat CBP's first ones
    if name in ("lstm_lm", "gru_lm"):  # nothing to pair: the monitors read the hidden states, the interventions refuse
        for intervention in (cbp, redo):
            owner = type(intervention).__name__
            one_line = rf"^{owner}: [^\n]*net\.rnn \((LSTM|GRU)\) live inside the recurrence[^\n]*pairs=[^\n]*$"
            with pytest.raises(PlasticityConfigError, match=one_line):
                make_trainer(tmp_path, callbacks=[intervention], max_steps=STEPS).fit(Wrapped(build()), data)
        interventions = []
    else:
        interventions = [cbp, redo]
    snapshot = _SnapshotBeforeSurgery()
    trainer = make_trainer(
        tmp_path, callbacks=[*monitors, snapshot, *interventions], max_steps=STEPS, log_every_n_steps=1
    )
    trainer.fit(model, data)
    logged = {key: float(value) for key, value in trainer.callback_metrics.items()}
    for monitor in monitors:
        assert monitor.layers, f"{type(monitor).__name__} found no layers"
        values = {k: v for k, v in monitor.history[-1].items() if "/" in k}
        assert {k.rsplit("/", 1)[0] for k in values} >= set(monitor.layers)  # every found layer measured
        assert values and all(math.isfinite(v) for v in values.values()), values
    if not interventions:
        assert list(monitors[0].layers) == ["net.rnn"]
        return
    for prefix, key in (("cbp", "cbp/replaced"), ("redo", "redo/recycled_total")):
        values = {k: v for k, v in logged.items() if k.startswith(f"{prefix}/")}
        assert key in values and all(math.isfinite(v) for v in values.values()), values
    assert cbp.pairs and [p.producer for p in cbp.pairs] == [p.producer for p in redo.pairs]
    x = next(iter(data))[0]
    assert _check_surgery(cbp.pairs, snapshot.model, model, x) > 0


class _Routed(nn.Module):
    """Data-dependent control flow: no trace reads it, and no rule knows it."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 12)
        self.down = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        return self.down(h if h.sum() > 0 else -h)


def test_an_intervention_logs_once_which_pairs_it_bound_and_which_blocks_it_skipped(tmp_path, caplog):
    import logging

    net = nn.Sequential(nn.Linear(3, 4), _Routed(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), batch_size=4
    )
    cbp = ContinualBackprop()
    lightning_log = logging.getLogger("lightning.pytorch")  # Lightning's own handler does not propagate
    lightning_log.addHandler(caplog.handler)
    try:
        with pytest.warns(
            UserWarning, match=r"ContinualBackprop: skipped 1 block\(s\).*net\.1 \(_Routed: cannot trace"
        ):
            make_trainer(tmp_path, callbacks=[cbp], max_steps=2).fit(Wrapped(net), data)
    finally:
        lightning_log.removeHandler(caplog.handler)
    bound = [r.getMessage() for r in caplog.records if "bound" in r.getMessage()]
    assert len(bound) == 1
    assert bound[0].startswith("ContinualBackprop: bound 1 producer → consumer pair(s): net.2 → net.4; skipped net.1")
    assert [p.producer for p in cbp.pairs] == ["net.2"] and list(cbp.skipped_blocks) == ["net.1"]


@pytest.mark.parametrize("name", ["transformer_lm", "lstm_lm", "llama"])
def test_entropy_gated_surge_collapse_reads_the_units_the_monitors_find(name, tmp_path):
    """SurgeCollapse's gate measures the layers the monitors find (functional ReLU, LSTM states, a gated MLP's
    ``act(gate) * up``), softmax over each layer's units: the entropy against numpy on the same activations."""
    build, kind = ZOO[name]
    torch.manual_seed(0)
    model = Wrapped(build())
    data = _data(kind)
    monitor = RankMonitor()
    gated = SurgeCollapse(mode="entropy_gated", entropy_threshold=1e-9, probe_size=64)  # the gate stays shut
    trainer = make_trainer(tmp_path, callbacks=[monitor, gated], max_steps=STEPS)
    trainer.fit(model, data)  # one epoch of 2 steps, then the gate's measurement
    assert gated._hidden and list(gated._hidden) == list(monitor.layers)
    # what each layer gave on the whole training set (the probe: every row), read by hooks of our own
    captured: dict[str, torch.Tensor] = {}
    named = dict(model.named_modules())

    def keep(layer, reads_input):
        def hook(module, args, output=None):
            value = args if reads_input else output
            captured[layer] = (value[0] if isinstance(value, tuple) else value).detach()

        return hook

    handles = [
        named[layer.removesuffix(":input")].register_forward_pre_hook(keep(layer, True))
        if layer.endswith(":input")
        else named[layer].register_forward_hook(keep(layer, False))
        for layer in gated._hidden
    ]
    model.train()  # dropout is 0: the same outputs as eval, through the modules (no fused fast path)
    with torch.no_grad():
        model(data.dataset.tensors[0])
    for handle in handles:
        handle.remove()
    expected = []
    for layer, h in captured.items():
        units = h.transpose(0, 1) if name == "transformer_lm" else h  # sequence-first: [time, batch, hidden]
        assert units.shape[-1] == {"transformer_lm": 32, "lstm_lm": 32, "llama": 24}[name], layer
        rows = units.double().reshape(-1, units.shape[-1]).numpy()
        p = np.exp(rows - rows.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        expected.append(float(-(p * np.log(p + 1e-10)).sum(axis=1).mean()))
    assert gated.counts["resets"] == 0 and gated.skipped_nonfinite == 0
    logged = trainer.callback_metrics["surge_collapse/entropy"].item()
    assert logged == pytest.approx(np.mean(expected), rel=1e-5)


def test_a_fused_gate_up_unit_owns_one_row_in_each_half_and_its_replacement_keeps_the_output(monkeypatch):
    """Phi3 computes gate and up with one weight (``chunk(2, dim=-1)``): unit i is rows i and U + i of
    ``gate_up_proj`` and column i of ``down_proj``. Replacing it re-draws both rows (independently), zeroes the
    column and the optimizer state of exactly those slices, and leaves the output as it was without the old units."""
    from plasticity_lightning.surgery import find_unit_pairs, reinit_units
    from plasticity_lightning.surgery import rules as rules_module

    torch.manual_seed(0)
    model = _hf("phi3").eval()
    pairs = find_unit_pairs(model)
    mlps = [f"model.layers.{i}.mlp" for i in (0, 1)]
    assert [(p.producer, p.consumer, p.fused, p.rule) for p in pairs] == [
        (f"{m}.gate_up_proj", f"{m}.down_proj", 2, "hf_fused_gated_mlp") for m in mlps
    ]
    pair = pairs[0]
    gate_up, down = model.model.layers[0].mlp.gate_up_proj, model.model.layers[0].mlp.down_proj
    assert pair.num_units == 24 and pair.gated and "(2 fused row blocks)" in pair.describe()
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(ids, labels=ids).loss.backward()
    opt.step()
    units = torch.tensor([0, 7, 23])
    with torch.no_grad():  # the old units' contribution, removed by hand
        down.weight[:, units] = 0.0
        expected = model(ids).logits
    old = gate_up.weight.detach().clone()
    reinit_units(pair, units, generator=torch.Generator().manual_seed(3), optimizers=[opt])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-6)
    rows = torch.cat([units, units + 24])  # gate rows, then up rows
    others = torch.ones(48, dtype=torch.bool)
    others[rows] = False
    new = gate_up.weight.detach()
    assert (new[rows] != old[rows]).all(dim=1).all() and torch.equal(new[others], old[others])
    assert not torch.equal(new[units], new[units + 24])  # two independent draws
    assert (new[rows].abs() <= 1 / 16**0.5).all()  # the layer's own default init, fan-in 16
    state = opt.state[gate_up.weight]
    assert (state["exp_avg"][rows] == 0).all() and (state["exp_avg"][others] != 0).any(dim=1).all()
    columns = torch.ones(24, dtype=torch.bool)
    columns[units] = False
    assert (opt.state[down.weight]["exp_avg_sq"][:, units] == 0).all()
    assert (opt.state[down.weight]["exp_avg_sq"][:, columns] != 0).any(dim=0).all()
    # explicit pairs that agree with the rule take its fused layout
    (named,) = find_unit_pairs(model, pairs=[[pair.producer, pair.consumer]])
    assert named.fused == 2 and named.num_units == 24
    # RR-CBP draws Σ-orthogonal rows for one producer: a fused unit is refused as a gated one
    from plasticity_lightning.policies import ContinualBackprop as CBPPolicy

    with pytest.raises(
        PlasticityConfigError, match=r"single-producer pairs only; 'model\.layers\.0\.mlp\.gate_up_proj \(2"
    ):
        CBPPolicy(model, init="sigma_orthogonal")
    # without the rule nothing pairs: one line naming the block, its layers and both fixes
    monkeypatch.setattr(rules_module, "_RULES", [r for r in rules_module._RULES if r.name != "hf_fused_gated_mlp"])
    with pytest.raises(PlasticityConfigError) as error:
        find_unit_pairs(model, owner="ContinualBackprop")
    message = str(error.value)
    assert "\n" not in message and message.startswith("ContinualBackprop: ")
    assert "Phi3MLP at model.layers.0.mlp and 1 more (gate_up_proj, down_proj)" in message
    assert "pairs=[['model.layers.0.mlp.gate_up_proj', 'model.layers.0.mlp.down_proj']]" in message
    assert "register a PairingRule for Phi3MLP" in message
