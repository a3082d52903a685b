"""Reading a model: named layers' outputs on a fixed probe batch, off the training path.

* :func:`capture_outputs` runs inputs through a model in eval mode under ``no_grad`` with forward hooks on
  the named layers and restores every module's train/eval flag afterwards;
* :class:`ProbeSet` draws a fixed probe batch once from a dataloader's *dataset* (in dataset order, without
  touching the global RNG, identical on every DDP rank) and moves it through the trainer's batch-transfer
  hooks, so a continual datamodule hands over the rows as the current task sees them;
* :func:`resolve_layers` turns layer names (or ``None``: the model's ``hidden_layers()``, else what a discovery
  function finds, else every activation module) into modules, with a clear error when it cannot; a name ending in
  ``:input`` reads what that module receives;
* :func:`unit_axes` / :func:`units_first` say which axis of each output holds units (from the layer type: the
  last axis of ``[batch, time, hidden]`` sequences, the channel axis of convolutions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plasticity_lightning.core.lazy import lazy_exports

if TYPE_CHECKING:
    from plasticity_lightning.probes.capture import (
        INPUT_SUFFIX,
        capture_outputs,
        default_forward,
        is_transposed_linear,
        resolve_layers,
        unit_axes,
        units_first,
    )
    from plasticity_lightning.probes.probe_set import ProbeSet

_EXPORTS = {
    "INPUT_SUFFIX": "plasticity_lightning.probes.capture",
    "ProbeSet": "plasticity_lightning.probes.probe_set",
    "capture_outputs": "plasticity_lightning.probes.capture",
    "default_forward": "plasticity_lightning.probes.capture",
    "is_transposed_linear": "plasticity_lightning.probes.capture",
    "resolve_layers": "plasticity_lightning.probes.capture",
    "unit_axes": "plasticity_lightning.probes.capture",
    "units_first": "plasticity_lightning.probes.capture",
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = [
    "INPUT_SUFFIX",
    "ProbeSet",
    "capture_outputs",
    "default_forward",
    "is_transposed_linear",
    "resolve_layers",
    "unit_axes",
    "units_first",
]
