"""Continual text (TextParts) and CausalLM of any HF architecture: the split against numpy, the per-task scores
against HF's own loss, the task machinery (one part per task, exact resume) and one-line errors."""

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from plasticity_lightning.callbacks import TaskAccuracyTable
from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.data import PermutedInputs, TextDataModule, TextParts
from plasticity_lightning.models.causal_lm import CausalLM, PerTaskTokenLoss
from plasticity_lightning.reports.data import load_run
from plasticity_lightning.reports.panels import run_charts
from plasticity_lightning.reports.run import measure_label, summarize_run

LLAMA = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4}


def _data(corpus, **kwargs) -> TextDataModule:
    settings = {"block_size": 16, "batch_size": 8, "vocab_size": 300, "data_dir": str(corpus / "cache")}
    return TextDataModule(text_files=[str(corpus / "texts")], **{**settings, **kwargs})


def _stream(data: TextDataModule) -> tuple[np.ndarray, list[int]]:
    """The token stream tokenized here, document by document (EOS after each), and the documents' lengths."""
    ids, lengths = [], []
    for text in data.texts():
        document = [*data.tokenizer(text)["input_ids"], data.tokenizer.eos_token_id]
        ids += document
        lengths.append(len(document))
    return np.array(ids), lengths


def _expected_splits(parts: list[np.ndarray], block: int, val: float, test: float) -> dict[str, list[np.ndarray]]:
    """Each part packed into blocks on its own, its last blocks held out (val, then test)."""
    out: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for part in parts:
        blocks = part[: len(part) // block * block].reshape(-1, block)
        n_val, n_test = (max(1, round(len(blocks) * f)) for f in (val, test))
        out["train"].append(blocks[: len(blocks) - n_val - n_test])
        out["val"].append(blocks[len(blocks) - n_val - n_test : len(blocks) - n_test])
        out["test"].append(blocks[len(blocks) - n_test :])
    return out


@pytest.mark.parametrize("by", ["tokens", "documents"])
def test_text_parts_are_contiguous_shares_of_the_stream_as_numpy_cuts_them(corpus, by):
    (corpus / "texts" / "c.txt").write_text("A third document, shorter than the others. " * 20)
    data = _data(corpus, schedule=TextParts(num_tasks=3, epochs_per_task=1, by=by), val_fraction=0.1)
    data.setup("fit")
    ids, lengths = _stream(data)
    # by documents: three documents, three tasks, one document each
    parts = np.array_split(ids, 3) if by == "tokens" else np.split(ids, np.cumsum(lengths)[:-1])
    assert [len(p) for p in parts] == [
        b - a
        for a, b in zip(data.schedule.boundaries(lengths)[:-1], data.schedule.boundaries(lengths)[1:], strict=True)
    ]
    expected = _expected_splits(parts, 16, 0.1, 0.05)
    for split in ("train", "val", "test"):
        assert np.array_equal(data.splits[split].numpy(), np.concatenate(expected[split]))
        tasks = np.concatenate([np.full(len(b), k) for k, b in enumerate(expected[split])])
        assert np.array_equal(data.block_tasks[split].numpy(), tasks)


def test_without_a_schedule_the_blocks_are_those_of_one_stream(corpus):
    data = _data(corpus, max_tokens=1500)
    data.setup("fit")
    ids, _ = _stream(data)
    expected = _expected_splits([ids[:1500]], 16, 0.05, 0.05)
    for split in ("train", "val", "test"):
        assert np.array_equal(data.splits[split].numpy(), expected[split][0])
        assert not data.block_tasks[split].any()


class _Batches(Callback):
    """Records the task and the blocks of every training batch, and the task ids of every validation batch."""

    def __init__(self) -> None:
        self.train: list[tuple[int, torch.Tensor]] = []
        self.val: list[tuple[int, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append((trainer.datamodule.current_task, batch[0].clone()))
        assert len(batch) == 1  # training batches stay (input_ids,)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val.append((trainer.datamodule.current_task, batch[1].clone()))


def test_a_tiny_llama_learns_the_parts_in_turn_and_reports_every_task_like_hf_computes_it(corpus):
    data = _data(corpus, schedule=TextParts(num_tasks=3, epochs_per_task=1), max_tokens=3000)
    model = CausalLM(
        pretrained=False, architecture="llama", config=LLAMA, optimizer=lambda p: torch.optim.AdamW(p, 3e-3)
    )
    batches, table = _Batches(), TaskAccuracyTable()
    logger = CSVLogger(corpus / "runs", name="text")
    trainer = make_trainer(
        corpus, max_epochs=3, num_sanity_val_steps=0, callbacks=[batches, table], logger=logger, log_every_n_steps=1
    )
    trainer.fit(model, data)
    assert type(model.model).__name__ == "LlamaForCausalLM" and model.model.config.vocab_size == data.vocab_size

    # training: task k's batches hold only part k's training blocks; validation: the tasks seen so far
    train, tasks = data.splits["train"], data.block_tasks["train"]
    for task, blocks in batches.train:
        part = {tuple(row) for row in train[tasks == task].tolist()}
        assert all(tuple(row) in part for row in blocks.tolist())
    assert [t for t, _ in batches.train[:: len(batches.train) // 3]][:3] == [0, 1, 2]
    evaluated: dict[int, set[int]] = {}
    for task, ids in batches.val:
        evaluated.setdefault(task, set()).update(ids.tolist())
    assert evaluated == {0: {0}, 1: {0, 1}, 2: {0, 1, 2}}

    # the last validation's scores per task against HF's own loss on those blocks, and argmax accuracy in numpy
    metrics = trainer.callback_metrics
    model.eval()
    for k in range(3):
        blocks = data.splits["val"][data.block_tasks["val"] == k]
        with torch.no_grad():
            hf_loss = float(model.model(blocks, labels=blocks).loss)  # mean over every predicted token
            logits = model.model(blocks).logits[:, :-1].numpy()
        accuracy = float((logits.argmax(-1) == blocks[:, 1:].numpy()).mean())
        assert metrics[f"val/loss_task_{k}"].item() == pytest.approx(hf_loss, rel=1e-5)
        assert metrics[f"val/perplexity_task_{k}"].item() == pytest.approx(math.exp(hf_loss), rel=1e-5)
        assert metrics[f"val/acc_task_{k}"].item() == pytest.approx(accuracy, abs=1e-6)
        assert table.rows[2][k] == pytest.approx(accuracy, abs=1e-6)  # the matrix the report reads
    assert metrics["val/loss_current_task"] == metrics["val/loss_task_2"]
    assert metrics["task_id"].item() == 2.0
    assert table.rows[0][1:] == [pytest.approx(math.nan, nan_ok=True)] * 2  # task 0: later tasks not evaluated

    # the report: each task's loss and perplexity right after learning it, from metrics.csv by pandas
    frame = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    frame["task"] = frame["task_id"].ffill()  # validation rows follow the training steps of their task
    after = frame.dropna(subset=["val/perplexity_current_task"]).groupby("task").last()
    assert after.index.tolist() == [0, 1, 2]
    run = load_run(logger.log_dir)
    summary = summarize_run(run)
    window = summary["window"]
    for key, label in (
        ("val/loss_current_task", "new-task loss"),
        ("val/perplexity_current_task", "new-task perplexity"),
    ):
        expected = after[key].to_numpy()
        assert summary["measures"][key]["first"] == pytest.approx(expected[:window].mean(), rel=1e-6)
        assert summary["measures"][key]["last"] == pytest.approx(expected[-window:].mean(), rel=1e-6)
        assert measure_label(key) == label
    charts = {chart.id: chart for chart in run_charts(run)[0]}
    (learning,) = [line for line in charts["training/loss"].series if line.name == "validation, task being learned"]
    assert learning.x.tolist() == [0, 1, 2] and learning.y == pytest.approx(after["val/loss_current_task"].to_numpy())
    (new_task,) = charts["accuracy/new_task"].series[:1]
    assert new_task.y == pytest.approx([table.rows[t][t] for t in range(3)], abs=1e-6)


def test_per_task_token_loss_against_numpy():
    rng = np.random.default_rng(0)
    nll, tasks = rng.random((6, 5)), np.array([2, 0, 2, 2, 0, 0])
    metric = PerTaskTokenLoss(num_tasks=4)
    metric.update(torch.tensor(nll[:3]), torch.tensor(tasks[:3]))
    metric.update(torch.tensor(nll[3:]), torch.tensor(tasks[3:]))
    result = metric.compute().numpy()
    assert result[0] == pytest.approx(nll[tasks == 0].mean()) and result[2] == pytest.approx(nll[tasks == 2].mean())
    assert np.isnan(result[1]) and np.isnan(result[3])  # not evaluated is not a loss of 0


def test_a_continual_text_fit_resumes_exactly_from_the_middle_of_a_task(corpus):
    def fit(ckpt: str | None = None, **kwargs) -> tuple[CausalLM, pl.Trainer]:
        data = _data(corpus, schedule=TextParts(num_tasks=2, epochs_per_task=2), max_tokens=1600)
        model = CausalLM(pretrained=False, architecture="llama", config=LLAMA)
        trainer = make_trainer(corpus, max_epochs=4, num_sanity_val_steps=0, limit_val_batches=1, **kwargs)
        trainer.fit(model, data, ckpt_path=ckpt)
        return model, trainer

    pl.seed_everything(0)
    saver = ModelCheckpoint(dirpath=corpus / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    full, trainer = fit(enable_checkpointing=True, callbacks=[saver])
    steps_per_epoch = trainer.num_training_batches
    assert steps_per_epoch >= 2
    pl.seed_everything(0)  # the model's initial weights; the training order comes from the datamodule's seed
    checkpoint = corpus / "ckpt" / f"step={3 * steps_per_epoch - 1}.ckpt"  # task 1, mid-epoch
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert any(not torch.equal(saved[name], value) for name, value in full.state_dict().items())  # trained on after
    resumed, _ = fit(ckpt=str(checkpoint))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TextParts(num_tasks=2, steps_per_task=10), r"TextParts.steps_per_task=10 is not supported"),
        (lambda: TextParts(num_tasks=0, epochs_per_task=1), r"TextParts.num_tasks=0 is invalid"),
        (lambda: TextParts(num_tasks=2, epochs_per_task=1, by="plays"), r"TextParts.by='plays' is not supported"),
        (
            lambda: TextDataModule(corpus="shakespeare", schedule=PermutedInputs(num_tasks=2, epochs_per_task=1)),
            r"TextDataModule.schedule=PermutedInputs\(.*\) is not supported; .* TextParts",
        ),
    ],
    ids=["steps", "zero_tasks", "by", "other_schedule"],
)
def test_bad_text_streams_fail_at_construction_in_one_line(make, message):
    with pytest.raises(PlasticityConfigError, match=message):
        make()


def test_text_too_short_for_its_parts_fails_at_setup_in_one_line(corpus):
    with pytest.raises(PlasticityConfigError, match=r"TextParts.num_tasks=5 exceeds the 2 documents"):
        _data(corpus, schedule=TextParts(num_tasks=5, epochs_per_task=1, by="documents")).setup("fit")
    whole = _data(corpus)
    whole.setup("fit")
    tokens = len(_stream(whole)[0])
    parts = tokens // 40  # 40 tokens a part: two blocks of 16, too few for train, val and test blocks
    with pytest.raises(PlasticityConfigError, match=rf"part 0 of {parts} \(TextParts\) gives 2 blocks of 16 tokens"):
        _data(corpus, schedule=TextParts(num_tasks=parts, epochs_per_task=1)).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"architecture": "lama"}, r"CausalLM.architecture='lama' is not a causal-LM model_type .*did you mean llama"),
        ({"architecture": "t5"}, r"CausalLM.architecture='t5' is not a causal-LM model_type"),
        (
            {"architecture": "llama", "config": {"hidden_sise": 32}},
            r"CausalLM.config: key 'hidden_sise' \(value 32\) is not a field of LlamaConfig; did you mean hidden_size",
        ),
        (
            {"architecture": "llama", "config": {"hidden_size": 30, "num_attention_heads": 4}},
            r"CausalLM.config: hidden_size=30 is not a multiple of num_attention_heads=4; allowed: a width",
        ),
        (
            {"architecture": "llama", "config": {"hidden_size": "a"}},
            r"CausalLM.config: field 'hidden_size' expected int, got str \(value: 'a'\); LlamaConfig's default is 4096",
        ),
        ({"architecture": "llama", "n_layer": 2}, r"CausalLM.n_layer=2 is a GPT-2 size"),
        ({"config": {"hidden_size": 32}}, r"CausalLM.config=\{'hidden_size': 32\} has no model_type"),
        ({"architecture": "llama", "config": {"model_type": "gpt2"}}, r"architecture='llama' contradicts .*'gpt2'"),
        ({"architecture": "llama", "pretrained": True}, r"CausalLM.architecture='llama' with pretrained=true"),
        ({"architecture": "llama", "config": [1]}, r"CausalLM.config=\[1\] is invalid; expected a mapping"),
    ],
    ids=[
        "typo",
        "not_causal",
        "unknown_key",
        "refused",
        "type",
        "gpt2_size",
        "no_type",
        "contradicts",
        "pretrained",
        "not_mapping",
    ],
)
def test_bad_architectures_fail_at_construction_in_one_line(kwargs, message):
    kwargs.setdefault("pretrained", False)
    with pytest.raises(PlasticityConfigError, match=message) as error:
        CausalLM(**kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"architecture": "llama", "config": LLAMA}, "LlamaForCausalLM"),
        ({"config": {"model_type": "qwen2", **LLAMA, "num_key_value_heads": 2}}, "Qwen2ForCausalLM"),
        ({"config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2}}, "GPT2LMHeadModel"),
        ({"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32}, "GPT2LMHeadModel"),
    ],
    ids=["llama", "qwen2_by_model_type", "gpt2_by_config", "gpt2_as_before"],
)
def test_any_causal_lm_architecture_is_built_from_its_config(kwargs, expected):
    model = CausalLM(pretrained=False, vocab_size=64, **kwargs)
    model.configure_model()
    assert type(model.model).__name__ == expected and model.model.config.vocab_size == 64
    assert model(torch.randint(0, 64, (2, 8))).shape == (2, 8, 64)
    for key, value in kwargs.get("config", {}).items():
        if key != "model_type":
            assert getattr(model.model.config, key) == value


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model.architecture=lama"], ["CausalLM.architecture='lama'", "did you mean llama"]),
        (["--model.architecture=llama", "--model.config={hidden_sise: 8}"], ["key 'hidden_sise'", "LlamaConfig"]),
        (
            ["--data.schedule=TextParts", "--data.schedule.num_tasks=2", "--data.schedule.steps_per_task=5"],
            ["TextParts.steps_per_task=5 is not supported"],
        ),
    ],
    ids=["architecture", "config_key", "text_parts_steps"],
)
def test_bad_language_models_and_streams_through_the_entry_point_give_exit_2_and_one_line(
    extra, expected, corpus, monkeypatch, capsys
):
    import sys

    from plasticity_lightning.cli import main

    monkeypatch.chdir(corpus)
    monkeypatch.setattr(sys, "argv", ["plasticity"])
    monkeypatch.delenv("PLASTICITY_TRACEBACK", raising=False)
    args = ["fit", "--model", "CausalLM", "--model.pretrained", "false", "--data", "TextDataModule"]
    args += [f"--data.text_files=[{corpus / 'texts'}]", "--trainer.fast_dev_run=1", *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("plasticity: error:")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert all(part in lines[0] for part in expected), lines[0]
