"""Attention-head surgery: gates, head re-initialisation, structural removal.

transformers 5.x removed GPT-2's ``head_mask`` (huggingface/transformers#41076) and ``prune_heads``
(huggingface/transformers#41417), so the library owns them. A head's output enters the block only through the
attention's output projection, whose input is the heads' outputs concatenated (``[..., heads·head_dim]``): the heads
are units of a producer → consumer pair, read where the consumer receives them, as the monitors read a functional
activation's units (a consumer-input tap). :class:`HeadGates` multiplies each head's slice there with a forward
pre-hook. Shapes never change (DDP-safe), and it works with every attention implementation (eager, sdpa, flash),
because it acts after attention. :func:`prune_heads_` removes heads for export; its logits equal the gated model's
with those gates at 0. Stateful training-time policies over these (importance windows, the reviver, the cycle) are
in :mod:`plasticity_lightning.policies.heads`.

The attention modules and where each head lives in their weights (:class:`HeadLayout`) are read from the structure
of the blocks that the ``attention`` pairing rule names (:mod:`plasticity_lightning.surgery.rules`), or of any
module with one of these layouts:

* ``gpt2`` (GPT-2, distilgpt2, ImageGPT): ``c_attn`` (fused Q/K/V, HF ``Conv1D``: weight ``[embed, 3·embed]``),
  ``c_proj`` (``Conv1D``: weight ``[heads·head_dim, embed]``), ``num_heads`` and ``head_dim``;
* ``qkvo`` (Llama, Mistral, Qwen2, Gemma, OPT, BART, …): ``Linear`` ``q_proj``, ``k_proj``, ``v_proj`` and an output
  ``o_proj`` / ``out_proj``. With grouped-query attention (fewer K/V heads than query heads) a K/V head is shared by
  a group, so a head's own weights are its query rows and output columns; K/V rows belong to a head only when
  every head has its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.metrics.entropy import attention_entropy
from plasticity_lightning.probes.capture import is_transposed_linear
from plasticity_lightning.surgery.rules import rule_for
from plasticity_lightning.surgery.units import reset_optimizer_state


@dataclass(frozen=True)
class HeadSlice:
    """The entries of one parameter that belong to heads: along ``dim``, head ``h`` owns ``index(h)``.

    Attributes:
        param: the parameter (a projection's weight or bias).
        dim: the axis that holds heads.
        offsets: where each block of ``head_dim`` entries of head 0 starts (the fused Q/K/V of GPT-2: three).
        head_dim: entries per head and block.
        role: ``"in"`` (a weight producing the head: Q/K/V), ``"bias"`` (its bias) or ``"out"`` (the output
            projection's input columns, the head's outgoing weights).
    """

    param: nn.Parameter
    dim: int
    offsets: tuple[int, ...]
    head_dim: int
    role: str

    def index(self, heads: torch.Tensor) -> torch.Tensor:
        """Indices along :attr:`dim` of ``heads`` (a 1-D tensor of head numbers), block after block."""
        within = (heads[:, None] * self.head_dim + torch.arange(self.head_dim)).flatten()
        return torch.cat([within + offset for offset in self.offsets])


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads of one attention module live.

    Attributes:
        kind: ``"gpt2"`` or ``"qkvo"`` (see the module docstring).
        module: the attention module.
        num_heads: its (query) heads.
        head_dim: the width of each head (features per head).
        output: the projection that receives the heads' concatenated outputs (the gates tap its input).
        slices: every parameter slice owned by heads, producers first (Q, K, V weights, their biases), then the
            output projection's columns.
    """

    kind: str
    module: nn.Module
    num_heads: int
    head_dim: int
    output: nn.Module
    slices: tuple[HeadSlice, ...]

    def owned(
        self, heads: Iterable[int], roles: Sequence[str] = ("in", "bias", "out")
    ) -> list[tuple[HeadSlice, torch.Tensor]]:
        """``(slice, indices)`` of ``heads`` for the slices of the given roles."""
        index = torch.as_tensor(list(heads), dtype=torch.long)
        return [(piece, piece.index(index)) for piece in self.slices if piece.role in roles]


def _gpt2_layout(name: str, module: nn.Module) -> HeadLayout:
    # head slicing assumes GPT-2's layout: Conv1D weights [in, out], fused Q/K/V of num_heads heads each
    width = module.num_heads * module.head_dim
    if (
        not is_transposed_linear(module.c_attn)
        or not is_transposed_linear(module.c_proj)
        or tuple(module.c_attn.weight.shape[1:]) != (3 * width,)
        or module.c_proj.weight.shape[0] != width
    ):
        raise PlasticityConfigError(
            f"{name}: c_attn weight {tuple(module.c_attn.weight.shape)} / c_proj weight "
            f"{tuple(module.c_proj.weight.shape)} is not GPT-2's fused layout for {module.num_heads} heads of "
            f"{module.head_dim} (c_attn [embed, 3·{width}], c_proj [{width}, embed]); multi-query, cross- and "
            "Linear-based fused attention are not supported"
        )
    d, blocks = module.head_dim, (0, width, 2 * width)
    slices = [HeadSlice(module.c_attn.weight, 1, blocks, d, "in")]
    if module.c_attn.bias is not None:
        slices.append(HeadSlice(module.c_attn.bias, 0, blocks, d, "bias"))
    slices.append(HeadSlice(module.c_proj.weight, 0, (0,), d, "out"))
    return HeadLayout("gpt2", module, module.num_heads, d, module.c_proj, tuple(slices))


def _qkvo_layout(name: str, module: nn.Module) -> HeadLayout:
    output = getattr(module, "o_proj", None) or getattr(module, "out_proj", None)
    projections = [getattr(module, key) for key in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(p, nn.Linear) for p in (*projections, output)):
        raise PlasticityConfigError(
            f"{name}: q_proj/k_proj/v_proj/o_proj of {type(module).__name__} are not all nn.Linear; its heads "
            "cannot be sliced"
        )
    config = getattr(module, "config", None)
    heads = getattr(module, "num_heads", None) or getattr(config, "num_attention_heads", None)
    d = getattr(module, "head_dim", None) or (projections[0].out_features // heads if heads else None)
    if not heads or not d or projections[0].out_features != heads * d or output.in_features != heads * d:
        raise PlasticityConfigError(
            f"{name}: cannot tell the heads of {type(module).__name__} (num_heads={heads!r}, head_dim={d!r}, q_proj "
            f"out {projections[0].out_features}, output in {output.in_features})"
        )
    q, k, v = projections
    own = [q] + ([k, v] if k.out_features == v.out_features == heads * d else [])  # grouped K/V: shared, not owned
    slices = [HeadSlice(p.weight, 0, (0,), d, "in") for p in own]
    slices += [HeadSlice(p.bias, 0, (0,), d, "bias") for p in own if p.bias is not None]
    slices.append(HeadSlice(output.weight, 1, (0,), d, "out"))
    return HeadLayout("qkvo", module, heads, d, output, tuple(slices))


def head_layout(module: nn.Module, name: str = "") -> HeadLayout | None:
    """The :class:`HeadLayout` of ``module``, ``None`` when it has no known attention layout.

    The :class:`HeadLayout` of ``module``, ``None`` when it has no known attention layout (one line when it has one
    whose shapes do not fit).

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
        >>> layout = head_layout(model.model.layers[0].self_attn)
        >>> layout.kind, layout.num_heads, [piece.role for piece in layout.slices]  # K/V shared by pairs of heads
        ('qkvo', 4, ['in', 'out'])
    """
    if all(hasattr(module, attr) for attr in ("c_attn", "c_proj", "num_heads", "head_dim")):
        return _gpt2_layout(name or type(module).__name__, module)
    if all(hasattr(module, attr) for attr in ("q_proj", "k_proj", "v_proj")) and (
        hasattr(module, "o_proj") or hasattr(module, "out_proj")
    ):
        return _qkvo_layout(name or type(module).__name__, module)
    return None


def _as_layout(module: nn.Module | HeadLayout) -> HeadLayout:
    if isinstance(module, HeadLayout):
        return module
    layout = head_layout(module)
    if layout is None:
        raise PlasticityConfigError(f"{type(module).__name__} has no known attention layout (gpt2 or qkvo)")
    return layout


def attention_layouts(model: nn.Module) -> list[tuple[str, HeadLayout]]:
    """Every attention module of ``model`` with its :class:`HeadLayout`, in forward (layer) order.

    The blocks the ``attention`` pairing rule names and any other module with a known layout (the outermost one: an
    attention module inside another is part of it).

    Args:
        model: a model with GPT-2-style (fused ``c_attn``) or Llama-style (``q/k/v/o_proj``) attention modules.

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50))
        >>> [(name, layout.kind) for name, layout in attention_layouts(model)]
        [('transformer.h.0.attn', 'gpt2'), ('transformer.h.1.attn', 'gpt2')]
    """
    found: list[tuple[str, HeadLayout]] = []
    unread: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        layout = head_layout(module, name)
        if layout is not None:
            found.append((name, layout))
            continue
        rule = rule_for(module)
        if rule is not None and rule.name == "attention" and not any(name.startswith(f"{u}.") for u in unread):
            unread.append(f"{name} ({type(module).__name__})")
    if not found:
        seen = f"; attention blocks of other layouts: {', '.join(unread[:4])}" if unread else ""
        raise PlasticityConfigError(
            f"{type(model).__name__} has no attention modules whose heads can be sliced: GPT-2's fused c_attn/c_proj "
            f"or Linear q_proj/k_proj/v_proj with o_proj/out_proj{seen}"
        )
    return found


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules of ``model`` (see :func:`attention_layouts`), in forward (layer) order.

    Args:
        model: a model with GPT-2-style (fused ``c_attn``) or Llama-style (``q/k/v/o_proj``) attention modules.

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50))
        >>> [name for name, _ in attention_modules(model)]
        ['transformer.h.0.attn', 'transformer.h.1.attn']
    """
    return [(name, layout.module) for name, layout in attention_layouts(model)]


class HeadGates:
    """Per-layer, per-head multiplicative gates on the heads' outputs.

    Per-layer, per-head multiplicative gates on the heads' outputs (the input of each attention's output projection:
    ``c_proj``, ``o_proj``, ``out_proj``).

    ``gates`` is a ``[layers, heads]`` tensor: 1 keeps a head, 0 silences it, values between scale it (a growth
    warm-up ramp). With ``differentiable=True`` the gates require grad, so after ``loss.backward()``,
    ``gates.grad`` holds ∂L/∂ξ — Michel et al.'s head importance before the absolute value and averaging.

    Args:
        model: a model with attention whose heads can be sliced (see :func:`attention_layouts`).
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
        self.layouts = [layout for _, layout in attention_layouts(model)]
        self.layers = [(name, layout.module) for name, layout in attention_layouts(model)]
        heads = {layout.num_heads for layout in self.layouts}
        if len(heads) != 1:
            raise PlasticityConfigError(
                f"HeadGates needs the same number of heads in every layer, got {sorted(heads)} (a pruned model: "
                "gate it before removing heads)"
            )
        device = self.layouts[0].output.weight.device
        self.gates = torch.ones(len(self.layers), heads.pop(), device=device, requires_grad=differentiable)
        self._handles = [
            layout.output.register_forward_pre_hook(self._hook(index)) for index, layout in enumerate(self.layouts)
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
        if not torch.isfinite(mask).all():
            raise PlasticityConfigError("HeadGates.load: the mask has NaN or infinite gates")
        self.gates.copy_(mask.to(self.gates))

    @torch.no_grad()
    def fold_(self) -> None:
        """Bake the gates into the weights (each head's output-projection inputs × its gate) and detach the hooks.

        The model then computes exactly what the gated model did, with no hooks (for export; then :func:`prune_heads_`
        removes the heads whose gate was 0).
        """
        for index, layout in enumerate(self.layouts):
            for piece in layout.slices:
                if piece.role == "out":  # [.., heads·head_dim, ..] viewed as [.., heads, head_dim, ..]
                    heads = piece.param.unflatten(piece.dim, (self.num_heads, -1))
                    shape = [self.num_heads if axis == piece.dim else 1 for axis in range(heads.ndim)]
                    heads.mul_(self.gates[index].detach().to(heads).view(shape))
        self.remove()

    def attached_to(self, model: nn.Module) -> bool:
        """Whether these gates are hooked onto ``model``'s attention modules."""
        if not self._handles:
            return False
        try:
            current = attention_modules(model)
        except PlasticityConfigError:
            return False
        return len(current) == len(self.layers) and all(
            a is b for (_, a), (_, b) in zip(current, self.layers, strict=True)
        )

    def remove(self) -> None:
        """Detach the hooks (the model computes as if every gate were 1)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def normalize_importance(scores: torch.Tensor, normalize: str | None = "layer") -> torch.Tensor:
    """Divide each layer's head scores by their L2 norm, or leave them.

    Divide each layer's head scores by their L2 norm (``"layer"``, Michel et al.'s ``--normalize_pruning_by_layer``), or
    leave them (``None``).

    Args:
        scores: head scores, ``[layers, heads]``.
        normalize: ``"layer"`` (default): divide each layer's scores by their L2 norm (Michel et al. 2019's
            ``--normalize_pruning_by_layer``); ``None``: raw scores.
    """
    if normalize is None:
        return scores
    if normalize != "layer":
        raise PlasticityConfigError(f"normalize={normalize!r} is invalid; expected 'layer' or None")
    return scores / scores.norm(dim=-1, keepdim=True).clamp(min=1e-20)


def head_importance(
    model: nn.Module, batches: Iterable[torch.Tensor], *, normalize: str | None = "layer"
) -> torch.Tensor:
    """Michel et al.'s head importance E|∂L/∂ξ_h| over ``batches`` of token ids → ``[layers, heads]`` (CPU).

    The functional twin of :class:`~plasticity_lightning.callbacks.HeadImportance`, which takes the gradient from
    the training step instead of running its own. ``model`` is a HF causal LM (``model(ids, labels=ids).loss``);
    gates already on it stay in force (a gated-off head scores 0). Parameter gradients are left as they were.

    Args:
        model: a HF causal language model (``model(ids, labels=ids).loss``).
        batches: batches of token ids, each ``[N, T]``.
        normalize: ``"layer"`` (default): divide each layer's scores by their L2 norm (Michel et al. 2019's
            ``--normalize_pruning_by_layer``); ``None``: raw scores.

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50))
        >>> scores = head_importance(model, [torch.randint(0, 50, (2, 8))])
        >>> scores.shape, [round(float(n), 4) for n in scores.norm(dim=1)]
        (torch.Size([2, 4]), [1.0, 1.0])
    """
    batches = list(batches)
    if not batches:
        raise PlasticityConfigError("head_importance: no batches given; pass at least one batch of token ids")
    gates = HeadGates(model, differentiable=True)
    saved = {name: p.grad for name, p in model.named_parameters()}
    total, count = torch.zeros_like(gates.gates), 0
    try:
        for ids in batches:
            model(ids, labels=ids).loss.backward()
            total += gates.gates.grad.abs()
            gates.gates.grad = None
            count += 1
    finally:
        gates.remove()
        for name, p in model.named_parameters():
            p.grad = saved[name]
    return normalize_importance(total / max(count, 1), normalize).cpu()


def head_weight_norms(module: nn.Module | HeadLayout) -> torch.Tensor:
    """The L2 norm of each head's weights in one attention module, ``[heads]``.

    ‖(the head's Q, K, V weights, its output-projection inputs)‖₂ of every head of one attention module → ``[heads]``
    (float32); with grouped K/V, the weights a head owns alone (see :class:`HeadLayout`).

    Args:
        module: one attention module, or its :class:`HeadLayout`.

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=4, n_embd=32, vocab_size=50))
        >>> head_weight_norms(model.transformer.h[0].attn).shape
        torch.Size([4])
    """
    layout = _as_layout(module)
    total = None
    for piece in layout.slices:
        if piece.role == "bias":
            continue
        # [.., blocks·heads·head_dim, ..] → [.., blocks, heads, head_dim, ..]: sum all but the heads axis
        blocks = piece.param.detach().unflatten(piece.dim, (len(piece.offsets), layout.num_heads, layout.head_dim))
        squares = blocks.pow(2).sum(dim=[a for a in range(blocks.ndim) if a != piece.dim + 1])
        total = squares if total is None else total + squares
    return total.sqrt().float()


@torch.no_grad()
def head_attention_entropy(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Entropy of every head's attention (nats, mean over batch and queries) on ``input_ids`` → ``[layers, heads]``.

    ``model`` is a HF GPT-2 model. Attention probabilities only exist with eager attention, so the model is switched
    to ``eager`` for this one forward pass (in eval mode, no dropout) and switched back; training is unaffected.
    Gates act after attention, so a gated-off head still has an entropy (growth uses it to choose heads).

    Args:
        model: a HF GPT-2 model.
        input_ids: token ids, ``[N, T]``.

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50))
        >>> entropy = head_attention_entropy(model, torch.randint(0, 50, (2, 8)))
        >>> entropy.shape, bool((entropy <= 2.0795).all())  # at most ln 8
        (torch.Size([2, 4]), True)
    """
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise PlasticityConfigError(
            f"head_attention_entropy needs a HF transformers model (with set_attn_implementation), got "
            f"{type(model).__name__}"
        )
    previous, was_training = model.config._attn_implementation, model.training
    model.eval()
    try:
        if previous != "eager":
            model.set_attn_implementation("eager")
        attentions = model(input_ids, output_attentions=True).attentions
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)
        model.train(was_training)
    return torch.stack([attention_entropy(a) for a in attentions]).float().cpu()


def _head_columns(module: nn.Module, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q/K/V columns of ``c_attn``, input rows of ``c_proj``) belonging to ``heads`` (GPT-2's fused layout)."""
    d, width = module.head_dim, module.num_heads * module.head_dim
    rows = (heads[:, None] * d + torch.arange(d, device=heads.device)).flatten()
    return torch.cat([rows, rows + width, rows + 2 * width]), rows


@torch.no_grad()
def reinit_heads(
    module: nn.Module | HeadLayout,
    heads: Iterable[int],
    *,
    std: float = 0.02,
    output_scale: float = 1.0,
    generator: torch.Generator | None = None,
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> None:
    """Give ``heads`` of one attention module fresh weights and clear their optimizer state.

    Give ``heads`` of one attention module fresh Q/K/V weights and output weights, and clear their optimizer state.

    The head's Q/K/V weights (GPT-2: columns of ``c_attn``; q/k/v_proj rows; with grouped K/V only its query rows)
    are drawn from N(0, std²) (GPT-2's ``initializer_range``) with zero bias; its inputs of the output projection
    (``c_proj`` rows, ``o_proj`` columns) from N(0, (output_scale·std)²) — a small ``output_scale`` lets a revived
    head start near silent. Exactly those slices of every per-element optimizer state are zeroed.

    Args:
        module: one attention module, or its :class:`HeadLayout`.
        heads: the indices of the heads to re-initialise.
        std: standard deviation of the fresh Q/K/V weights (default 0.02, GPT-2's ``initializer_range``).
        output_scale: the output weights' std relative to ``std`` (default 1.0; small values start a revived head near
            silent).
        generator: the random generator to draw from (default ``None``: torch's global one).
        optimizers: optimizers whose per-element state of the re-initialised slices is zeroed (default none).

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=4, n_embd=32, vocab_size=50))
        >>> attn = model.transformer.h[0].attn
        >>> reinit_heads(attn, [2], output_scale=0.0)
        >>> float(attn.c_proj.weight[16:24].abs().sum())
        0.0
    """
    layout = _as_layout(module)
    index = torch.as_tensor(list(heads), dtype=torch.long)
    if index.numel() == 0:
        return
    if int(index.min()) < 0 or int(index.max()) >= layout.num_heads:
        raise PlasticityConfigError(
            f"reinit_heads: heads {index.tolist()} out of range for a layer with {layout.num_heads} heads"
        )
    owned = layout.owned(index.tolist())
    # draws in slice order (producers, then the output projection): GPT-2's are those of its first version
    for role, scale in (("in", std), ("bias", None), ("out", std * output_scale)):
        for piece, rows in owned:
            if piece.role != role:
                continue
            where = rows.to(piece.param.device)
            if scale is None:
                piece.param.index_fill_(piece.dim, where, 0.0)
                continue
            shape = list(piece.param.shape)
            shape[piece.dim] = len(rows)
            fresh = torch.randn(shape, generator=generator) * scale
            piece.param.index_copy_(piece.dim, where, fresh.to(piece.param))
    for optimizer in optimizers:
        for piece, rows in owned:
            reset_optimizer_state(optimizer, piece.param, piece.dim, rows)


@torch.no_grad()
def prune_heads_(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> dict[int, list[int]]:
    """Remove heads for good (for export): slice ``c_attn`` columns and ``c_proj`` rows, update the head counts.

    ``heads`` maps a layer index (in :func:`attention_modules` order) to the heads to remove. The pruned model's
    output equals the gated model's with those gates at 0. Parameters are replaced, so optimizers built before
    must be rebuilt: this is not for use during a (DDP) fit — gate instead. Returns the heads kept per layer.
    GPT-2's fused layout only (other layouts: gate the heads, or fold the gates into the weights with
    :meth:`HeadGates.fold_`).

    Args:
        model: a HF GPT-2 model (fused ``c_attn``).
        heads: ``{layer index: heads to remove}``, layers in :func:`attention_modules` order.
    """
    layers = attention_layouts(model)
    kept_per_layer = {}
    for layer, removed in heads.items():
        if not 0 <= layer < len(layers):
            raise PlasticityConfigError(f"prune_heads_: layer {layer} out of range (the model has {len(layers)})")
        name, layout = layers[layer]
        if layout.kind != "gpt2":
            raise PlasticityConfigError(
                f"prune_heads_: {name} has the {layout.kind!r} layout; structural removal is for GPT-2's fused "
                "attention only: gate its heads (HeadGates) or fold the gates into the weights (HeadGates.fold_)"
            )
        module = layout.module
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
