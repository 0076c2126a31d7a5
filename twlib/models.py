"""
Models for ThreadWeaver Lab: tiny Qwen3 presets that train on a laptop CPU, and the real
Qwen3 architectures (for parameter counts and configs, never for weights).

Design choices:
- Same architecture as the paper's base model (Qwen3ForCausalLM from transformers: GQA,
  q/k RMSNorm, SwiGLU, RoPE), only smaller. Every trick that works on the tiny model
  (trie masks, KV forking, position ids) then carries over to Qwen3-8B unchanged.
- Three presets sized by measured CPU throughput (2 cores, fp32, sdpa):
      tiny  hidden 128 / 2 layers  ~0.43M params  15-22k tok/s
      small hidden 192 / 3 layers  ~1.34M params  ~8k tok/s
      base  hidden 256 / 4 layers  ~3.22M params  ~3-4k tok/s
  (counts with the 268-token byte tokenizer). head_dim is 32 everywhere and the MLP is
  3x hidden; embeddings are tied, since at this size the embedding is a large share.
- The vocab is always the tokenizer's exact length: no padding to a multiple of 64, so
  ids and rows line up one to one. Exception: `qwen3-tiny` (REAL_TOKENIZER_PRESETS), Qwen3's
  architecture at toy size for Qwen3's real tokenizer, keeps Qwen3's padded 151,936 rows.
- Seeded init runs inside torch.random.fork_rng: the same seed gives the same weights,
  and the caller's global RNG state is left alone. Weights are created in fp32 on CPU and
  then moved/cast, so the seed means the same thing on every device and dtype.
- Big configs are only ever built on the meta device (shapes, no storage), which is how
  count_parameters("Qwen3-8B") costs no memory.
- No weights are downloaded anywhere: model hubs are unreachable on the project machines.
"""

import copy

import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM


def _tiny(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> dict:
    """One tiny preset; the fields shared by all presets live here."""
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate_size=intermediate,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        sliding_window=None,
    )


PRESETS: dict[str, dict] = {
    "tiny": _tiny(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384),
    "small": _tiny(hidden=192, layers=3, heads=6, kv_heads=2, intermediate=576),
    "base": _tiny(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=768),
}


def _qwen3(hidden: int, layers: int, heads: int, intermediate: int, tied: bool) -> dict:
    """One published Qwen3 architecture; the fields all three sizes share live here."""
    return dict(
        vocab_size=151936,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=intermediate,
        tie_word_embeddings=tied,
        rope_theta=1_000_000.0,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        attention_bias=False,
        sliding_window=None,
        bos_token_id=151643,  # <|endoftext|>
        eos_token_id=151645,  # <|im_end|>
    )


QWEN3_CONFIGS: dict[str, dict] = {
    "Qwen3-0.6B": _qwen3(hidden=1024, layers=28, heads=16, intermediate=3072, tied=True),
    "Qwen3-1.7B": _qwen3(hidden=2048, layers=28, heads=16, intermediate=6144, tied=True),
    "Qwen3-8B": _qwen3(hidden=4096, layers=36, heads=32, intermediate=12288, tied=False),
}

# The reference ThreadWeaver runs extend Qwen3-8B's context to this many positions.
REFERENCE_CONTEXT = 131_072

# Qwen3 architecture and vocabulary at toy size, for Qwen3's REAL tokenizer (never the byte tokenizer):
# `python -m twlib prepare-model --preset qwen3-tiny --tokenizer DIR --out models/qwen3-tiny` writes it with
# random weights and the thread tags added. Every field but the four sizes is Qwen3's (the 151,936-row
# embedding included, so prepare-model's tags land in existing rows as on the real checkpoints). The
# embedding is 99% of its 4.9M parameters; the LM head over 151,936 tokens is then most of a CPU step's
# work, so the hidden size is 32. It exercises every full-scale entry point except learning anything.
QWEN3_TINY = "qwen3-tiny"
REAL_TOKENIZER_PRESETS: dict[str, dict] = {
    QWEN3_TINY: {**_qwen3(hidden=32, layers=2, heads=2, intermediate=96, tied=True),
                 "num_key_value_heads": 1, "head_dim": 16},
}


def _lookup(table: dict[str, dict], name: str, kind: str) -> dict:
    """table[name] as a fresh dict, or a ValueError that lists the valid names."""
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(table)}")
    return dict(table[name])


def tiny_config(preset: str, vocab_size: int, **overrides) -> Qwen3Config:
    """Qwen3Config for a tiny preset; overrides win over the preset's fields."""
    fields = _lookup(PRESETS, preset, "preset")
    return Qwen3Config(**{**fields, "vocab_size": vocab_size, **overrides})


def qwen3_config(name: str, max_position_embeddings: int | None = None, **overrides) -> Qwen3Config:
    """Qwen3Config of a published Qwen3 size.

    Pass max_position_embeddings=REFERENCE_CONTEXT for the reference's 8B run. Only the
    position limit changes; RoPE scaling (e.g. YaRN) can be added through overrides.
    """
    fields = _lookup(QWEN3_CONFIGS, name, "Qwen3 config")
    if max_position_embeddings is not None:
        fields["max_position_embeddings"] = max_position_embeddings
    return Qwen3Config(**{**fields, **overrides})


def default_vocab_size() -> int:
    """Vocab of the project's byte tokenizer (with tags): used when no tokenizer is given."""
    from twlib.tokenizer import build_tokenizer

    return len(build_tokenizer())


def resolve_config(preset_or_config, tokenizer=None) -> Qwen3Config:
    """Turn a preset name, a Qwen3 name or a Qwen3Config into a Qwen3Config (a copy).

    `qwen3-tiny` (REAL_TOKENIZER_PRESETS) has Qwen3's own 151,936-token vocabulary: pass Qwen3's tokenizer
    (its special-token ids go into the config); the byte tokenizer fits it too but makes no sense with it.

    Copying matters: transformers keeps a reference to the config inside the model, and
    we write token ids into it.
    """
    if isinstance(preset_or_config, Qwen3Config):
        config = copy.deepcopy(preset_or_config)
    elif preset_or_config in QWEN3_CONFIGS:
        config = qwen3_config(preset_or_config)
    elif preset_or_config in PRESETS:
        vocab = len(tokenizer) if tokenizer is not None else default_vocab_size()
        config = tiny_config(preset_or_config, vocab_size=vocab)
    elif preset_or_config in REAL_TOKENIZER_PRESETS:
        config = Qwen3Config(**_lookup(REAL_TOKENIZER_PRESETS, preset_or_config, "preset"))
    else:
        valid = ", ".join([*PRESETS, *REAL_TOKENIZER_PRESETS, *QWEN3_CONFIGS])
        raise ValueError(f"unknown model {preset_or_config!r}; valid: {valid} or a Qwen3Config")

    if tokenizer is not None:
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, model vocab only {config.vocab_size}")
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        # Qwen3 uses <|endoftext|> as bos as well; do the same when the tokenizer has no bos.
        bos = tokenizer.bos_token_id
        config.bos_token_id = bos if bos is not None else tokenizer.eos_token_id
    return config


def build_model(
    preset_or_config,
    tokenizer=None,
    seed: int = 0,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3ForCausalLM; same seed -> identical weights.

    sdpa is the default because it trains on CPU with dense (bool or float) 4D masks;
    eager silently mis-reads bool masks, and flex_attention has no CPU backward.
    """
    config = resolve_config(preset_or_config, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    return model.to(device=device, dtype=dtype)


def meta_model(name_or_config) -> Qwen3ForCausalLM:
    """The model on the meta device: real shapes, no storage, built in milliseconds."""
    config = resolve_config(name_or_config)
    with torch.device("meta"):
        return Qwen3ForCausalLM(config)


def count_parameters(model_or_config, trainable_only: bool = False) -> int:
    """Number of parameters; tied embeddings count once (model.parameters() dedups them).

    Accepts a model, a Qwen3Config, or a preset/Qwen3 name (built on the meta device).
    """
    if isinstance(model_or_config, torch.nn.Module):
        model = model_or_config
    else:
        model = meta_model(model_or_config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
