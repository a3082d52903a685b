"""CBP decisions that mutation testing found unchecked (issue 26): each test pins one of them exactly.

Unit-level and fast: ``policies/cbp.py``'s own tests for ``benchmarks/mutation.sh`` beside test_cbp_units.py and
test_policies.py.
"""

from plasticity_lightning import callbacks, policies


def test_settings_name_every_argument_that_distinguishes_instances_and_the_checkpoint_key_keeps_them():
    cbp = policies.ContinualBackprop(
        replacement_rate=0.5,
        maturity_threshold=3,
        decay_rate=0.9,
        utility="zero_contribution",
        accumulate=False,
        count="width",
        init="kaiming",
        magnitudes_every_n_steps=2,
    )
    assert cbp.settings() == {
        "replacement_rate": 0.5,
        "maturity_threshold": 3,
        "decay_rate": 0.9,
        "utility": "zero_contribution",
        "accumulate": False,
        "count": "width",
        "init": "kaiming_uniform",
        "magnitudes_every_n_steps": 2,
    }
    # the window is named only when set: checkpoints from before it existed keep their key
    assert policies.ContinualBackprop(window=4).settings()["window"] == 4
    assert "window" not in policies.ContinualBackprop(window=1).settings()
    # the callback's checkpoint key is built from them: a renamed setting would orphan every saved checkpoint
    assert callbacks.ContinualBackprop().state_key == (
        "ContinualBackprop{'prefix': 'cbp', 'seed': 0, 'layers': None, 'pairs': None, 'replacement_rate': 0.0001, "
        "'maturity_threshold': 100, 'decay_rate': 0.99, 'utility': 'contribution', 'accumulate': True, "
        "'count': 'eligible', 'init': 'auto', 'magnitudes_every_n_steps': 1}"
    )
