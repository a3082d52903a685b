"""The model-zoo pieces that ``benchmarks/any_model.py`` and ``tests/test_model_zoo.py`` share: a user's model in the
thinnest LightningModule, tiny Hugging Face language models built from their configs (no download), and random data
for each input kind.

The benchmark imports it as ``_zoo`` (its folder is on ``sys.path`` when it runs); the test loads it by its path
(:func:`importlib.util.spec_from_file_location`), so neither needs a ``sys.path`` change that would differ between
pytest-xdist workers.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

#: vocabulary size and sequence length of the tiny language models and their token data
VOCAB, SEQ = 32, 6


class Wrapped(pl.LightningModule):
    """A user's model in the thinnest LightningModule: its own forward and cross-entropy, plain SGD.

    Args:
        net: the model; an output with ``.logits`` (Hugging Face) is read through it.
        lr: SGD's learning rate.
    """

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return getattr(out, "logits", out)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        if logits.ndim == 3:  # a language model: every position predicts
            return F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def hf_causal_lm(kind: str, **extra) -> nn.Module:
    """A 2-layer Hugging Face causal LM of model type ``kind`` (width 16, MLP 24, 2 heads, 1 key-value head) from its
    config; ``extra`` overrides or adds config fields."""
    import transformers as tf

    settings = {
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": VOCAB,
        "max_position_embeddings": SEQ,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    return tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(kind, **{**settings, **extra}))


def random_data(kind: str) -> torch.utils.data.DataLoader:
    """8 random rows in batches of 4, always the same: ``"image"`` (3×16×16, 4 classes), ``"image32"`` (3×32×32),
    ``"tokens"`` (a next-token target per position) or ``"sentence"`` (one of 4 labels per sequence)."""
    g = torch.Generator().manual_seed(0)
    if kind.startswith("image"):
        size = 32 if kind == "image32" else 16
        x, y = torch.randn(8, 3, size, size, generator=g), torch.randint(0, 4, (8,), generator=g)
    else:
        x = torch.randint(1, VOCAB, (8, SEQ), generator=g)
        shape = (8, SEQ) if kind == "tokens" else (8,)
        y = torch.randint(0, VOCAB if kind == "tokens" else 4, shape, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
