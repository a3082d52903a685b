"""The algorithms as plain objects, for any PyTorch training loop: no trainer, any ``nn.Module`` and optimizer.

Each policy holds its own state (:meth:`state_dict` / :meth:`load_state_dict`) and its own ``torch.Generator``,
reports once which layers it bound to (also a property), and says which init new units get and why (warning once
when it had to guess). In a hand-written loop, construct it with the model and optimizer, then call ``step()``
after ``optimizer.step()``::

    cbp = ContinualBackprop(model, optimizer, replacement_rate=1e-4, maturity_threshold=100)
    for x, y in stream:
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        cbp.step()

* unit replacement: :class:`ContinualBackprop` (and RR-CBP with ``init="sigma_orthogonal"``), :class:`ReDo`;
* whole parameters: :class:`ShrinkAndPerturb`, :class:`L2Init` (call it before ``optimizer.step()``),
  :class:`HeadReset`, :class:`LayerReset`, :class:`PlasticityInjection`, :class:`ParsevalRegularization` (call it
  before ``optimizer.step()``; :func:`parseval_penalty` to put it in a loss);
* weight constraints: :class:`WeightPrecision`, :class:`OscillationDampener`, :class:`JamesSteinShrinkage`,
  :class:`NormalizeAndProject` (:class:`ParameterConstraint` their base), :class:`SurgeCollapse` (weight collapse
  and noise surge);
* measuring: :func:`measure` — model + probe batch → every monitor's measures in one dict;
* when: :class:`StepCadence`, the step rule the Lightning callbacks share (never at step 0, once per step).

The Lightning callbacks of the same names (:mod:`plasticity_lightning.callbacks`) are adapters over these objects:
they add hooks and cadence, DDP averaging, checkpoint state and logging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plasticity_lightning.core.lazy import lazy_exports

if TYPE_CHECKING:
    from plasticity_lightning.policies.base import Policy, ScheduledPolicy, UnitPolicy, all_reduce_mean
    from plasticity_lightning.policies.cadence import StepCadence
    from plasticity_lightning.policies.cbp import ContinualBackprop
    from plasticity_lightning.policies.constraints import (
        JamesSteinShrinkage,
        NormalizeAndProject,
        OscillationDampener,
        ParameterConstraint,
        WeightPrecision,
    )
    from plasticity_lightning.policies.injection import PlasticityInjection
    from plasticity_lightning.policies.measurement import measure
    from plasticity_lightning.policies.parseval import ParsevalRegularization, parseval_penalty
    from plasticity_lightning.policies.redo import ReDo
    from plasticity_lightning.policies.resets import (
        HeadReset,
        L2Init,
        LayerReset,
        ShrinkAndPerturb,
        fresh_copy,
        fresh_layer,
    )
    from plasticity_lightning.policies.surge import SurgeCollapse

_EXPORTS = {
    "ContinualBackprop": "plasticity_lightning.policies.cbp",
    "HeadReset": "plasticity_lightning.policies.resets",
    "JamesSteinShrinkage": "plasticity_lightning.policies.constraints",
    "L2Init": "plasticity_lightning.policies.resets",
    "LayerReset": "plasticity_lightning.policies.resets",
    "NormalizeAndProject": "plasticity_lightning.policies.constraints",
    "OscillationDampener": "plasticity_lightning.policies.constraints",
    "ParameterConstraint": "plasticity_lightning.policies.constraints",
    "PlasticityInjection": "plasticity_lightning.policies.injection",
    "ParsevalRegularization": "plasticity_lightning.policies.parseval",
    "Policy": "plasticity_lightning.policies.base",
    "ReDo": "plasticity_lightning.policies.redo",
    "ScheduledPolicy": "plasticity_lightning.policies.base",
    "ShrinkAndPerturb": "plasticity_lightning.policies.resets",
    "StepCadence": "plasticity_lightning.policies.cadence",
    "SurgeCollapse": "plasticity_lightning.policies.surge",
    "UnitPolicy": "plasticity_lightning.policies.base",
    "WeightPrecision": "plasticity_lightning.policies.constraints",
    "all_reduce_mean": "plasticity_lightning.policies.base",
    "fresh_copy": "plasticity_lightning.policies.resets",
    "fresh_layer": "plasticity_lightning.policies.resets",
    "measure": "plasticity_lightning.policies.measurement",
    "parseval_penalty": "plasticity_lightning.policies.parseval",
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = [
    "ContinualBackprop",
    "HeadReset",
    "JamesSteinShrinkage",
    "L2Init",
    "LayerReset",
    "NormalizeAndProject",
    "OscillationDampener",
    "ParameterConstraint",
    "ParsevalRegularization",
    "PlasticityInjection",
    "Policy",
    "ReDo",
    "ScheduledPolicy",
    "ShrinkAndPerturb",
    "StepCadence",
    "SurgeCollapse",
    "UnitPolicy",
    "WeightPrecision",
    "all_reduce_mean",
    "fresh_copy",
    "fresh_layer",
    "measure",
    "parseval_penalty",
]
