"""Checkpoints as the ``plasticity`` command reads and writes them: fetched, checked, loaded safely, resumed exactly.

* :func:`fetch_checkpoint` copies a checkpoint given as a URL (``http(s)://``, or any fsspec URL such as ``s3://``,
  ``file://``, ``memory://``) to a local file, which Lightning then loads like any other. Lightning itself loads
  ``http`` paths with ``weights_only=False`` (arbitrary code in the file runs) and caches them by file name.
* :func:`load_checkpoint` loads with torch's safe unpickler (``weights_only=True``) unless the caller trusts the
  file, and turns every way a file can fail to be a checkpoint (text, truncated, empty, a pickle of other objects,
  a file asking to run code) into one :class:`~plasticity_lightning.core.errors.PlasticityConfigError` line.
* :func:`last_checkpoint` finds ``<root>/version_N/checkpoints/last.ckpt`` of the latest version that has one.
* :class:`GlobalRNGState` keeps torch's, NumPy's and Python's global RNG states in checkpoints (dropout and
  augmentation draw from them), and :class:`SaveOnPreemption` saves a resumable ``last.ckpt`` when a scheduler stops
  the run with SIGTERM.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.core.rundir import CHECKPOINT_DIR, LAST_CHECKPOINT

#: what the errors tell a user who trusts a checkpoint that the safe loader refuses
TRUST_HINT = "--weights_only false"


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a remote or fsspec location (``scheme://...``) rather than a local file."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(path)) is not None


def fetch_checkpoint(url: str, directory: str | os.PathLike, *, field: str = "--ckpt_path") -> Path:
    """Copy the checkpoint at ``url`` into ``directory`` and return the local path.

    ``http(s)`` goes through ``urllib`` (no cache keyed by file name, so two URLs never share a copy); any other
    scheme through fsspec. Failures (unreachable host, 404, unknown scheme) raise one clear line.
    """
    target = Path(directory) / (Path(url.split("?", 1)[0].rstrip("/")).name or "checkpoint.ckpt")
    try:
        if url.lower().startswith(("http://", "https://")):
            with urllib.request.urlopen(url, timeout=60) as response, target.open("wb") as out:
                shutil.copyfileobj(response, out)
        else:
            import fsspec

            with fsspec.open(url, "rb") as source, target.open("wb") as out:
                shutil.copyfileobj(source, out)
    except urllib.error.HTTPError as err:
        raise PlasticityConfigError(f"{field}={url!r} cannot be downloaded: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError, ValueError, ImportError) as err:
        reason = getattr(err, "reason", None) or err
        raise PlasticityConfigError(f"{field}={url!r} cannot be read: {_one_line(reason)}") from err
    return target


def load_checkpoint(
    path: str | os.PathLike, *, trust: bool = False, field: str = "--ckpt_path", shown: str | None = None
) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU; raise one clear line when the file is not one.

    Args:
        path: a local file (see :func:`fetch_checkpoint` for URLs).
        trust: unpickle arbitrary objects (``weights_only=False``). Only for files from a trusted source: a
            checkpoint can run any code when unpickled this way.
        field: the argument named in errors.
        shown: the value named in errors (the URL a local copy came from); ``path`` by default.

    Example::

        checkpoint = load_checkpoint("runs/quickstart/version_0/checkpoints/last.ckpt")
        checkpoint["hyper_parameters"]["_class_path"]  # 'plasticity_lightning.models.MLP'
    """
    source = Path(path)
    name = shown if shown is not None else str(path)
    if not source.is_file():
        what = "is a directory" if source.is_dir() else "does not exist"
        raise PlasticityConfigError(f"{field}={name!r} {what}; give a checkpoint file, a URL or `last`")
    if source.stat().st_size == 0:
        raise PlasticityConfigError(f"{field}={name!r} is an empty file, not a checkpoint")
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if "Weights only load failed" not in str(err) or found is None:
            raise _not_a_checkpoint(path, name, field, err) from err
        raise PlasticityConfigError(
            f"{field}={name!r} holds objects that torch's safe loader refuses ({found.group(1)}); unpickling them can "
            f"run code. If you wrote the file or trust its source, add {TRUST_HINT}"
        ) from err
    except Exception as err:  # torch reports damaged files as KeyError, EOFError, RuntimeError, IndexError...
        raise _not_a_checkpoint(path, name, field, err) from err
    lightning_keys = ("state_dict", "pytorch-lightning_version")
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in lightning_keys):
        held = (
            f"a dict with keys {sorted(map(str, checkpoint))[:6]}"
            if isinstance(checkpoint, dict)
            else f"a {type(checkpoint).__name__}"
        )
        raise PlasticityConfigError(
            f"{field}={name!r} holds {held}, not a Lightning checkpoint (it needs 'state_dict' and "
            "'pytorch-lightning_version'); give a file written by `plasticity fit` or Trainer.save_checkpoint"
        )
    return checkpoint


def _not_a_checkpoint(path: str | os.PathLike, name: str, field: str, err: BaseException) -> PlasticityConfigError:
    with open(path, "rb") as f:
        head = f.read(512)
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head) / max(len(head), 1)
    if zipfile.is_zipfile(path):
        kind = "a damaged zip archive"
    elif head.startswith(b"PK"):
        kind = "a truncated zip archive"
    elif printable > 0.95:
        kind = "text"
    elif head[:1] == b"\x80" and isinstance(err, pickle.UnpicklingError):
        kind = f"a plain pickle that torch's safe loader cannot read; if you trust its source, add {TRUST_HINT}"
    else:
        kind = "not a PyTorch file"
    return PlasticityConfigError(
        f"{field}={name!r} is not a readable checkpoint ({kind}: {type(err).__name__}); it may be truncated "
        "or another kind of file. Give a .ckpt written by `plasticity fit`"
    )


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())[:200]


def last_checkpoint(root: str | os.PathLike) -> tuple[int, Path] | None:
    """``(N, path)`` of ``<root>/version_N/checkpoints/last.ckpt`` with the largest ``N``, or ``None``.

    The directory layout is that of Lightning's CSV and TensorBoard loggers with ``ModelCheckpoint``'s default
    ``dirpath``.
    """
    found: list[tuple[int, Path]] = []
    base = Path(root)
    if not base.is_dir():
        return None
    for entry in base.iterdir():
        match = re.fullmatch(r"version_(\d+)", entry.name)
        candidate = entry / CHECKPOINT_DIR / LAST_CHECKPOINT
        if match and candidate.is_file():
            found.append((int(match.group(1)), candidate))
    return max(found) if found else None


# ---------------------------------------------------------------------------------------------------- callbacks
def _rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # plain tensors and numbers only: the checkpoint must load under torch's safe unpickler
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
        | {"has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    np.random.set_state(
        (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"])
    )
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available():
        for device, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


class GlobalRNGState(Callback):
    """Keep the global RNG states (torch CPU and CUDA, NumPy, Python) in checkpoints; restore them on resume.

    Dropout and data augmentation draw from these generators, which Lightning does not checkpoint: without them a
    resumed fit drops other units than the uninterrupted one. The states are taken when the checkpoint is written and
    set back when the resumed fit starts training (``on_train_start``), after the sanity check and the dataloaders'
    creation, none of which draw from them (the library's dataloaders have their own generators). Under DDP every
    rank restores rank 0's states, as ranks seeded alike hold the same ones.

    The ``plasticity`` command adds it to every fit. Example::

        trainer = Trainer(callbacks=[GlobalRNGState()])
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return _rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


class SaveOnPreemption(Callback):
    """When a scheduler stops the fit with SIGTERM, save a resumable ``last.ckpt`` where ``ModelCheckpoint`` keeps it.

    Lightning turns SIGTERM into ``SIGTERMException`` once the current batch is done; this callback writes the
    checkpoint from ``on_exception`` (as Lightning's ``OnExceptionCheckpoint`` does), over the ``last.ckpt`` of the
    trainer's first ``ModelCheckpoint``, so that ``--ckpt_path last`` continues from the step it stopped at. The
    ``plasticity`` command adds it to every fit and exits with status 143 (128 + SIGTERM) afterwards.

    Example::

        trainer = Trainer(callbacks=[ModelCheckpoint(save_last=True), SaveOnPreemption()])
    """

    def __init__(self) -> None:
        self.saved_path: str | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        checkpoint = trainer.checkpoint_callback
        dirpath = getattr(checkpoint, "dirpath", None)
        if checkpoint is None or dirpath is None:
            rank_zero_warn("plasticity: stopped by SIGTERM with checkpointing disabled; nothing to resume from")
            return
        path = os.path.join(dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
        trainer.save_checkpoint(path)
        self.saved_path = path
