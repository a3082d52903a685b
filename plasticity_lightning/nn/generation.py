"""Seeded text generation with a HF transformers model.

The one sampling routine of the library (:meth:`~plasticity_lightning.models.CausalLM.generate`, the degeneration
monitor and the plasticity cycle).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError


def generate_seeded(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    seed: int = 0,
    *,
    owner: str | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``model.generate`` with seeded sampling, leaving the global RNG and the training mode as they were.

    ``model.generate`` with seeded sampling (top-k 50 unless given), in eval mode, leaving the global RNG and the
    model's training mode as they were: the same weights, prompt and seed give the same tokens.

    Args:
        model: a HF transformers model with ``generate`` and a ``config``.
        input_ids: prompt token ids, ``[batch, length]``.
        max_new_tokens: tokens generated after the prompt.
        seed: sampling seed.
        owner: the name in the error message (default: the model's class).
        **kwargs: more ``generate`` arguments (``do_sample`` and ``top_k`` default to ``True`` and 50).

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=16))
        >>> prompt = torch.tensor([[1, 2, 3]])
        >>> torch.equal(generate_seeded(model, prompt, 4, seed=7), generate_seeded(model, prompt, 4, seed=7))
        True
    """
    kwargs.setdefault("do_sample", True)
    kwargs.setdefault("top_k", 50)
    positions = getattr(model.config, "n_positions", None)
    if positions is not None and input_ids.shape[-1] + max_new_tokens > positions:
        # GPT-2 has no position embedding past n_positions: torch would fail with "index out of range in self"
        raise PlasticityConfigError(
            f"max_new_tokens={max_new_tokens} after a {input_ids.shape[-1]}-token prompt exceeds "
            f"{owner or type(model).__name__}.n_positions={positions}; generate fewer tokens or give the model more "
            "positions"
        )
    was_training = model.training
    model.eval()
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            return model.generate(
                input_ids,
                max_new_tokens=max_new_tokens,
                attention_mask=torch.ones_like(input_ids),
                pad_token_id=model.config.eos_token_id,
                **kwargs,
            )
    finally:
        model.train(was_training)
