"""Tests for twlib.models: published Qwen3 parameter counts, tiny presets, seeded builds."""

import pytest
import torch
from transformers import Qwen3Config

from twlib.models import (
    PRESETS,
    QWEN3_CONFIGS,
    REFERENCE_CONTEXT,
    build_model,
    count_parameters,
    meta_model,
    qwen3_config,
    tiny_config,
)
from twlib.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def params_by_hand(c: Qwen3Config) -> int:
    """Qwen3 parameter count from its config, term by term (no biases anywhere)."""
    h, q_dim, kv_dim = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = h * q_dim + 2 * h * kv_dim + q_dim * h  # q, k, v, o projections
    qk_norms = 2 * c.head_dim  # RMSNorm on q and k, per head dim, shared over heads
    mlp = 3 * h * c.intermediate_size  # gate, up, down
    layer_norms = 2 * h  # input and post-attention RMSNorm
    per_layer = attention + qk_norms + mlp + layer_norms
    embeddings = c.vocab_size * h
    lm_head = 0 if c.tie_word_embeddings else c.vocab_size * h
    final_norm = h
    return embeddings + c.num_hidden_layers * per_layer + final_norm + lm_head


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Qwen3-0.6B", 596_049_920),  # tied: "0.6B", 0.44B without embeddings
        ("Qwen3-1.7B", 1_720_574_976),  # tied: "1.7B", 1.4B without embeddings
        ("Qwen3-8B", 8_190_735_360),  # untied lm_head: the published 8.19B
    ],
)
def test_qwen3_parameter_counts(name, expected):
    config = qwen3_config(name)
    counted = count_parameters(config)
    print(f"{name}: {counted:,} parameters")
    assert counted == params_by_hand(config) == expected
    assert count_parameters(name) == expected


def test_qwen3_configs_match_published_architectures():
    c = qwen3_config("Qwen3-8B")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (4096, 36, 32, 8)
    assert (c.head_dim, c.intermediate_size, c.vocab_size) == (128, 12288, 151936)
    assert not c.tie_word_embeddings
    assert c.rope_parameters["rope_theta"] == 1e6 and c.max_position_embeddings == 40960
    small = qwen3_config("Qwen3-0.6B")
    assert small.tie_word_embeddings and small.rms_norm_eps == 1e-6
    assert (small.hidden_size, small.num_hidden_layers, small.intermediate_size) == (1024, 28, 3072)
    assert qwen3_config("Qwen3-1.7B").hidden_size == 2048
    assert set(QWEN3_CONFIGS) == {"Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-8B"}


def test_qwen3_config_context_extension_and_overrides():
    long = qwen3_config("Qwen3-8B", max_position_embeddings=REFERENCE_CONTEXT)
    assert long.max_position_embeddings == 131_072
    assert qwen3_config("Qwen3-8B", num_hidden_layers=2).num_hidden_layers == 2
    # The table itself is never mutated by a call.
    assert QWEN3_CONFIGS["Qwen3-8B"]["max_position_embeddings"] == 40960


def test_meta_model_has_no_storage():
    model = meta_model("Qwen3-8B")
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied
    tied = meta_model("Qwen3-0.6B")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


@pytest.mark.parametrize("preset, low, high", [("tiny", 0.35e6, 0.5e6), ("small", 1.2e6, 1.5e6), ("base", 3.0e6, 3.4e6)])
def test_tiny_preset_sizes(tok, preset, low, high):
    config = tiny_config(preset, vocab_size=len(tok))
    counted = count_parameters(config)
    print(f"{preset}: {counted:,} parameters")
    assert low < counted < high
    assert counted == params_by_hand(config)
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 10000.0
    assert config.max_position_embeddings == 2048 and config.head_dim == 32


def test_presets_table_shape():
    assert list(PRESETS) == ["tiny", "small", "base"]
    assert [PRESETS[p]["hidden_size"] for p in PRESETS] == [128, 192, 256]
    assert [PRESETS[p]["num_hidden_layers"] for p in PRESETS] == [2, 3, 4]


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="tiny, small, base"):
        tiny_config("huge", vocab_size=10)
    with pytest.raises(ValueError, match="Qwen3-8B"):
        qwen3_config("Qwen3-70B")
    with pytest.raises(ValueError, match="tiny"):
        build_model("nope")


def test_build_model_is_seeded_and_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("tiny", tok, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG untouched
    b = build_model("tiny", tok, seed=7)
    c = build_model("tiny", tok, seed=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_build_model_settings(tok):
    model = build_model("tiny", tok)
    assert model.config.vocab_size == len(tok) == 268
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id) == (0, 1, 1)
    assert model.generation_config.eos_token_id == 1 and model.generation_config.pad_token_id == 0
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    half = build_model("tiny", tok, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    # Same seed means the same weights in any dtype (created in fp32, then cast).
    assert torch.equal(half.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_build_model_from_config_does_not_mutate_it(tok):
    config = tiny_config("tiny", vocab_size=len(tok))
    build_model(config, tok)
    assert config.pad_token_id is None
    with pytest.raises(ValueError, match="model vocab"):
        build_model(tiny_config("tiny", vocab_size=100), tok)


def test_forward_and_backward(tok):
    model = build_model("tiny", tok)
    ids = torch.tensor([tok.encode("<Parallel>\n<Thread>\n1: 3+4=7\n</Thread>", add_special_tokens=False)] * 2)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, ids.shape[1], len(tok))
    assert torch.isfinite(out.loss)
    # A random model is close to uniform over the vocab.
    assert abs(out.loss.item() - torch.log(torch.tensor(len(tok))).item()) < 0.5
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
