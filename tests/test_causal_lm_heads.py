"""Head counts HF accepts but torch would fail on: one line naming the field, the value and what is allowed."""

import pytest

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.models.causal_lm import build_config

SMALL = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}


@pytest.mark.parametrize(
    ("architecture", "settings", "message"),
    [
        # GQA left at the architecture's default number of key/value heads (8 for Mistral, 32 for Qwen2)
        ("mistral", SMALL, r"num_key_value_heads=8 \(MistralConfig's default\) does not divide num_attention_heads=4"),
        ("qwen2", SMALL, r"num_key_value_heads=32 \(Qwen2Config's default\) does not divide num_attention_heads=4"),
        ("llama", {**SMALL, "num_key_value_heads": 3}, r"num_key_value_heads=3 does not divide num_attention_heads=4"),
        # GPT-2 spells them n_embd / n_head: the message uses the user's names
        ("gpt2", {"n_embd": 60, "n_head": 8, "n_layer": 1}, r"n_embd=60 is not a multiple of n_head=8"),
        (
            "gpt2",
            {"hidden_size": 60, "num_attention_heads": 8},
            r"hidden_size=60 is not a multiple of num_attention_heads=8",
        ),
        ("gpt2", {"n_embd": 64}, r"n_embd=64 is not a multiple of n_head=12 \(GPT2Config's default\)"),
    ],
)
def test_inconsistent_heads_fail_in_one_line(architecture, settings, message):
    with pytest.raises(PlasticityConfigError, match=rf"^CausalLM\.config: {message}; allowed: ") as error:
        build_config(architecture, settings)
    assert "\n" not in str(error.value)


def test_consistent_grouped_query_attention_is_built():
    config = build_config("mistral", {**SMALL, "num_key_value_heads": 2})
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
