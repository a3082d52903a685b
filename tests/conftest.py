"""Shared fixtures. No test may reach the network: W&B is disabled and downloads are switched off or fail fast."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# huggingface_hub reads the variable when first imported, which a plugin may already have done: set its constant
# too, or every hub lookup retries the network for ~50 s before failing.
import huggingface_hub.constants

huggingface_hub.constants.HF_HUB_OFFLINE = True

# pytest-xdist's workers (addopts `-n auto`) share the cores: each worker's torch thread pool, and its subprocesses'
# (through the variable), gets its share instead of every pool spanning every core.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


# A small English-like text: a tokenizer trained on it and a tiny GPT-2 learn it in seconds.
TEXT = " ".join(
    f"The {a} {b} walks to the {c} and sees {n} {b}s."
    for n in range(40)
    for a, b, c in [("old", "cat", "river"), ("young", "dog", "hill"), ("grey", "bird", "town")]
)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """``tmp_path`` with ``texts/`` holding two small text files."""
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(TEXT)
    (tmp_path / "texts" / "b.md").write_text(TEXT[::-1])
    return tmp_path


def run_ddp_script(tmp_path: Path, script: str, variants: list[str]) -> Path:
    """Run ``script`` (argv: output prefix, variant) once per variant, one DDP fit per process (gloo can abort at
    exit after two); fail with its stderr. Returns the output prefix the script writes under."""
    import subprocess
    import sys

    path = tmp_path / "run.py"
    path.write_text(script)
    out = tmp_path / "ddp"
    for variant in variants:
        result = subprocess.run(
            [sys.executable, str(path), str(out), variant], capture_output=True, text=True, timeout=500, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh directory so runs/ and data/ land in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_trainer(root: Path, **kwargs) -> pl.Trainer:
    """A quiet Trainer for tests: no logger, progress bar, summary or checkpoints unless asked for.

    On the CPU, unless ``PLASTICITY_TEST_ACCELERATOR`` names another (``gpu``): ``benchmarks/gpu_checks.py`` runs
    chosen tests on a device that way.
    """
    defaults = {
        "default_root_dir": root,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "accelerator": os.environ.get("PLASTICITY_TEST_ACCELERATOR", "cpu"),
        "devices": 1,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, the MNIST format."""
    with path.open("wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())
