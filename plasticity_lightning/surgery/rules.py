"""Pairing rules: which child of a standard block produces hidden units and which consumes them.

Pairing rules: which child of a standard block produces hidden units and which consumes them, read from the block's
structure before any trace.

A whole-model ``torch.fx`` trace fails on most real transformers (dynamic shapes, cache objects, ``**kwargs``), and
where it works it cannot see through gated products or activations it does not know. A :class:`PairingRule` names,
for one kind of block, the producer, the consumer and what lies between them; :func:`find_unit_pairs
<plasticity_lightning.surgery.find_unit_pairs>` applies the registered rules to every block of a model first and
traces only what no rule covers.

The built-in rules (:data:`DEFAULT_RULES`):

==========================  ===========================================  ===========================================
rule                        blocks                                        producer → consumer
==========================  ===========================================  ===========================================
``torch_transformer``       ``nn.TransformerEncoderLayer`` / ``Decoder``  ``linear1 → linear2``
``hf_gpt2_mlp``             HF ``*MLP`` (GPT-2, GPT-Neo, ImageGPT)        ``c_fc → c_proj`` (``Conv1D``: transposed)
``hf_gated_mlp``            HF ``*MLP`` (Llama, Mistral, Qwen2, Gemma)    ``gate_proj`` and ``up_proj → down_proj``
``hf_fused_gated_mlp``      HF ``*MLP`` (Phi3, GLM, GLM-4)                ``gate_up_proj`` (both halves) ``→ down_proj``
``hf_neox_mlp``             HF ``*MLP`` (GPT-NeoX, Falcon)                ``dense_h_to_4h → dense_4h_to_h``
``hf_fc_mlp``               HF ``*MLP``/``*Layer`` (OPT, BART, CLIP, Phi)  ``fc1 → fc2``
``hf_intermediate``         HF ``*Layer`` (BERT, RoBERTa, ViT)            ``intermediate.dense → output.dense``
``hf_t5_mlp``               HF T5 ``DenseActDense`` / gated               ``wi → wo`` / ``wi_0`` and ``wi_1 → wo``
``timm_mlp``                timm ``Mlp`` (ViT, ConvNeXt, MLP-Mixer)       ``fc1 → (norm) → fc2``
``timm_swiglu``             timm ``SwiGLU``                               ``fc1_g`` and ``fc1_x → (norm) → fc2``
``convnext``                HF ``ConvNextLayer``, the original ``Block``  ``pwconv1 → pwconv2``
``attention``               attention blocks (torch, HF, timm)            none: heads mix units (see head surgery)
==========================  ===========================================  ===========================================

A *gated* block (``partners``) computes ``down(act(gate(x)) * up(x))``: a unit is one intermediate index, and
replacing it re-initialises that row of every producer (gate and up) and zeroes the consumer's column. A *fused*
block (``fused=2``) computes gate and up with one weight, ``gate, up = gate_up(x).chunk(2, dim=-1)``: unit ``i`` owns
rows ``i`` and ``U + i`` of it (``U`` units), and both are re-initialised with it.

Register a rule for your own block in a few lines::

    from plasticity_lightning.surgery import PairingRule, register_pairing_rule

    register_pairing_rule(PairingRule("my_ffn", blocks=(MyFeedForward,), producer="up", consumer="down",
                                      activation="act"))

It applies to blocks of exactly that class (a subclass may compute something else, so it needs a rule of its own)
whose producer and consumer children exist. Blocks may also be given by class name or by a pattern on the
qualified class name (``"mypackage.*FFN"``), so a rule needs no import of the package it describes. A rule
registered later is tried before the earlier ones. A rule with no producer says a block has no unit pairs (it is
read, and no trace is attempted inside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError


@dataclass(frozen=True)
class PairingRule:
    """How the units of one kind of block pair up, by the names of its children.

    Attributes:
        name: the rule's name (in logs; :func:`unregister_pairing_rule` removes by it).
        blocks: the block classes it applies to: classes (exact type), class names (``"GPT2MLP"``) or
            ``fnmatch`` patterns on the qualified class name (``"transformers.*MLP"``).
        producer: dotted path of the child whose output rows / channels are the units (``None``: no pairs).
        consumer: dotted path of the child that reads them.
        partners: further producers of the same units, re-initialised with them (gated MLPs: ``("up_proj",)``).
        norms: per-unit normalisation children between producer and consumer (absent or ``Identity`` ones are
            ignored).
        activation: child holding the activation between them, if any (its kind sets init gains).
        fused: projections the producer computes in one weight, split along its output with ``.chunk(fused,
            dim=-1)`` before they are combined per index (Phi3's ``gate_up_proj``: 2). A unit is one index of every
            chunk: it owns rows ``i``, ``U + i``, … of the producer (a ``Linear``), all re-initialised with it.

    Example::

        >>> rule = PairingRule("ffn", blocks=(nn.TransformerEncoderLayer,), producer="linear1", consumer="linear2")
        >>> rule.matches(nn.TransformerEncoderLayer(8, 2))
        True
    """

    name: str
    blocks: tuple[type[nn.Module] | str, ...]
    producer: str | None = None
    consumer: str | None = None
    partners: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    activation: str | None = None
    fused: int = 1

    def __post_init__(self) -> None:
        owner = f"PairingRule({self.name!r})"
        if not isinstance(self.name, str) or not self.name:
            raise PlasticityConfigError(f"PairingRule.name={self.name!r} is invalid; expected a non-empty string")
        blocks = (self.blocks,) if isinstance(self.blocks, (str, type)) else tuple(self.blocks)
        if not blocks or not all(
            isinstance(b, str) or (isinstance(b, type) and issubclass(b, nn.Module)) for b in blocks
        ):
            raise PlasticityConfigError(
                f"{owner}.blocks={self.blocks!r} is invalid; expected nn.Module classes, class names or patterns"
            )
        object.__setattr__(self, "blocks", blocks)
        if (self.producer is None) != (self.consumer is None):
            raise PlasticityConfigError(
                f"{owner}: producer={self.producer!r} and consumer={self.consumer!r} must both be given (or neither, "
                "for a block without unit pairs)"
            )
        for field in ("partners", "norms"):
            value = getattr(self, field)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise PlasticityConfigError(f"{owner}.{field}={value!r} is invalid; expected a tuple of child names")
            object.__setattr__(self, field, tuple(value))
        if isinstance(self.fused, bool) or not isinstance(self.fused, int) or self.fused < 1:
            raise PlasticityConfigError(
                f"{owner}.fused={self.fused!r} is invalid; expected a positive int (2 for a fused gate/up projection)"
            )

    @property
    def gated(self) -> bool:
        """Whether the units are a product of several producers (their activation is not the unit's value)."""
        return bool(self.partners) or self.fused > 1

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module``'s class is one of :attr:`blocks` (exact type: subclasses may compute otherwise)."""
        cls = type(module)
        qualified = f"{cls.__module__}.{cls.__qualname__}"
        for block in self.blocks:
            if isinstance(block, type):
                if cls is block:
                    return True
            elif block in (cls.__name__, qualified) or fnmatchcase(qualified, block):
                return True
        return False

    def applies(self, module: nn.Module) -> bool:
        """Whether the rule reads ``module``: its class matches and the named producer/consumer children exist."""
        if not self.matches(module):
            return False
        if self.producer is None:
            return True
        return all(_child(module, path) is not None for path in (self.producer, self.consumer, *self.partners))


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


_HF_MLP = ("transformers.*MLP", "transformers.*Mlp")
DEFAULT_RULES: tuple[PairingRule, ...] = (
    PairingRule(
        "torch_transformer",
        blocks=(nn.TransformerEncoderLayer, nn.TransformerDecoderLayer),
        producer="linear1",
        consumer="linear2",
        activation="activation",
    ),
    PairingRule("hf_gpt2_mlp", blocks=_HF_MLP, producer="c_fc", consumer="c_proj", activation="act"),
    PairingRule(
        "hf_gated_mlp",
        blocks=_HF_MLP,
        producer="gate_proj",
        partners=("up_proj",),
        consumer="down_proj",
        activation="act_fn",
    ),
    # Phi3, GLM, GLM-4, Dia: `gate, up = gate_up_proj(x).chunk(2, dim=-1)`, then `down_proj(up * act(gate))`
    PairingRule(
        "hf_fused_gated_mlp",
        blocks=_HF_MLP,
        producer="gate_up_proj",
        consumer="down_proj",
        fused=2,
        activation="activation_fn",
    ),
    PairingRule("hf_neox_mlp", blocks=_HF_MLP, producer="dense_h_to_4h", consumer="dense_4h_to_h", activation="act"),
    PairingRule(
        "hf_fc_mlp",
        blocks=(*_HF_MLP, "transformers.*Layer"),
        producer="fc1",
        consumer="fc2",
        activation="activation_fn",
    ),
    PairingRule(
        "hf_intermediate",
        blocks=("transformers.*Layer",),
        producer="intermediate.dense",
        consumer="output.dense",
        activation="intermediate.intermediate_act_fn",
    ),
    PairingRule("hf_t5_mlp", blocks=("transformers.*DenseActDense",), producer="wi", consumer="wo", activation="act"),
    PairingRule(
        "hf_t5_gated_mlp",
        blocks=("transformers.*DenseGatedActDense",),
        producer="wi_0",
        partners=("wi_1",),
        consumer="wo",
        activation="act",
    ),
    PairingRule(
        "timm_mlp", blocks=("timm.layers.mlp.Mlp",), producer="fc1", consumer="fc2", norms=("norm",), activation="act"
    ),
    PairingRule(
        "timm_swiglu",
        blocks=("timm.layers.mlp.SwiGLU",),
        producer="fc1_g",
        partners=("fc1_x",),
        consumer="fc2",
        norms=("norm",),
        activation="act",
    ),
    # ConvNeXt V1 only: V2's global response norm mixes the units between pwconv1 and pwconv2
    PairingRule(
        "convnext",
        blocks=("transformers.*.ConvNextLayer", "*convnext*.Block"),
        producer="pwconv1",
        consumer="pwconv2",
        activation="act",
    ),
    PairingRule(
        "attention",
        blocks=(nn.MultiheadAttention, "transformers.*Attention", "timm.*Attention"),
    ),
)

_RULES: list[PairingRule] = list(DEFAULT_RULES)


def register_pairing_rule(rule: PairingRule) -> PairingRule:
    """Add ``rule``; it is tried before every rule registered earlier (so it can refine a built-in one).

    A rule with the name of a registered one replaces it.

    Args:
        rule: the rule to add (see :class:`PairingRule`).

    Example::

        >>> class FFN(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.up, self.down = nn.Linear(4, 16), nn.Linear(16, 4)
        ...     def forward(self, x):
        ...         return self.down(nn.functional.gelu(self.up(x)))
        >>> _ = register_pairing_rule(PairingRule("ffn", blocks=(FFN,), producer="up", consumer="down"))
        >>> from plasticity_lightning.surgery import find_unit_pairs
        >>> [(p.producer, p.consumer) for p in find_unit_pairs(nn.Sequential(FFN(), nn.Linear(4, 2)))]
        [('0.up', '0.down')]
        >>> unregister_pairing_rule("ffn")
    """
    if not isinstance(rule, PairingRule):
        raise PlasticityConfigError(f"register_pairing_rule: expected a PairingRule, got {type(rule).__name__}")
    unregister_pairing_rule(rule.name)
    _RULES.insert(0, rule)
    return rule


def unregister_pairing_rule(name: str) -> None:
    """Remove the rule called ``name`` (nothing happens if there is none).

    Args:
        name: the rule's ``name``.
    """
    _RULES[:] = [rule for rule in _RULES if rule.name != name]


def pairing_rules() -> tuple[PairingRule, ...]:
    """The registered rules, in the order they are tried."""
    return tuple(_RULES)


def rule_for(module: nn.Module) -> PairingRule | None:
    """The first registered rule that reads ``module``, or ``None``."""
    return next((rule for rule in _RULES if rule.applies(module)), None)
