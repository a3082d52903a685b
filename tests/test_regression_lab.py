"""Regression lab: particle physics data, adaptive loss, weight constraints (bit-level and James-Stein)."""

from __future__ import annotations

import math
import struct

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from plasticity_lightning.callbacks import (
    AdaptiveLossWeights,
    JamesSteinShrinkage,
    OscillationDampener,
    WeightPrecision,
)
from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.data import ParticleDataModule, cyclotron_motion, generate_particles
from plasticity_lightning.losses import AdaptiveRegressionLoss, adaptive_loss_weights, build_loss
from plasticity_lightning.models import MLP
from plasticity_lightning.surgery.constraints import (
    adaptive_damping_bits,
    clear_lowest_set_bits,
    james_stein_factor,
    round_mantissa,
    significant_bits,
    strict_extrema,
    truncate_ieee_bits,
)


# ---------------------------------------------------------------------------------------------- particles
def test_speed_is_conserved_and_neutral_particles_move_straight():
    columns = generate_particles(500, seed=3)
    speed_before = np.hypot(columns["initial_velocity_x"], columns["initial_velocity_y"])
    speed_after = np.hypot(columns["final_velocity_x"], columns["final_velocity_y"])
    np.testing.assert_allclose(speed_after, speed_before, rtol=1e-12)
    neutral = columns["charge"] == 0
    assert 100 < neutral.sum() < 250  # about a third
    t = columns["simulation_time"][neutral]
    np.testing.assert_allclose(
        columns["final_position_x"][neutral],
        columns["initial_position_x"][neutral] + t * columns["initial_velocity_x"][neutral],
    )
    np.testing.assert_allclose(columns["final_velocity_y"][neutral], columns["initial_velocity_y"][neutral])
    kinetic = 0.5 * columns["mass"] * speed_after**2
    np.testing.assert_allclose(columns["kinetic_energy"], kinetic, rtol=1e-12)


def test_charged_particle_stays_on_its_gyration_circle():
    # the velocity turns by φ = ωt, so the centre of gyration c = r + (-v_y, v_x)/ω is fixed; radius |v|/|ω|
    m, q, b, t = np.array([2.0]), np.array([-1.0]), np.array([0.5]), np.array([3.7])
    v0, r0 = np.array([[1.5, -0.5]]), np.array([[2.0, 1.0]])
    omega = q * b / m
    v1, r1 = cyclotron_motion(m, q, b, t, v0, r0)
    centre0 = r0 + np.stack([-v0[:, 1], v0[:, 0]], axis=1) / omega[:, None]
    centre1 = r1 + np.stack([-v1[:, 1], v1[:, 0]], axis=1) / omega[:, None]
    np.testing.assert_allclose(centre1, centre0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(r1 - centre0), np.linalg.norm(v0) / abs(omega[0]), rtol=1e-12)
    # and the velocity turned by φ = ωt (clockwise for negative charge)
    phi = omega[0] * t[0]
    turned = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]]) @ v0[0]
    np.testing.assert_allclose(v1[0], turned, atol=1e-12)


def test_a_full_turn_returns_to_the_start():
    m, q, b = np.array([1.0]), np.array([1.0]), np.array([2.0])
    period = 2 * np.pi * m / (q * b)
    v0, r0 = np.array([[0.3, 4.0]]), np.array([[-1.0, 7.0]])
    v1, r1 = cyclotron_motion(m, q, b, period, v0, r0)
    np.testing.assert_allclose(v1, v0, atol=1e-12)
    np.testing.assert_allclose(r1, r0, atol=1e-12)


def test_particles_are_seeded_and_derived_features_match():
    a, b, c = generate_particles(50, seed=1), generate_particles(50, seed=1), generate_particles(50, seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["mass"], c["mass"])
    np.testing.assert_allclose(a["angular_frequency"], a["charge"] * a["magnetic_field_strength"] / a["mass"])
    np.testing.assert_allclose(a["cos_phase"], np.cos(a["angular_frequency"] * a["simulation_time"]))
    assert a["mass"].min() >= 0.1 and a["mass"].max() <= 10 and set(np.unique(a["charge"])) <= {-1.0, 0.0, 1.0}


def test_particle_datamodule_standardises_with_training_statistics_only():
    dm = ParticleDataModule(n_particles=500, seed=5, batch_size=32)
    dm.setup("fit")
    train, val, test = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    assert (len(train), len(val), len(test)) == (320, 80, 100)
    torch.testing.assert_close(train.inputs.mean(0), torch.zeros(23), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.targets.std(0, unbiased=False), torch.ones(6), atol=1e-5, rtol=0)
    assert val.targets.mean(0).abs().max() > 1e-3  # not re-fitted on validation rows
    # the inverse transform recovers the simulated targets in physical units
    raw = generate_particles(500, seed=5)
    physical = dm.inverse_transform_targets(test.targets).double().numpy()
    ke = physical[:, dm.target_names.index("kinetic_energy")]
    assert np.isin(np.round(ke, 2), np.round(raw["kinetic_energy"], 2)).all()
    raw_only = ParticleDataModule(n_particles=100, features="raw")
    assert raw_only.input_shape == (8,)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_particles": 0}, "n_particles"),
        ({"features": "derived"}, "features"),
        ({"noise": -0.1}, "noise"),
        ({"n_particles": 3, "test_fraction": 0.2}, "n_particles"),
    ],
)
def test_particle_datamodule_rejects_bad_settings(kwargs, field):
    with pytest.raises(PlasticityConfigError, match=field):
        ParticleDataModule(**kwargs).setup("fit")


# ---------------------------------------------------------------------------------------------- adaptive loss
@pytest.mark.parametrize("r2", [-0.5, 0.0, 0.3, 0.99, 1.2])
@pytest.mark.parametrize("loss", [0.0, 0.4, 1.7, 5.0])
def test_r2_loss_and_combined_weights_match_the_seed_formulas(r2, loss):
    expected_r2 = (min(0.9, 0.2 + 0.7 * r2), max(0.1, 0.8 - 0.7 * r2))
    score = 1 - min(1.0, max(0.0, loss / 2))
    expected_loss = (min(0.9, 0.2 + 0.7 * score), max(0.1, 0.8 - 0.7 * score))
    assert adaptive_loss_weights("r2_based", r2, loss) == pytest.approx(expected_r2)
    assert adaptive_loss_weights("loss_based", r2, loss) == pytest.approx(expected_loss)
    mse, mae = (expected_r2[0] + expected_loss[0]) / 2, (expected_r2[1] + expected_loss[1]) / 2
    assert adaptive_loss_weights("combined", r2, loss) == pytest.approx((mse / (mse + mae), mae / (mse + mae)))


def test_physics_aware_weights_by_hand():
    # epochs 1–4: the sine schedule at the number of recorded losses
    for epoch in range(1, 5):
        w = adaptive_loss_weights("physics_aware", loss_history=[1.0] * epoch, weight_history=[[0.5, 0.5]] * 2)
        assert w == pytest.approx(((math.sin(epoch) + 1) / 2, (1 - math.sin(epoch)) / 2))
    # epoch 5, loss fell: direction = -unit(signed square of the last weight step), plus the sine weights
    weights = [[0.5, 0.5], [0.6, 0.4]]
    w = adaptive_loss_weights("physics_aware", loss_history=[1, 0.9, 0.8, 0.7, 0.6], weight_history=weights)
    direction = np.array([-(0.1**2), 0.1**2]) / math.sqrt(2 * 0.1**4)  # unit(signed_square([0.1, -0.1])) = [1, -1]/√2
    raw = np.array([(math.sin(5) + 1) / 2, (1 - math.sin(5)) / 2]) + direction  # negated because the loss fell
    raw = raw - min(raw.min(), 0)
    np.testing.assert_allclose(w, raw / np.abs(raw).sum())
    # loss rose: no negation
    w_up = adaptive_loss_weights("physics_aware", loss_history=[1, 0.9, 0.8, 0.7, 0.75], weight_history=weights)
    raw = np.array([(math.sin(5) + 1) / 2, (1 - math.sin(5)) / 2]) - direction
    raw = raw - min(raw.min(), 0)
    np.testing.assert_allclose(w_up, raw / np.abs(raw).sum())


def test_adaptive_loss_value_update_and_checkpoint_round_trip():
    loss = AdaptiveRegressionLoss("combined")
    prediction, target = torch.randn(16, 6), torch.randn(16, 6)
    w_mse, w_mae = loss.update(r2=0.6, loss=0.8)
    expected = w_mse * nn.functional.mse_loss(prediction, target) + w_mae * nn.functional.l1_loss(prediction, target)
    torch.testing.assert_close(loss(prediction, target), expected)
    loss.update(r2=0.7, loss=0.5)
    restored = AdaptiveRegressionLoss("combined")
    restored.load_state_dict(loss.state_dict())
    assert restored.loss_history.tolist() == pytest.approx([0.8, 0.5]) and torch.equal(restored.weights, loss.weights)
    assert isinstance(build_loss("adaptive_physics_aware", "regression"), AdaptiveRegressionLoss)
    with pytest.raises(PlasticityConfigError, match="strategy"):
        AdaptiveRegressionLoss("r3_based")


def test_adaptive_loss_weights_follow_validation_in_a_fit(tmp_path):
    model = MLP(hidden_sizes=[16], task="regression", loss="adaptive_r2_based", metrics=["mse", "r2"])
    trainer = make_trainer(
        tmp_path,
        max_epochs=3,
        callbacks=[AdaptiveLossWeights()],
        logger=pl.loggers.CSVLogger(tmp_path),
        num_sanity_val_steps=0,
    )
    trainer.fit(model, ParticleDataModule(n_particles=200, batch_size=32))
    r2 = float(trainer.callback_metrics["val/r2"])
    expected = (min(0.9, 0.2 + 0.7 * r2), max(0.1, 0.8 - 0.7 * r2))
    assert model.criterion.weights.tolist() == pytest.approx(expected)
    assert len(model.criterion.loss_history) == 3  # one update per epoch, none for the sanity check
    assert float(trainer.callback_metrics["adaptive_loss/mse_weight"]) == pytest.approx(expected[0])
    twice = MLP(hidden_sizes=[8], task="regression", loss="adaptive_physics_aware")
    make_trainer(
        tmp_path,
        max_epochs=2,
        val_check_interval=0.5,
        callbacks=[AdaptiveLossWeights()],
    ).fit(twice, ParticleDataModule(n_particles=200, batch_size=16))
    assert len(twice.criterion.loss_history) == 2  # two validations per epoch, one update per epoch
    with pytest.raises(PlasticityConfigError, match="AdaptiveRegressionLoss"):
        make_trainer(tmp_path, max_epochs=1, callbacks=[AdaptiveLossWeights()]).fit(
            MLP(hidden_sizes=[4], task="regression"), ParticleDataModule(n_particles=100)
        )


# ---------------------------------------------------------------------------------------------- bits
def _seed_bits(value: float) -> str:
    return "".join(f"{byte:08b}" for byte in struct.pack("!f", value))


def _seed_truncate(value: float, max_digits: int) -> float:
    """neural-network-lab-python's BinaryWeightConstraintMax on one weight (string version)."""
    bits = _seed_bits(value)
    first, last = bits.find("1"), bits.rfind("1")
    digits = len(bits[first:last]) if first != -1 else 0
    if digits > max_digits:
        k = digits - max_digits
        bits = bits[:-k] + "0" * k
    return struct.unpack("!f", int(bits, 2).to_bytes(4, "big"))[0]


HAND_VALUES = [0.3, -0.3, 1.0, -1.0, 0.1234567, -7.5e-5, 3.0e4, 1.0e-39, -2.5, 0.0]


@pytest.mark.parametrize("max_digits", [0, 3, 5, 10, 16, 24, 31])
def test_ieee_bits_truncation_equals_the_seed_definition(max_digits):
    values = torch.tensor(HAND_VALUES + torch.randn(200, generator=torch.Generator().manual_seed(0)).tolist())
    ours = truncate_ieee_bits(values, max_digits).tolist()
    theirs = [_seed_truncate(v, max_digits) for v in values.tolist()]
    assert ours == theirs
    expected_digits = [
        len(_seed_bits(v)[_seed_bits(v).find("1") : _seed_bits(v).rfind("1")]) if v else 0 for v in values.tolist()
    ]
    assert significant_bits(values).tolist() == expected_digits


@pytest.mark.parametrize("bits", [0, 1, 4, 10, 23])
def test_mantissa_rounding_error_bound_and_sign_exponent_kept(bits):
    values = torch.randn(5000, generator=torch.Generator().manual_seed(bits)) * torch.logspace(-6, 6, 5000)
    rounded = round_mantissa(values, bits)
    error = (rounded.double() - values.double()).abs()
    assert (error <= values.double().abs() * 2.0 ** -(bits + 1)).all()
    assert (torch.sign(rounded) == torch.sign(values)).all()
    # at most `bits` mantissa bits survive
    mantissa = rounded.view(torch.int32) & ((1 << 23) - 1)
    assert (mantissa & ((1 << (23 - bits)) - 1) == 0).all()
    # round half to even: 1 + 2^-(bits+1) lies exactly between two representable values and goes to the even one
    if bits < 23:  # (with 0 bits the "even" neighbour of 1.5 is 2.0: 1.0's exponent field is odd)
        tie = torch.tensor([1 + 2.0 ** -(bits + 1)])
        assert round_mantissa(tie, bits).item() == (1.0 if bits > 0 else 2.0)
    special = torch.tensor([math.inf, -math.inf, math.nan])
    assert (
        round_mantissa(special, bits)[:2].tolist() == [math.inf, -math.inf] and round_mantissa(special, bits)[2].isnan()
    )


def _seed_adaptive_damp(value: float, mean: float) -> float:
    """The seed's AdaptiveOscillationDampener on one weight (string digits, integer bit clearing)."""
    bits = _seed_bits(value)
    first, last = bits.find("1"), bits.rfind("1")
    digits = len(bits[first:last]) if first != -1 else 0
    relative = abs(value - mean) / max(abs(mean), 1e-8)
    word = int(bits, 2)
    for _ in range(max(1, int(1 + (1 - math.exp(-2 * relative)) * (digits - 1)))):
        word &= word - 1 if word else 0
    return struct.unpack("!f", word.to_bytes(4, "big"))[0]


@pytest.mark.parametrize("mean", [0.1, -0.02, 0.0, 3.0])
def test_adaptive_damping_equals_the_seed_definition(mean):
    values = torch.tensor(HAND_VALUES + (torch.randn(100, generator=torch.Generator().manual_seed(2)) * 0.3).tolist())
    ours = clear_lowest_set_bits(values, adaptive_damping_bits(values, mean)).tolist()
    assert ours == [_seed_adaptive_damp(v, mean) for v in values.tolist()]


def test_clear_lowest_set_bits_and_extrema():
    values = torch.tensor([1.75, -3.0, 0.0])  # 1.75 = 1.11b; -3.0 = -1.1b × 2
    assert clear_lowest_set_bits(values, 1).tolist() == [1.5, -2.0, 0.0]
    assert clear_lowest_set_bits(values, torch.tensor([2, 0, 5])).tolist() == [1.0, -3.0, 0.0]
    a, b = torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    c = torch.tensor([0.0, 2.0, 1.0, 0.0])
    assert strict_extrema(a, b, c).tolist() == [True, False, True, False]


def test_james_stein_formula():
    w = torch.randn(10, 20, generator=torch.Generator().manual_seed(1)) * 3
    expected = min(max((200 - 2) / float((w.double() ** 2).sum()), 0.0), 0.99)
    assert james_stein_factor(w).item() == pytest.approx(expected)
    assert james_stein_factor(w, variance=0.5).item() == pytest.approx(min(expected * 0.5, 0.99))
    assert james_stein_factor(torch.full((2,), 5.0)).item() == 0.0  # p - 2 = 0
    assert james_stein_factor(torch.zeros(50)).item() == 0.99  # clipped


# ---------------------------------------------------------------------------------------------- callbacks
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)


def test_dampener_fires_on_an_oscillating_tensor_and_not_on_a_monotone_one():
    for mode in ("lowest_bit", "adaptive", "shrink"):
        model = _Tiny()
        dampener = OscillationDampener(mode=mode, parameters=["linear.bias", "linear.weight"])
        oscillating = [torch.full((4,), v) for v in (0.2, 0.9, 0.1, 0.8)]
        monotone = [torch.full((4, 3), v) for v in (0.1, 0.3, 0.5, 0.7)]
        fired = []
        for bias, weight in zip(oscillating, monotone, strict=True):
            with torch.no_grad():
                model.linear.bias.copy_(bias)
                model.linear.weight.copy_(weight)
            dampener.apply(None, model)
            fired.append(dampener._fired)
            assert torch.equal(model.linear.weight, weight)  # monotone: never damped
        # fires from the third application on, on the 4 bias elements only
        assert fired == [0, 0, 4, 4]
        assert not torch.equal(model.linear.bias, oscillating[-1])
        if mode == "shrink":  # halfway to the local mean; the history keeps the damped third value
            third = 0.1 - 0.5 * (0.1 - (0.2 + 0.9 + 0.1) / 3)
            fourth = 0.8 - 0.5 * (0.8 - (0.9 + third + 0.8) / 3)
            torch.testing.assert_close(model.linear.bias, torch.full((4,), fourth))
        if mode == "lowest_bit":
            assert torch.equal(model.linear.bias, clear_lowest_set_bits(oscillating[-1], 1))


def test_the_seed_order_never_fires_ours_does():
    # the seed records the current weights before checking them: (previous, current, current) is never an extremum
    a, b = torch.tensor([0.2]), torch.tensor([0.9])
    assert not strict_extrema(a, b, b).any()
    assert strict_extrema(a, b, torch.tensor([0.1])).any()


def test_weight_precision_change_limit_uses_each_parameters_previous_value():
    model = _Tiny()
    constraint = WeightPrecision(bits=None, mode="mantissa", max_additional_bits=2, parameters=["linear.weight"])
    with torch.no_grad():
        model.linear.weight.fill_(1.5)  # 1 mantissa bit
    constraint.apply(None, model)  # first application only records
    assert (model.linear.weight == 1.5).all()
    with torch.no_grad():
        model.linear.weight.fill_(1.0 + 2**-10 + 2**-2)
    constraint.apply(None, model)  # at most 1 + 2 mantissa bits now: 1.25 + 2^-10 rounds to 1.25
    assert (model.linear.weight == 1.25).all()


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: WeightPrecision(bits=24, mode="mantissa"), "bits"),
        (lambda: WeightPrecision(bits=None, max_additional_bits=None), "bits=None"),
        (lambda: WeightPrecision(mode="decimal"), "mode"),
        (lambda: OscillationDampener(strength=1.5), "strength"),
        (lambda: JamesSteinShrinkage(max_shrinkage=1.0), "max_shrinkage"),
        (lambda: JamesSteinShrinkage(every_n_epochs=None, every_n_steps=None), "every_n_epochs"),
        (lambda: WeightPrecision(parameters="linear.weight"), "parameters"),
    ],
)
def test_constraints_reject_bad_settings(factory, field):
    with pytest.raises(PlasticityConfigError, match=field):
        factory()


def test_constraints_name_unknown_parameters_and_wrong_dtypes():
    with pytest.raises(PlasticityConfigError, match=r"'nope\.\*' matches no parameter"):
        WeightPrecision(parameters=["nope.*"]).select(_Tiny())
    with pytest.raises(
        PlasticityConfigError, match=r"linear.weight \(torch.float64\), linear.bias \(torch.float64\) are not float32"
    ):
        WeightPrecision().select(_Tiny().double())
    assert JamesSteinShrinkage().select(_Tiny().double()) == ["linear.weight"]  # dtype-agnostic, weights only


def _fit(tmp_path, callbacks, epochs=4, ckpt_path=None, seed=0, accumulate=1, loss="mse"):
    pl.seed_everything(seed, verbose=False)
    model = MLP(input_dim=23, num_outputs=6, hidden_sizes=[16, 16], task="regression", loss=loss)
    trainer = make_trainer(
        tmp_path,
        max_epochs=epochs,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        accumulate_grad_batches=accumulate,
        enable_checkpointing=True,
    )
    # unshuffled loaders: Lightning does not checkpoint the global RNG that a shuffling sampler draws from
    dm = ParticleDataModule(n_particles=200, seed=1)
    dm.setup("fit")
    train, val = (TensorDataset(dm.splits[s].inputs, dm.splits[s].targets) for s in ("train", "val"))
    trainer.fit(model, DataLoader(train, batch_size=32), DataLoader(val, batch_size=64), ckpt_path=ckpt_path)
    return model, trainer


def _make_constraints():
    return [
        OscillationDampener(mode="shrink", every_n_steps=2, every_n_epochs=None),
        JamesSteinShrinkage(variance=1e-3, every_n_epochs=2),
        WeightPrecision(bits=6, mode="mantissa", max_additional_bits=3, every_n_epochs=1),  # last: its limit holds
    ]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_constraints_in_a_fit_hold_and_resume_exactly(tmp_path, accumulate):
    model, trainer = _fit(tmp_path / "full", _make_constraints(), epochs=4, accumulate=accumulate)
    dampener, shrinkage, precision = trainer.callbacks[:3]
    assert precision.applications == 4
    # after the last application (end of epoch 4) every weight has at most 6 mantissa bits
    for name in precision._selected:
        mantissa = dict(model.named_parameters())[name].detach().view(torch.int32) & ((1 << 23) - 1)
        assert (mantissa & ((1 << 17) - 1) == 0).all(), name
    # 128 rows / 32 = 4 batches per epoch, 4 / accumulate optimizer steps
    assert dampener.applications == (16 // accumulate) // 2 and shrinkage.applications == 2
    assert 0 < shrinkage.extra_log()["mean_shrinkage"] < 0.99

    _fit(tmp_path / "half", _make_constraints(), epochs=2, accumulate=accumulate)
    checkpoint = next((tmp_path / "half").rglob("*.ckpt"))  # ModelCheckpoint's, saved when validation ends
    resumed, resumed_trainer = _fit(
        tmp_path / "resumed", _make_constraints(), epochs=4, ckpt_path=checkpoint, accumulate=accumulate
    )
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_trainer.callbacks[0].history.keys() == trainer.callbacks[0].history.keys()
    assert [c.applications for c in resumed_trainer.callbacks[:3]] == [c.applications for c in trainer.callbacks[:3]]


class _Oscillator(pl.LightningModule):
    """One bias on a quadratic bowl with too large a step: SGD flips its sign every step (p ← −0.9 p)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.ones(3))

    def training_step(self, batch, batch_idx):
        return (self.bias**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.95)


@pytest.mark.parametrize("damped", [False, True])
def test_dampener_fires_on_a_parameter_that_oscillates_in_training(tmp_path, damped):
    callbacks = (
        [OscillationDampener(mode="shrink", strength=0.5, every_n_steps=1, every_n_epochs=None)] if damped else []
    )
    model = _Oscillator()
    trainer = make_trainer(
        tmp_path,
        max_steps=12,
        callbacks=callbacks,
    )
    trainer.fit(model, DataLoader(TensorDataset(torch.zeros(12, 1)), batch_size=1))
    if damped:
        assert float(trainer.callback_metrics["oscillation_dampener/fired_fraction"]) == 1.0
        assert model.bias.abs().max() < 0.5 * 0.9**12  # damping removes the oscillation much faster
    else:
        torch.testing.assert_close(model.bias.detach(), torch.full((3,), 0.9**12))  # (−0.9)^12


def test_adaptive_loss_resumes_exactly(tmp_path):
    loss = "adaptive_physics_aware"  # its weights depend on the whole per-epoch history
    model, _ = _fit(tmp_path / "full", [AdaptiveLossWeights()], epochs=7, loss=loss)
    _fit(tmp_path / "half", [AdaptiveLossWeights()], epochs=3, loss=loss)
    checkpoint = next((tmp_path / "half").rglob("*.ckpt"))
    resumed, _ = _fit(tmp_path / "resumed", [AdaptiveLossWeights()], epochs=7, ckpt_path=checkpoint, loss=loss)
    assert len(resumed.criterion.loss_history) == 7
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_constraint_still_applies_in_an_epoch_cut_short_by_max_steps(tmp_path):
    # 4 batches per epoch, max_steps 6: the second epoch stops after 2 batches, before its last one
    precision = WeightPrecision(bits=4, mode="mantissa", every_n_epochs=1)
    _fit(tmp_path, [precision], epochs=5)
    assert precision.applications == 5  # once per epoch: the epoch-end path does not apply a second time
    precision_short = WeightPrecision(bits=4, mode="mantissa", every_n_epochs=1)
    pl.seed_everything(0, verbose=False)
    model = MLP(input_dim=23, num_outputs=6, hidden_sizes=[8], task="regression")
    dm = ParticleDataModule(n_particles=200, seed=1)
    dm.setup("fit")
    train = TensorDataset(dm.splits["train"].inputs, dm.splits["train"].targets)
    short = make_trainer(
        tmp_path,
        max_steps=6,
        callbacks=[precision_short],
    )
    short.fit(model, DataLoader(train, batch_size=32))
    assert precision_short.applications == 2  # epoch 1 at its last batch, epoch 2 at its (early) end
    mantissa = model.hidden[0].linear.weight.detach().view(torch.int32) & ((1 << 23) - 1)
    assert (mantissa & ((1 << 19) - 1) == 0).all()  # the final weights are constrained


def test_adaptive_loss_restarts_its_epoch_count_in_a_new_fit(tmp_path):
    model = MLP(hidden_sizes=[8], task="regression", loss="adaptive_r2_based")

    def fit():
        trainer = make_trainer(
            tmp_path,
            max_epochs=2,
            callbacks=[AdaptiveLossWeights()],
        )
        trainer.fit(model, ParticleDataModule(n_particles=200, batch_size=32))

    fit()
    fit()  # fine-tuning the same model: its epochs count from 0 again, and each still updates the weights
    assert len(model.criterion.loss_history) == 4
