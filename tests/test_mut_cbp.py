"""CBP decisions that mutation testing found unchecked (issue 26): each test pins one of them exactly.

Unit-level and fast: ``policies/cbp.py``'s own tests for ``benchmarks/mutation.sh`` beside test_cbp_units.py and
test_policies.py.
"""

import pytest
import torch
from torch import nn

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
    assert policies.ContinualBackprop(window=2).settings()["window"] == 2
    assert "window" not in policies.ContinualBackprop(window=1).settings()
    # the callback's checkpoint key is built from them: a renamed setting would orphan every saved checkpoint
    assert callbacks.ContinualBackprop().state_key == (
        "ContinualBackprop{'prefix': 'cbp', 'seed': 0, 'layers': None, 'pairs': None, 'replacement_rate': 0.0001, "
        "'maturity_threshold': 100, 'decay_rate': 0.99, 'utility': 'contribution', 'accumulate': True, "
        "'count': 'eligible', 'init': 'auto', 'magnitudes_every_n_steps': 1}"
    )


@pytest.mark.parametrize(
    ("utility", "expected"),
    [
        ("contribution", [2.0, 4.0, 6.0]),  # mean|h| · given out
        ("adaptable_contribution", [0.5, 0.0, 0.75]),  # mean|h − f̂| · given out / mean|w_in| of the weights
    ],
)
def test_a_given_outgoing_magnitude_without_incoming_is_used_and_only_the_incoming_one_is_read_off(utility, expected):
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[2.0, -2.0], [4.0, 4.0], [-8.0, 8.0]]))  # mean |w_in|: 2, 4, 8
        net[2].weight.fill_(10.0)  # the current |w_out| (10 each), which the given magnitudes replace
    cbp = policies.ContinualBackprop(net, None, utility=utility, decay_rate=0.0, maturity_threshold=1000)
    h = torch.tensor([[1.0, 2.0, 4.0], [3.0, 2.0, 0.0]])
    cbp.step_pair(cbp.pairs[0], [h], magnitudes=(torch.tensor([[1.0], [2.0], [3.0]]), None))
    assert cbp.states["0"].utility.tolist() == pytest.approx(expected)
