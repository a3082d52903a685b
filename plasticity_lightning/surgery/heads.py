"""Attention-head surgery for GPT-2-style models: gates, head re-initialisation, structural removal.

transformers 5.x removed GPT-2's ``head_mask`` and ``prune_heads`` (see ``ecosystem_anchors.md`` §3), so the
library owns them. A head's output enters the block only through ``attn.c_proj``, whose input is the heads'
outputs concatenated (``[..., heads·head_dim]``); :class:`HeadGates` multiplies each head's slice there with a
forward pre-hook. Shapes never change (DDP-safe), and it works with every attention implementation (eager, sdpa,
flash), because it acts after attention. :func:`prune_heads_` removes heads for export; its logits equal the
gated model's with those gates at 0.

An *attention module* here is any module with ``c_attn`` (fused Q/K/V, HF ``Conv1D``: weight ``[embed,
3·embed]``), ``c_proj`` (``Conv1D``: weight ``[heads·head_dim, embed]``), ``num_heads`` and ``head_dim``, as
GPT-2, distilgpt2 and their relatives define it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.surgery.units import reset_optimizer_state


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The GPT-2-style attention modules of ``model``, in forward (layer) order.

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50))
        >>> [name for name, _ in attention_modules(model)]
        ['transformer.h.0.attn', 'transformer.h.1.attn']
    """
    found = [
        (name, module)
        for name, module in model.named_modules()
        if all(hasattr(module, attr) for attr in ("c_attn", "c_proj", "num_heads", "head_dim"))
    ]
    if not found:
        raise PlasticityConfigError(
            f"{type(model).__name__} has no GPT-2-style attention modules (with c_attn, c_proj, num_heads, head_dim)"
        )
    return found


class HeadGates:
    """Per-layer, per-head multiplicative gates on the heads' outputs (before ``attn.c_proj``).

    ``gates`` is a ``[layers, heads]`` tensor: 1 keeps a head, 0 silences it, values between scale it (a growth
    warm-up ramp). With ``differentiable=True`` the gates require grad, so after ``loss.backward()``,
    ``gates.grad`` holds ∂L/∂ξ — Michel et al.'s head importance before the absolute value and averaging.

    Args:
        model: a model with GPT-2-style attention (see :func:`attention_modules`).
        differentiable: make the gates a leaf tensor that requires grad.

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50))
        >>> gates = HeadGates(model)
        >>> gates.set(0, 1, 0.0)  # silence head 1 of layer 0
        >>> gates.mask.tolist()
        [[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
        >>> gates.remove()
    """

    def __init__(self, model: nn.Module, *, differentiable: bool = False) -> None:
        self.layers = attention_modules(model)
        heads = {module.num_heads for _, module in self.layers}
        if len(heads) != 1:
            raise PlasticityConfigError(
                f"HeadGates needs the same number of heads in every layer, got {sorted(heads)} (a pruned model: "
                "gate it before removing heads)"
            )
        device = self.layers[0][1].c_proj.weight.device
        self.gates = torch.ones(len(self.layers), heads.pop(), device=device, requires_grad=differentiable)
        self._handles = [
            module.c_proj.register_forward_pre_hook(self._hook(index)) for index, (_, module) in enumerate(self.layers)
        ]

    @property
    def num_layers(self) -> int:
        return self.gates.shape[0]

    @property
    def num_heads(self) -> int:
        return self.gates.shape[1]

    @property
    def mask(self) -> torch.Tensor:
        """The gates as a plain tensor (no grad)."""
        return self.gates.detach().clone()

    def _hook(self, layer: int):
        def gate(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = args[0]
            g = self.gates[layer].to(dtype=x.dtype, device=x.device)
            heads = x.unflatten(-1, (self.num_heads, -1)) * g[:, None]
            return (heads.flatten(-2), *args[1:])

        return gate

    @torch.no_grad()
    def set(self, layer: int, head: int, value: float) -> None:
        """Set one gate."""
        self.gates[layer, head] = value

    @torch.no_grad()
    def load(self, mask: torch.Tensor) -> None:
        """Set every gate from a ``[layers, heads]`` tensor."""
        if tuple(mask.shape) != tuple(self.gates.shape):
            raise PlasticityConfigError(
                f"HeadGates.load: mask of shape {tuple(mask.shape)} given, expected {tuple(self.gates.shape)}"
            )
        self.gates.copy_(mask.to(self.gates))

    def remove(self) -> None:
        """Detach the hooks (the model computes as if every gate were 1)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _head_columns(module: nn.Module, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q/K/V columns of ``c_attn``, input rows of ``c_proj``) belonging to ``heads``."""
    d, width = module.head_dim, module.num_heads * module.head_dim
    rows = (heads[:, None] * d + torch.arange(d, device=heads.device)).flatten()
    return torch.cat([rows, rows + width, rows + 2 * width]), rows


@torch.no_grad()
def reinit_heads(
    module: nn.Module,
    heads: Iterable[int],
    *,
    std: float = 0.02,
    output_scale: float = 1.0,
    generator: torch.Generator | None = None,
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> None:
    """Give ``heads`` of one attention module fresh Q/K/V weights and output rows, and clear their optimizer state.

    Q/K/V columns of ``c_attn`` are drawn from N(0, std²) (GPT-2's ``initializer_range``) with zero bias; the
    head's input rows of ``c_proj`` from N(0, (output_scale·std)²) — a small ``output_scale`` lets a revived head
    start near silent. Exactly those slices of every per-element optimizer state are zeroed.

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=4, n_embd=32, vocab_size=50))
        >>> attn = model.transformer.h[0].attn
        >>> reinit_heads(attn, [2], output_scale=0.0)
        >>> float(attn.c_proj.weight[16:24].abs().sum())
        0.0
    """
    index = torch.as_tensor(list(heads), dtype=torch.long)
    if index.numel() == 0:
        return
    if int(index.min()) < 0 or int(index.max()) >= module.num_heads:
        raise PlasticityConfigError(
            f"reinit_heads: heads {index.tolist()} out of range for a layer with {module.num_heads} heads"
        )
    columns, rows = _head_columns(module, index)
    c_attn, c_proj = module.c_attn, module.c_proj
    qkv = torch.randn((c_attn.weight.shape[0], len(columns)), generator=generator) * std
    c_attn.weight[:, columns.to(c_attn.weight.device)] = qkv.to(c_attn.weight)
    c_attn.bias[columns.to(c_attn.bias.device)] = 0.0
    out = torch.randn((len(rows), c_proj.weight.shape[1]), generator=generator) * (std * output_scale)
    c_proj.weight[rows.to(c_proj.weight.device)] = out.to(c_proj.weight)
    for optimizer in optimizers:
        reset_optimizer_state(optimizer, c_attn.weight, 1, columns)
        reset_optimizer_state(optimizer, c_attn.bias, 0, columns)
        reset_optimizer_state(optimizer, c_proj.weight, 0, rows)


@torch.no_grad()
def prune_heads_(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> dict[int, list[int]]:
    """Remove heads for good (for export): slice ``c_attn`` columns and ``c_proj`` rows, update the head counts.

    ``heads`` maps a layer index (in :func:`attention_modules` order) to the heads to remove. The pruned model's
    output equals the gated model's with those gates at 0. Parameters are replaced, so optimizers built before
    must be rebuilt: this is not for use during a (DDP) fit — gate instead. Returns the heads kept per layer.
    """
    layers = attention_modules(model)
    kept_per_layer = {}
    for layer, removed in heads.items():
        if not 0 <= layer < len(layers):
            raise PlasticityConfigError(f"prune_heads_: layer {layer} out of range (the model has {len(layers)})")
        _, module = layers[layer]
        drop = sorted({int(h) for h in removed})
        keep = [h for h in range(module.num_heads) if h not in drop]
        if not keep:
            raise PlasticityConfigError(f"prune_heads_: removing every head of layer {layer} is not allowed")
        if any(h < 0 or h >= module.num_heads for h in drop):
            raise PlasticityConfigError(f"prune_heads_: heads {drop} out of range for layer {layer}")
        columns, rows = _head_columns(module, torch.tensor(keep))
        c_attn, c_proj = module.c_attn, module.c_proj
        c_attn.weight = nn.Parameter(c_attn.weight[:, columns].clone())
        c_attn.bias = nn.Parameter(c_attn.bias[columns].clone())
        c_attn.nf = len(columns)
        c_proj.weight = nn.Parameter(c_proj.weight[rows].clone())
        c_proj.nx = len(rows)
        module.num_heads = len(keep)
        module.split_size = len(keep) * module.head_dim
        kept_per_layer[layer] = keep
    return kept_per_layer
