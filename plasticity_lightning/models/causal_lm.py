"""Causal language model over any HF causal-LM architecture.

Causal language model over any HF causal-LM architecture (GPT-2's distilgpt2 by default), with perplexity, per-task
evaluation on continual text streams and seeded generation.
"""

from __future__ import annotations

import difflib
import inspect
from types import SimpleNamespace
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.text import Perplexity

from plasticity_lightning.core.batches import token_ids
from plasticity_lightning.core.errors import DataNotFoundError, PlasticityConfigError, check_choice, check_positive_int
from plasticity_lightning.core.hub import from_hub
from plasticity_lightning.core.rundir import NEW_TASK_LOSS_KEY, NEW_TASK_PERPLEXITY_KEY
from plasticity_lightning.core.tasks import (
    CURRENT_TASK_ACCURACY,
    SEEN_TASKS_ACCURACY,
    TASK_ID_KEY,
    TaskContext,
    get_task_context,
    per_task_accuracy_key,
)
from plasticity_lightning.metrics import PerTaskAccuracy
from plasticity_lightning.models.base import InjectedOptimizer
from plasticity_lightning.nn.generation import generate_seeded

# Architectures by name, so `pretrained: false` needs no download (GPT2Config defaults: 768 wide, 12 heads, 1024).
KNOWN_ARCHITECTURES: dict[str, dict[str, int]] = {
    "distilgpt2": {"n_layer": 6},
    "gpt2": {"n_layer": 12},
    "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
}
_GPT2_SIZES = ("n_layer", "n_head", "n_embd", "n_positions")


def causal_lm_types() -> tuple[str, ...]:
    """Every ``model_type`` transformers can build a causal LM for (``llama``, ``mistral``, ``qwen2``, ``gpt2``, …)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return tuple(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def build_config(
    model_type: str, settings: dict[str, Any], owner: str = "CausalLM", defaults: dict[str, Any] | None = None
) -> Any:
    """The HF config of a causal LM of ``model_type`` from ``settings``, checked.

    The HF config of a causal LM of ``model_type`` from ``settings`` (the config class's own field names), with a
    one-line error naming the field, the value and what is allowed for an unknown type, an unknown key (HF would keep it
    silently and build another model than the one asked for) or a value HF refuses. ``defaults`` (the library's own
    choices, such as the tokenizer's EOS id) are set unless ``settings`` names them.

    Example::

        >>> build_config("llama", {"hidden_size": 32, "num_hidden_layers": 1}).intermediate_size
        11008
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    types = causal_lm_types()
    if model_type not in types:
        close = difflib.get_close_matches(str(model_type), types, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise PlasticityConfigError(
            f"{owner}.architecture={model_type!r} is not a causal-LM model_type of transformers; {hint}choose one of "
            f"the {len(types)} in transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, e.g. gpt2, llama, mistral, qwen2, "
            "gemma, phi3"
        )
    config_class = CONFIG_MAPPING[model_type]
    parameters = inspect.signature(config_class.__init__).parameters
    attribute_map: dict[str, str] = dict(getattr(config_class, "attribute_map", {}))  # GPT-2: hidden_size → n_embd
    allowed = {*parameters, *attribute_map} - {"self", "kwargs", "args"}
    for key in settings:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise PlasticityConfigError(
                f"{owner}.config: key {key!r} (value {settings[key]!r}) is not a field of {config_class.__name__}; "
                f"{hint}allowed: {', '.join(sorted(allowed))}"
            )
    # Checked before HF's own checks, so the line is the same whatever transformers release: from 5 on the config
    # classes refuse a wrong type or a width the heads do not divide themselves; 4.x builds such a config silently.
    declared = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    for key, value in settings.items():
        default = declared.get(attribute_map.get(key, key))
        if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
            raise PlasticityConfigError(
                f"{owner}.config: field {key!r} expected {type(default).__name__}, got str (value: {value!r}); "
                f"{config_class.__name__}'s default is {default!r}"
            )
    given = {**(defaults or {}), **settings}
    fields = {**declared, **{attribute_map.get(key, key): value for key, value in given.items()}}
    fields.update({alias: fields[field] for alias, field in attribute_map.items() if field in fields})
    _check_heads(SimpleNamespace(**fields), settings, owner, config_class.__name__, attribute_map)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # huggingface_hub before strict dataclasses: configs raise ValueError/TypeError themselves
        StrictDataclassError = ValueError
    try:
        config = AutoConfig.for_model(model_type, **{**(defaults or {}), **settings})
    except (TypeError, ValueError, StrictDataclassError) as err:  # types, hidden size vs heads, ...
        reason = str(err).strip().splitlines()[-1].strip()
        raise PlasticityConfigError(
            f"{owner}.config={settings!r} is refused by {config_class.__name__}: {reason}"
        ) from None
    _check_heads(config, settings, owner, config_class.__name__, attribute_map)  # the values HF derived as well
    return config


def _check_heads(
    config: Any, settings: dict[str, Any], owner: str, config_name: str, attribute_map: dict[str, str]
) -> None:
    """Head counts that HF accepts but torch fails on in the first forward pass.

    Head counts that HF accepts in the config but torch fails on in the first forward pass (a shape mismatch deep in
    attention): key/value heads that do not divide the query heads (grouped-query attention, e.g. Mistral's default of 8
    key/value heads left beside 4 query heads), or a width the heads do not divide. ``config`` is read with ``getattr``:
    the fields the config class declares (before HF checks them), then the config HF built.
    """
    # the user's spelling of a field (GPT-2 calls num_attention_heads n_head)
    spelled = attribute_map  # {"num_attention_heads": "n_head", ...}

    def name(field: str) -> str:
        own = spelled.get(field, field)
        return field if field in settings and own not in settings else own

    def origin(field: str) -> str:
        return "" if name(field) in settings else f" ({config_name}'s default)"

    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads <= 0:
        return
    kv_heads = getattr(config, "num_key_value_heads", None)
    if isinstance(kv_heads, int) and (kv_heads <= 0 or heads % kv_heads):
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise PlasticityConfigError(
            f"{owner}.config: {name('num_key_value_heads')}={kv_heads}{origin('num_key_value_heads')} does not divide "
            f"{name('num_attention_heads')}={heads}; allowed: a divisor of {heads} ({', '.join(map(str, divisors))}; "
            f"{heads} is plain multi-head attention)"
        )
    hidden = getattr(config, "hidden_size", None)
    explicit_head_dim = "head_dim" in settings and settings["head_dim"] is not None
    if isinstance(hidden, int) and not explicit_head_dim and hidden % heads:
        raise PlasticityConfigError(
            f"{owner}.config: {name('hidden_size')}={hidden}{origin('hidden_size')} is not a multiple of "
            f"{name('num_attention_heads')}={heads}{origin('num_attention_heads')}; allowed: a width that the heads "
            "divide (or an explicit head_dim where the architecture has one)"
        )


class PerTaskTokenLoss(Metric):
    """Mean next-token cross-entropy (nats) per continual task, summed over tokens and across processes.

    NaN for a task with no tokens (not evaluated is not a loss of 0). ``exp`` of it is the task's perplexity, as
    torchmetrics' ``Perplexity`` computes it over all tokens.

    Example::

        >>> metric = PerTaskTokenLoss(num_tasks=3)
        >>> metric.update(torch.tensor([[1.0, 3.0], [2.0, 2.0]]), torch.tensor([0, 2]))
        >>> metric.compute()
        tensor([2., nan, 2.], dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    nll: torch.Tensor
    tokens: torch.Tensor

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_tasks = check_positive_int("PerTaskTokenLoss", "num_tasks", num_tasks)
        self.add_state("nll", default=torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, token_nll: torch.Tensor, task_ids: torch.Tensor) -> None:
        """``token_nll``: ``[N, T]`` per-token losses of ``N`` blocks; ``task_ids``: ``[N]`` each block's task."""
        tasks = task_ids.long()[:, None].expand_as(token_nll).flatten()
        self.nll += torch.bincount(tasks, weights=token_nll.detach().flatten().double(), minlength=self.num_tasks)
        self.tokens += torch.bincount(tasks, minlength=self.num_tasks)

    def compute(self) -> torch.Tensor:
        mean = self.nll / self.tokens.clamp(min=1)
        return torch.where(self.tokens > 0, mean, torch.full_like(mean, float("nan")))


class CausalLM(InjectedOptimizer, pl.LightningModule):
    """A causal language model of any HF architecture (GPT-2 by default) as a LightningModule.

    ``pretrained: true`` loads weights (and architecture) with ``from_pretrained(model_name_or_path)`` — from the HF
    hub, its cache or a local directory — and fails with one line when none is reachable. ``pretrained: false``
    builds an architecture from its config, with no download:

    * GPT-2 (the default): the named one (distilgpt2: 6 layers × 12 heads × 768), or a smaller one with
      ``n_layer`` / ``n_head`` / ``n_embd`` / ``n_positions``;
    * any other: ``architecture`` (a transformers ``model_type``: ``llama``, ``mistral``, ``qwen2``, ``gemma``, …; or
      ``config: {model_type: ...}``) with ``config``, the config class's own fields (``hidden_size``,
      ``intermediate_size``, ``num_hidden_layers``, …), built by ``AutoModelForCausalLM.from_config``. Unknown keys
      and values HF refuses fail at construction, in one line.

    The vocabulary size comes from the datamodule's tokenizer unless given (``vocab_size`` or ``config``), and so do
    the BOS/EOS ids. Logs ``train/loss``, ``val/loss`` and ``val/perplexity`` (torchmetrics). On a continual text
    stream (:class:`~plasticity_lightning.data.TextDataModule` with a ``TextParts`` schedule) it also logs, per
    evaluated task ``k``: ``val/loss_task_<k>``, ``val/perplexity_task_<k>`` and ``val/acc_task_<k>`` (next-token
    accuracy, which :class:`~plasticity_lightning.callbacks.TaskAccuracyTable` and ``plasticity report`` read as the
    task's accuracy), the same for the task being trained (``val/loss_current_task``, ``val/perplexity_current_task``,
    ``val/acc_current_task``), and ``task_id`` with every training step.

    Args:
        model_name_or_path: ``distilgpt2``, ``gpt2``, ``gpt2-medium`` or a directory.
        pretrained: load weights, or build the architecture fresh.
        n_layer: GPT-2 layers (``pretrained: false``).
        n_head: GPT-2 attention heads per layer (``pretrained: false``).
        n_embd: GPT-2 width (``pretrained: false``).
        n_positions: GPT-2 context length (``pretrained: false``).
        vocab_size: vocabulary size (default: the datamodule tokenizer's).
        architecture: a transformers causal-LM ``model_type`` built from ``config`` (``pretrained: false``).
        config: fields of that architecture's config class (may hold ``model_type`` instead of ``architecture``).
        attn_implementation: ``"sdpa"`` or ``"eager"`` (eager returns attention probabilities).
        optimizer: as in :class:`~plasticity_lightning.models.SupervisedModule`.
        lr_scheduler: as in :class:`~plasticity_lightning.models.SupervisedModule`.
        lr_scheduler_interval: as in :class:`~plasticity_lightning.models.SupervisedModule`.
        lr_scheduler_monitor: as in :class:`~plasticity_lightning.models.SupervisedModule`.

    Example::

        >>> lm = CausalLM(pretrained=False, n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=100)
        >>> lm.configure_model()
        >>> lm(torch.randint(0, 100, (2, 10))).shape
        torch.Size([2, 10, 100])
        >>> llama = CausalLM(pretrained=False, architecture="llama", vocab_size=100, config={
        ...     "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4})
        >>> llama.configure_model()
        >>> type(llama.model).__name__, llama(torch.randint(0, 100, (2, 10))).shape
        ('LlamaForCausalLM', torch.Size([2, 10, 100]))
    """

    # where the weights first came from and how attention is computed: a resumed run's checkpoint overrides both
    training_hparams = (*InjectedOptimizer.training_hparams, "pretrained", "attn_implementation")

    def __init__(
        self,
        model_name_or_path: str = "distilgpt2",
        pretrained: bool = True,
        n_layer: int | None = None,
        n_head: int | None = None,
        n_embd: int | None = None,
        n_positions: int | None = None,
        vocab_size: int | None = None,
        architecture: str | None = None,
        config: dict[str, Any] | None = None,
        attn_implementation: Literal["sdpa", "eager"] = "sdpa",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "step",
        lr_scheduler_monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        check_choice("CausalLM", "attn_implementation", attn_implementation, ("sdpa", "eager"))
        self._model_type = self._check_architecture(
            pretrained, architecture, config, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions
        )
        if (
            not pretrained
            and self._model_type is None
            and model_name_or_path not in KNOWN_ARCHITECTURES
            and n_layer is None
        ):
            raise PlasticityConfigError(
                f"CausalLM.model_name_or_path={model_name_or_path!r} with pretrained=false: name one of "
                f"{', '.join(KNOWN_ARCHITECTURES)}, give n_layer/n_head/n_embd, or give architecture + config"
            )
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model: Any = None
        self.val_perplexity = Perplexity()
        # per-task scores of a continual text stream, built in setup() once the stream's length is known
        self.task_scores = nn.ModuleDict()

    @staticmethod
    def _check_architecture(
        pretrained: bool, architecture: str | None, config: dict[str, Any] | None, **gpt2_sizes: int | None
    ) -> str | None:
        """The ``model_type`` to build from ``config``, with the config checked now.

        The ``model_type`` to build from ``config`` (``None``: GPT-2 by name), with the config checked now, so a bad
        recipe fails before any data is read.
        """
        if config is not None and not isinstance(config, dict):
            raise PlasticityConfigError(
                f"CausalLM.config={config!r} is invalid; expected a mapping of config fields, e.g. "
                "{hidden_size: 64, num_hidden_layers: 2}"
            )
        settings = dict(config or {})
        model_type = settings.pop("model_type", None)
        if architecture is not None and model_type is not None and architecture != model_type:
            raise PlasticityConfigError(
                f"CausalLM.architecture={architecture!r} contradicts config.model_type={model_type!r}; give one of them"
            )
        model_type = architecture or model_type
        if model_type is None and config is not None:
            raise PlasticityConfigError(
                f"CausalLM.config={config!r} has no model_type: give architecture (e.g. llama) or config.model_type"
            )
        if model_type is None:
            return None
        if pretrained:
            raise PlasticityConfigError(
                f"CausalLM.architecture={model_type!r} with pretrained=true: a pretrained model brings its own "
                "architecture (model_name_or_path); set pretrained: false to build this one from its config"
            )
        given = [name for name, value in gpt2_sizes.items() if value is not None]
        if given:
            raise PlasticityConfigError(
                f"CausalLM.{given[0]}={gpt2_sizes[given[0]]!r} is a GPT-2 size; with architecture={model_type!r} give "
                "the sizes in config with that architecture's own names (e.g. num_hidden_layers, hidden_size)"
            )
        build_config(model_type, settings)
        return model_type

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import GPT2Config, GPT2LMHeadModel

        hp = self.hparams
        if hp.pretrained:
            try:
                self.model = from_hub(
                    GPT2LMHeadModel.from_pretrained, hp.model_name_or_path, attn_implementation=hp.attn_implementation
                )
            except OSError as err:
                raise DataNotFoundError(
                    f"CausalLM: pretrained weights {hp.model_name_or_path!r} are not reachable (no network, cache or "
                    "directory); set pretrained: false to train the architecture from scratch"
                ) from err
            return
        settings = {k: v for k, v in (hp.get("config") or {}).items() if k != "model_type"}
        vocab = hp.vocab_size or settings.pop("vocab_size", None) or self._datamodule_vocab()
        # GPT-2's <|endoftext|> is 50256, Llama's BOS/EOS 1/2; a tokenizer trained on the data has its own
        # (generation stops at it)
        eos = getattr(self._datamodule_tokenizer(), "eos_token_id", None)
        special = {"bos_token_id": eos, "eos_token_id": eos} if eos is not None and eos < vocab else {}
        if self._model_type is not None:
            from transformers import AutoModelForCausalLM

            config = build_config(self._model_type, {**settings, "vocab_size": vocab}, defaults=special)
            self.model = AutoModelForCausalLM.from_config(config, attn_implementation=hp.attn_implementation)
            return
        overrides = {k: hp[k] for k in _GPT2_SIZES if hp[k] is not None}
        config = GPT2Config(
            **{**KNOWN_ARCHITECTURES.get(hp.model_name_or_path, {}), **overrides},
            vocab_size=vocab,
            attn_implementation=hp.attn_implementation,
            **special,
        )
        self.model = GPT2LMHeadModel(config)

    def _datamodule_tokenizer(self) -> Any:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "tokenizer", None)

    def _datamodule_vocab(self) -> int:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "vocab_size"):
            raise PlasticityConfigError(
                "CausalLM.vocab_size is unknown: give it, or train with a datamodule that has a tokenizer "
                "(TextDataModule)"
            )
        return datamodule.vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            raise PlasticityConfigError("CausalLM has no model yet: call configure_model() or fit it")
        return self.model(input_ids).logits

    def setup(self, stage: str) -> None:
        context = get_task_context(self.trainer)
        if context is None:
            self.task_scores.clear()
            return
        scores = self.task_scores["val"] if "val" in self.task_scores else None  # noqa: SIM401 (no .get)
        if scores is None or scores["loss"].num_tasks != context.num_tasks:
            self.task_scores["val"] = nn.ModuleDict(
                {"loss": PerTaskTokenLoss(context.num_tasks), "acc": PerTaskAccuracy(context.num_tasks)}
            )

    def _task_context(self) -> TaskContext | None:
        return get_task_context(self._trainer) if self._trainer is not None else None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids = token_ids(batch)
        loss = self.model(ids, labels=ids).loss
        self.log("train/loss", loss, prog_bar=True)
        context = self._task_context()
        if context is not None:  # every step: Lightning writes the last logged value, which must be current
            self.log(TASK_ID_KEY, float(context.task_id), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ids = token_ids(batch)
        logits = self(ids)
        preds, targets = logits[:, :-1].float(), ids[:, 1:]
        self.val_perplexity.update(preds, targets)
        loss = F.cross_entropy(preds.flatten(0, 1), targets.flatten())
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/perplexity", self.val_perplexity, prog_bar=True)
        task_ids = _block_tasks(batch)
        if task_ids is not None and "val" in self.task_scores:
            scores = self.task_scores["val"]
            scores["loss"].update(F.cross_entropy(preds.transpose(1, 2), targets, reduction="none"), task_ids)
            token_tasks = task_ids[:, None].expand_as(targets).flatten()
            scores["acc"].update(preds.argmax(-1).flatten(), targets.flatten(), token_tasks)

    def on_validation_epoch_end(self) -> None:
        scores = self.task_scores["val"] if "val" in self.task_scores else None  # noqa: SIM401 (no .get)
        if scores is None or not scores["loss"].update_called:  # same on every rank (equal batch counts)
            return
        # synchronised across processes by torchmetrics
        loss, accuracy = scores["loss"].compute().reshape(-1), scores["acc"].compute().reshape(-1)
        scores["loss"].reset()
        scores["acc"].reset()
        evaluated = [k for k in range(len(loss)) if not torch.isnan(loss[k])]
        values: dict[str, torch.Tensor] = {}
        for k in evaluated:
            values[f"val/loss_task_{k}"] = loss[k].float()
            values[f"val/perplexity_task_{k}"] = loss[k].exp().float()
            values[per_task_accuracy_key("val", k)] = accuracy[k]
        context = self._task_context()
        if context is not None and context.task_id in evaluated:
            values[NEW_TASK_LOSS_KEY] = loss[context.task_id].float()
            values[NEW_TASK_PERPLEXITY_KEY] = loss[context.task_id].exp().float()
            values[CURRENT_TASK_ACCURACY.format(stage="val")] = accuracy[context.task_id]
        seen = [k for k in evaluated if context is not None and k <= context.task_id]
        if seen:
            values["val/loss_seen_tasks"] = loss[seen].mean().float()
            values[SEEN_TASKS_ACCURACY.format(stage="val")] = accuracy[seen].mean()
        # already reduced across ranks: sync_dist only averages identical numbers
        self.log_dict(values, on_step=False, on_epoch=True, sync_dist=True)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, seed: int = 0, **kwargs: Any) -> torch.Tensor:
        """Seeded sampling (top-k 50 unless given).

        The same prompt and seed give the same text, and the global RNG is left as it was.
        """
        return generate_seeded(self.model, input_ids, max_new_tokens, seed, owner="CausalLM", **kwargs)


def _block_tasks(batch: Any) -> torch.Tensor | None:
    """The task of every block of an evaluation batch ``(input_ids, task_ids)`` (TextDataModule with TextParts)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        return batch[1] if batch[1].ndim == 1 and batch[1].shape[0] == batch[0].shape[0] else None
    return None
