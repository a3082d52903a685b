"""Dohare et al.'s slowly-changing regression ("bit-flipping") problem, built from the paper's definition.

Dohare, Hernandez-Garcia, Lan, Rahman, Mahmood & Sutton, "Loss of plasticity in deep continual learning", Nature
632 (2024), Methods "Slowly-changing regression" (earlier: Mahmood & Sutton 2013, "Representation search through
generate and test"; code: https://github.com/shibhansh/loss-of-plasticity, ``lop/slowly_changing_regression``):

* the input is ``m = 20`` bits: the first ``f = 15`` change slowly — they stay fixed for ``flip_every = 10,000``
  steps, then one of them, chosen uniformly, flips — and the other ``m − f`` are drawn i.i.d. at every step;
* the target is a fixed network with one hidden layer of ``100`` linear threshold units (LTUs): weights and biases
  ±1 (uniform), and LTU ``i`` outputs 1 exactly when more than ``β·(m + 1)`` of its ``m + 1`` inputs (the bits and
  the constant bias input 1) agree with the signs of its weights (a 1 where the weight is +1, a 0 where it is −1),
  with ``β = 0.7``; equivalently its net input exceeds ``θ_i = β(m + 1) − S_i``, ``S_i`` the number of its negative
  weights, bias included; the output is the ±1-weighted sum of the LTUs plus a ±1 bias;
* the learner sees one example per step (online, batch 1) and learns it with the squared error; the error it
  makes *before* each update is the curve the paper plots (binned, e.g. per 10k or 100k steps).

Two deviations of the released code are available as options: ``flip="all"`` redraws all ``f`` slow bits every
``flip_every`` steps (the code's default; the paper's caption and ``flip_one`` configs flip one), and
``threshold="code"`` uses the code's count ``S_i = (m − Σ_j w_ij + b_i)/2`` (the bias added instead of counted as
a negative weight, which moves each threshold by ½ or 1).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_choice,
    check_fraction,
    check_positive_int,
)
from plasticity_lightning.data.base import IndexedTensorDataset, PlasticityDataModule


class SlowlyChangingRegression:
    """The problem: a fixed LTU target network and the slowly-changing input stream, drawn from ``seed``.

    Args:
        num_inputs: m, input bits.
        num_flipping: f, slowly-changing bits (the first f inputs).
        num_target_features: LTUs in the target network.
        beta: β, the share of agreeing inputs an LTU needs to fire.
        flip_every: steps between flips.
        flip: ``"one"`` (the paper: one slow bit, chosen uniformly, flips) or ``"all"`` (the code: every slow bit
            is redrawn).
        threshold: ``"paper"`` (S_i counts the negative weights, bias included) or ``"code"`` (the released code's
            ``(m − Σw + b)/2``).
        seed: seed of the target network and of the stream.

    Example::

        >>> problem = SlowlyChangingRegression(seed=0)
        >>> x, y = problem.stream(30_000)
        >>> x.shape, y.shape, sorted(x.unique().tolist())
        (torch.Size([30000, 20]), torch.Size([30000, 1]), [0.0, 1.0])
        >>> int((x[1:, :15] != x[:-1, :15]).any(dim=1).sum())  # one flip every 10,000 steps
        2
    """

    def __init__(
        self,
        num_inputs: int = 20,
        num_flipping: int = 15,
        num_target_features: int = 100,
        beta: float = 0.7,
        flip_every: int = 10_000,
        flip: Literal["one", "all"] = "one",
        threshold: Literal["paper", "code"] = "paper",
        seed: int = 0,
    ) -> None:
        owner = type(self).__name__
        self.num_inputs = check_positive_int(owner, "num_inputs", num_inputs)
        self.num_flipping = check_positive_int(owner, "num_flipping", num_flipping, allow_zero=True)
        if self.num_flipping > self.num_inputs:
            raise PlasticityConfigError(
                f"{owner}.num_flipping={num_flipping!r} is invalid; expected at most num_inputs={num_inputs}"
            )
        self.num_target_features = check_positive_int(owner, "num_target_features", num_target_features)
        self.beta = check_fraction(owner, "beta", beta, high_open=False)
        self.flip_every = check_positive_int(owner, "flip_every", flip_every)
        self.flip = check_choice(owner, "flip", flip, ("one", "all"))
        self.threshold = check_choice(owner, "threshold", threshold, ("paper", "code"))
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)

        def signs(*shape: int) -> torch.Tensor:
            return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1

        self.hidden_weight = signs(num_target_features, num_inputs)
        self.hidden_bias = signs(num_target_features)
        self.output_weight = signs(1, num_target_features)
        self.output_bias = signs(1)
        if threshold == "paper":
            negative = (self.hidden_weight < 0).sum(dim=1) + (self.hidden_bias < 0)
        else:
            negative = (num_inputs - self.hidden_weight.sum(dim=1) + self.hidden_bias) / 2
        self.thresholds = beta * (num_inputs + 1) - negative.float()
        self._stream_seed = int(torch.randint(2**62, (), generator=generator))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The target network's LTU outputs (0 or 1) for inputs ``x`` ``[N, m]``."""
        return (x @ self.hidden_weight.T + self.hidden_bias > self.thresholds).float()

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The target network's output ``[N, 1]`` for inputs ``x`` ``[N, m]``."""
        out = torch.empty(len(x), 1)
        for start in range(0, len(x), 65_536):  # in chunks: the features of a million rows need not exist at once
            part = x[start : start + 65_536]
            out[start : start + len(part)] = self.features(part) @ self.output_weight.T + self.output_bias
        return out

    def stream(self, steps: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``[steps, m]`` (float 0/1) and targets ``[steps, 1]`` of steps ``start … start + steps − 1``.

        The stream is a function of the seed alone: any window of it is the same whichever window is asked first.
        """
        check_positive_int(type(self).__name__, "steps", steps)
        check_positive_int(type(self).__name__, "start", start, allow_zero=True)
        generator = torch.Generator().manual_seed(self._stream_seed)
        last_period = (start + steps - 1) // self.flip_every
        slow = self._slow_bits(last_period + 1, generator)  # [periods, f]
        x = torch.empty(steps, self.num_inputs)
        positions = torch.arange(start, start + steps)
        x[:, : self.num_flipping] = slow[positions // self.flip_every]
        # the fast bits of step t come from a generator of their own block, so a window needs no earlier draws
        fast = self.num_inputs - self.num_flipping
        block = 65_536
        for first in range(start - start % block, start + steps, block):
            bits = torch.randint(
                0, 2, (block, fast), generator=torch.Generator().manual_seed(self._stream_seed + 1 + first)
            )
            lo, hi = max(first, start), min(first + block, start + steps)
            x[lo - start : hi - start, self.num_flipping :] = bits[lo - first : hi - first].float()
        return x, self.target(x)

    def _slow_bits(self, periods: int, generator: torch.Generator) -> torch.Tensor:
        """The slow bits of each ``flip_every``-step period, ``[periods, f]``."""
        f = self.num_flipping
        bits = torch.randint(0, 2, (periods, f), generator=generator).float()
        if self.flip == "one" and f:
            which = torch.randint(0, f, (periods,), generator=generator)
            for period in range(1, periods):  # each period is the last one with one bit flipped
                bits[period] = bits[period - 1]
                bits[period, which[period]] = 1 - bits[period, which[period]]
        return bits

    def sample(self, count: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` inputs with every bit drawn i.i.d. (the whole input space, not one period's), and targets."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + seed)
        x = torch.randint(0, 2, (count, self.num_inputs), generator=generator).float()
        return x, self.target(x)


class SlowlyChangingRegressionDataModule(PlasticityDataModule):
    """:class:`SlowlyChangingRegression` as a datamodule: the stream in order (an online learner, batch 1).

    The training split is the first ``steps`` steps of the stream, served **in order** (never shuffled: the slow
    bits are the point) by a ``StatefulDataLoader``, whose position Lightning checkpoints, so a fit resumed
    mid-stream continues where it stopped. Its training loss per step is the paper's online error. Validation and
    test: ``eval_size`` inputs with every bit drawn i.i.d., i.e. how well the learner knows the whole target
    function (the paper reports only the online error).

    Args:
        steps: length of the stream (the paper: 1,000,000).
        num_inputs: see :class:`SlowlyChangingRegression`.
        num_flipping: see :class:`SlowlyChangingRegression`.
        num_target_features: see :class:`SlowlyChangingRegression`.
        beta: see :class:`SlowlyChangingRegression`.
        flip_every: see :class:`SlowlyChangingRegression`.
        flip: see :class:`SlowlyChangingRegression`.
        threshold: see :class:`SlowlyChangingRegression`.
        eval_size: rows of the validation and test sets.
        batch_size: training batch size (the paper: 1).
        eval_batch_size: see :class:`~plasticity_lightning.data.PlasticityDataModule`.
        num_workers: see :class:`~plasticity_lightning.data.PlasticityDataModule`.
        pin_memory: see :class:`~plasticity_lightning.data.PlasticityDataModule`.
        seed: see :class:`~plasticity_lightning.data.PlasticityDataModule`
            (it also draws the target network and the stream).

    Example::

        >>> dm = SlowlyChangingRegressionDataModule(steps=1000, eval_size=100)
        >>> dm.setup("fit")
        >>> len(dm.splits["train"]), len(dm.splits["val"]), dm.input_shape, dm.num_targets
        (1000, 100, (20,), 1)
    """

    num_targets = 1

    def __init__(
        self,
        steps: int = 1_000_000,
        num_inputs: int = 20,
        num_flipping: int = 15,
        num_target_features: int = 100,
        beta: float = 0.7,
        flip_every: int = 10_000,
        flip: Literal["one", "all"] = "one",
        threshold: Literal["paper", "code"] = "paper",
        eval_size: int = 1000,
        batch_size: int = 1,
        eval_batch_size: int | None = 1000,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
        )
        owner = type(self).__name__
        self.steps = check_positive_int(owner, "steps", steps)
        self.eval_size = check_positive_int(owner, "eval_size", eval_size)
        self.problem = SlowlyChangingRegression(
            num_inputs=num_inputs,
            num_flipping=num_flipping,
            num_target_features=num_target_features,
            beta=beta,
            flip_every=flip_every,
            flip=flip,
            threshold=threshold,
            seed=seed,
        )
        self.input_shape = (num_inputs,)

    def load_splits(self) -> dict[str, IndexedTensorDataset]:
        x, y = self.problem.stream(self.steps)
        held_x, held_y = self.problem.sample(self.eval_size)
        held_out = IndexedTensorDataset(held_x, held_y)
        return {"train": IndexedTensorDataset(x, y), "val": held_out, "test": held_out}

    def train_dataloader(self) -> DataLoader:
        # in stream order; the stateful loader's position is checkpointed (Lightning's DDP sampler keeps the order)
        return StatefulDataLoader(
            self._split("train"),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
