"""Reading a model: named layers' outputs on a fixed probe batch, off the training path.

* :func:`capture_outputs` runs inputs through a model in eval mode under ``no_grad`` with forward hooks on
  the named layers and restores every module's train/eval flag afterwards;
* :class:`ProbeSet` draws a fixed probe batch once from a dataloader's *dataset* (in dataset order, without
  touching the global RNG, identical on every DDP rank) and moves it through the trainer's batch-transfer
  hooks, so a continual datamodule hands over the rows as the current task sees them;
* :func:`resolve_layers` turns layer names (or ``None``: the model's ``hidden_layers()``, else every
  activation module) into modules, with a clear error when it cannot.
"""

from plasticity_lightning.probes.capture import capture_outputs, default_forward, resolve_layers
from plasticity_lightning.probes.probe_set import ProbeSet

__all__ = ["ProbeSet", "capture_outputs", "default_forward", "resolve_layers"]
