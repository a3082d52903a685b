"""What the head policies are judged on, in any loop.

The degeneration of seeded continuations of prompts, and the measures a prune → grow cycle compares (perplexity on a
fixed probe, degeneration, live heads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.metrics.text import degeneration_summary
from plasticity_lightning.nn.generation import generate_seeded
from plasticity_lightning.policies.heads.selection import language_model
from plasticity_lightning.surgery.heads import HeadGates


def continue_prompt(module: nn.Module, ids: torch.Tensor, max_new_tokens: int, seed: int) -> torch.Tensor:
    """``ids`` continued by ``max_new_tokens`` seeded tokens.

    The module's own seeded ``generate(ids, max_new_tokens, seed)`` (CausalLM's), else
    :func:`~plasticity_lightning.nn.generation.generate_seeded` on the HF model (the module itself, or the one at
    ``.model``).

    Args:
        module: a CausalLM, a HF causal language model, or a module holding one at ``.model``.
        ids: the prompt's token ids, ``[batch, T]``.
        max_new_tokens: how many tokens to add.
        seed: seed of the sampling.
    """
    is_hf = hasattr(module, "config") and hasattr(module, "set_attn_implementation")
    generate = getattr(module, "generate", None)
    if callable(generate) and not is_hf:
        return generate(ids, max_new_tokens=max_new_tokens, seed=seed)
    model = module if is_hf else getattr(module, "model", None)
    if model is None or not hasattr(model, "generate"):
        raise PlasticityConfigError(
            f"DegenerationMonitor: {type(module).__name__} has neither generate(input_ids, max_new_tokens, seed) "
            "nor an HF model at .model"
        )
    return generate_seeded(model, ids, max_new_tokens, seed, owner=f"{type(module).__name__}.model")


def score_generations(
    module: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, seed: int
) -> tuple[dict[str, float], list[str]]:
    """Continue each prompt and score the continuations for degeneration.

    Continue each prompt (seed ``seed + i`` for prompt ``i``, :func:`continue_prompt`) and score the continuations'
    token ids with :func:`~plasticity_lightning.metrics.degeneration_summary`. Returns (scores, decoded continuations).

    Args:
        module: as in :func:`continue_prompt`.
        tokenizer: the HF tokenizer that encodes the prompts and decodes the continuations.
        prompts: the prompts (text).
        max_new_tokens: tokens added to each prompt.
        seed: seed of the first prompt's sampling (prompt ``i`` uses ``seed + i``).
    """
    device = next(module.parameters()).device
    continuations, samples = [], []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
        generated = continue_prompt(module, ids, max_new_tokens, seed + i)[0, ids.shape[1] :].tolist()
        continuations.append(generated)
        samples.append(tokenizer.decode(generated))
    return degeneration_summary(continuations), samples


@torch.no_grad()
def cycle_measures(
    model: nn.Module,
    gates: HeadGates,
    input_ids: torch.Tensor,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    seed: int = 0,
    metric: str = "repeated_3gram_rate",
    forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> dict[str, float]:
    """What a :class:`~plasticity_lightning.policies.heads.CycleController` judges a cycle on, now.

    The perplexity of ``model`` on ``input_ids`` (in eval mode; inside ``forward_context``, e.g. a mixed-precision
    autocast), the degeneration ``metric`` of seeded continuations of ``prompts`` (:func:`score_generations`; NaN when
    the perplexity is not finite: a diverged model has no text to judge, and NaN fails every judgement) and the live
    heads of ``gates``.

    Args:
        model: the model (a HF transformers model, or a module holding one at ``.model``).
        gates: its head gates.
        input_ids: ``[blocks, tokens]`` probe token ids.
        tokenizer: encodes ``prompts`` and decodes continuations.
        prompts: prompts to continue.
        max_new_tokens: tokens generated per prompt.
        seed: seed of prompt ``i``'s sampling is ``seed + i``.
        metric: ``repeated_3gram_rate`` or ``max_token_repetition``.
        forward_context: context of the perplexity's forward pass.
    """
    lm = language_model(model)
    was_training = lm.training
    lm.eval()
    with forward_context():
        loss = float(lm(input_ids, labels=input_ids).loss)
    lm.train(was_training)
    degeneration = math.nan
    if math.isfinite(loss):
        scores, _ = score_generations(model, tokenizer, prompts, max_new_tokens, seed)
        degeneration = scores[metric]
    return {
        "perplexity": math.inf if loss == math.inf else math.exp(min(loss, 700.0)),  # NaN stays NaN
        "degeneration": degeneration,
        "live_heads": int((gates.mask > 0).sum()),
    }
