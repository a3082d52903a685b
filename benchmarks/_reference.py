"""Dohare et al.'s reference code (https://github.com/shibhansh/loss-of-plasticity) for side-by-side benchmarks.

The reference is not part of this project and is never imported by the library: pass the root of a checkout
(e.g. ``git clone`` it next to this repository) to the benchmarks' ``--reference`` option. Used from it:

* ``lop/algos/gnt.py`` (``GnT``, MLPs) and ``lop/algos/convGnT.py`` (``ConvGnT``, the Continual-ImageNet
  ConvNet), driven from a Lightning loop by :class:`ReferenceGnT` as their training scripts drive them: after
  ``opt.step()``, ``gen_and_test`` on the features of that step's forward pass (hidden activations; for conv
  layers the pooled maps, flattened before a linear layer, as their ``ConvNet.predict`` returns them);
* ``lop/utils/miscellaneous.py``: their rank measures (``compute_matrix_rank_summaries``).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from plasticity_lightning import ConvNet


def _use_checkout(root: str | Path, needed: str) -> None:
    """Put a loss-of-plasticity checkout on the import path (a clear exit when ``root`` is not one)."""
    path = Path(root).expanduser().resolve()
    if not (path / needed).is_file():
        raise SystemExit(
            f"--reference={str(path)!r} holds no {needed}; expected the root of a checkout of "
            "https://github.com/shibhansh/loss-of-plasticity"
        )
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def load_reference_rank_measures(root: str | Path) -> Any:
    """The reference's ``lop.utils.miscellaneous`` module (``compute_matrix_rank_summaries`` and friends)."""
    _use_checkout(root, "lop/utils/miscellaneous.py")
    from lop.utils import miscellaneous

    return miscellaneous


def load_reference_gnt(root: str | Path) -> dict[str, type]:
    """``{"mlp": GnT, "convnet": ConvGnT}`` from a loss-of-plasticity checkout at ``root``."""
    _use_checkout(root, "lop/algos/gnt.py")
    _use_checkout(root, "lop/algos/convGnT.py")
    from lop.algos.convGnT import ConvGnT
    from lop.algos.gnt import GnT

    return {"mlp": GnT, "convnet": ConvGnT}


def reference_layers(model: pl.LightningModule) -> tuple[list[nn.Module], list[nn.Module]]:
    """The library's MLP or ConvNet in the reference's layout, ``[layer, act, layer, act, ..., head]``, and the
    modules whose outputs are the reference's features (one per hidden layer)."""
    if isinstance(model, ConvNet):
        convs = [model.features.get_submodule(f"{kind}{i}") for i in range(1, 4) for kind in ("conv", "act")]
        fcs = [model.classifier.get_submodule(f"{kind}{i}") for i in range(1, 3) for kind in ("fc", "act")]
        taps = [model.features.pool1, model.features.pool2, model.classifier.flatten, *fcs[1::2]]
        return [*convs, *fcs, model.head], taps
    hidden = getattr(model, "hidden", None)
    if hidden is None or any(block.dropout is not None or block.skip for block in hidden):
        raise SystemExit("the reference GnT runs on plain MLPs (Linear/activation pairs, no dropout or skips)")
    layers: list[nn.Module] = []
    for block in hidden:
        layers += [block.linear, block.act]
    if not all(isinstance(act, nn.ReLU) for act in layers[1::2]):  # the reference's init bounds assume it
        raise SystemExit("ReferenceGnT is set up for ReLU networks (hidden_activation='relu')")
    return [*layers, model.head], layers[1::2]


class ReferenceGnT(pl.Callback):
    """Runs the reference ``GnT`` / ``ConvGnT`` on a model's hidden layers after every optimizer step.

    Args:
        gnt_class: the reference class for the model (:func:`load_reference_gnt`).
        shadow: run on a copy of the network that receives the model's post-step weights before every call, so
            that the reference decides on exactly what the library's callback sees but never changes the model.
        **gnt_kwargs: ``GnT``'s arguments (replacement_rate, maturity_threshold, decay_rate, util_type,
            accumulate). For ``ConvGnT``, which always accumulates, ``accumulate`` is dropped and
            ``num_last_filter_outputs`` is read from the model.
    """

    def __init__(self, gnt_class: type, shadow: bool = False, **gnt_kwargs: Any) -> None:
        self.gnt_class = gnt_class
        self.shadow = shadow
        self.gnt_kwargs = gnt_kwargs
        self.gnt: Any = None
        self.replaced = 0
        self.chosen: list[torch.Tensor] = []  # units the reference replaced on the last step, per hidden layer
        self._features: list[torch.Tensor | None] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._last_step: int | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type != "cpu":
            # GnT and ConvGnT keep their statistics and some index tensors on the CPU whatever ``device`` says
            raise SystemExit("the reference GnT/ConvGnT runs on the CPU only; drop --reference or --accelerator gpu")
        self.model_layers, self.taps = reference_layers(pl_module)
        net = [copy.deepcopy(m) for m in self.model_layers] if self.shadow else self.model_layers
        kwargs = dict(self.gnt_kwargs)
        if isinstance(pl_module, ConvNet):
            kwargs.pop("accumulate", None)  # ConvGnT always accumulates
            # flattened columns per channel of the last conv layer
            kwargs["num_last_filter_outputs"] = self.model_layers[6].in_features // self.model_layers[4].out_channels
        self.gnt = self.gnt_class(net=net, hidden_activation="relu", opt=trainer.optimizers[0], device="cpu", **kwargs)
        self._features = [None] * self.gnt.num_hidden_layers
        self._register_hooks()

    def _register_hooks(self) -> None:
        def recorder(i: int):
            def record(module: nn.Module, _args: Any, output: torch.Tensor) -> None:
                if module.training and torch.is_grad_enabled():  # training forward passes only
                    self._features[i] = output.detach()

            return record

        self._handles = [tap.register_forward_hook(recorder(i)) for i, tap in enumerate(self.taps)]

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def make_mature(self) -> None:
        """Every unit past the maturity threshold (the steady state)."""
        for ages in self.gnt.ages:
            ages.fill_(self.gnt.maturity_threshold + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:
            return  # no optimizer step since the last call (gradient accumulation)
        self._last_step = trainer.global_step
        if self.shadow:
            with torch.no_grad():
                for source, twin in zip(self.model_layers, self.gnt.net, strict=True):
                    for p, q in zip(source.parameters(), twin.parameters(), strict=True):
                        q.copy_(p)
        # gen_and_test, in its three steps, to keep the chosen units
        chosen = self.gnt.test_features(features=list(self._features))
        self.gnt.gen_new_features(*chosen)
        self.gnt.update_optim_params(*chosen)
        self.chosen = [units.clone() for units in chosen[0]]  # ConvGnT: (input indices, output indices, counts)
        self.replaced += sum(chosen[-1])

    def on_fit_end(self, trainer, pl_module) -> None:
        self._remove_hooks()
