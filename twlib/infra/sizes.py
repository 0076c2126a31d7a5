"""The sizes the planner adds up: the GPU table, Qwen3 shapes and parameter counts, bytes per parameter of
each precision convention, and the bytes of activations, logits and masks (twlib.infra.plan uses them).

Every formula is documented in twlib.infra.plan's docstring; the tests compare the parameter counts with
meta-device models and the activation bytes with what autograd really saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from twlib.config import LOGITS_ALIASES, LOGITS_MODES

GIB = 2**30
BLOCK = 128  # FlexAttention's default block size (tokens) of a BlockMask
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTNS = ("flex_attention", "sdpa", "eager")



# ----------------------------------------------------------------------------------------------------
# Hardware


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # usable memory as nvidia-smi reports it
    peak_tflops: float  # dense bf16 tensor-core peak, no sparsity (datasheet)
    bandwidth_tbs: float  # memory bandwidth, TB/s (datasheet)
    price_per_hour: float  # USD per GPU-hour, on-demand; an assumption, override with --price


GPUS: dict[str, GPU] = {
    # H100 SXM5 80 GB: 989 TFLOPs dense bf16, 3.35 TB/s HBM3 (NVIDIA datasheet); nvidia-smi: 81,559 MiB.
    # Price: specialised GPU clouds list ~2-3.5 USD per H100-hour on demand (2025); hyperscalers more.
    "h100-80gb": GPU("h100-80gb", 79.6, 989.0, 3.35, 3.00),
    # A100 SXM4: 312 TFLOPs dense bf16; 2.04 TB/s (80 GB) / 1.56 TB/s (40 GB) (NVIDIA datasheet).
    "a100-80gb": GPU("a100-80gb", 80.0, 312.0, 2.04, 1.80),
    "a100-40gb": GPU("a100-40gb", 40.0, 312.0, 1.56, 1.30),
    # The small-GPU track. A10 24 GB: 125 TFLOPs dense bf16, 600 GB/s; L4 24 GB: 121 TFLOPs, 300 GB/s
    # (NVIDIA datasheets); nvidia-smi shows ~23,000 MiB. Prices: ~0.75-1 USD per hour on demand.
    "a10-24gb": GPU("a10-24gb", 22.5, 125.0, 0.60, 0.75),
    "l4-24gb": GPU("l4-24gb", 22.5, 121.0, 0.30, 0.80),
}


def get_gpu(name: str) -> GPU:
    if name not in GPUS:
        raise ValueError(f"unknown gpu {name!r}; known: {', '.join(GPUS)}")
    return GPUS[name]


# ----------------------------------------------------------------------------------------------------
# Model shapes and parameter counts


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Qwen3 config the planner needs (no biases anywhere in Qwen3)."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config, name: str = "custom") -> "ModelShape":
        """From a config dict (twlib.models.QWEN3_CONFIGS) or a config object (Qwen3Config)."""
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        return cls(name=name, vocab=int(get("vocab_size")), hidden=hidden, layers=int(get("num_hidden_layers")),
                   heads=heads, kv_heads=int(get("num_key_value_heads") or heads),
                   head_dim=int(get("head_dim") or hidden // heads), intermediate=int(get("intermediate_size")),
                   tied=bool(get("tie_word_embeddings", False)))


def model_shape(model) -> ModelShape:
    """ModelShape of a Qwen3 size name ('Qwen3-8B'), a tiny preset name ('tiny') or a config object."""
    from twlib.models import QWEN3_CONFIGS, resolve_config

    if isinstance(model, str) and model in QWEN3_CONFIGS:
        return ModelShape.from_config(QWEN3_CONFIGS[model], model)
    config = resolve_config(model)  # ValueError listing the valid names
    return ModelShape.from_config(config, model if isinstance(model, str) else "custom")


def linear_shapes(s: ModelShape) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every linear layer in one decoder layer."""
    return {
        "q_proj": (s.hidden, s.q_dim), "k_proj": (s.hidden, s.kv_dim), "v_proj": (s.hidden, s.kv_dim),
        "o_proj": (s.q_dim, s.hidden),
        "gate_proj": (s.hidden, s.intermediate), "up_proj": (s.hidden, s.intermediate),
        "down_proj": (s.intermediate, s.hidden),
    }


def layer_params(s: ModelShape) -> int:
    # linear weights + q_norm and k_norm (head_dim each, shared over heads) + input / post-attention RMSNorm
    linears = sum(i * o for i, o in linear_shapes(s).values())
    return linears + 2 * s.head_dim + 2 * s.hidden


def root_params(s: ModelShape) -> int:
    # embedding V x h + final RMSNorm h + LM head V x h (0 when tied to the embedding)
    return s.vocab * s.hidden + s.hidden + (0 if s.tied else s.vocab * s.hidden)


def param_count(s: ModelShape) -> int:
    # P = root + layers x per-layer
    return root_params(s) + s.layers * layer_params(s)


def matmul_params(s: ModelShape) -> int:
    # parameters that take part in a matmul per token: every decoder linear + the LM head (the embedding
    # lookup is not a matmul; a tied head still multiplies by the V x h matrix)
    return s.layers * sum(i * o for i, o in linear_shapes(s).values()) + s.vocab * s.hidden


def lora_params(s: ModelShape, rank: int, targets=LORA_TARGETS) -> int:
    # per targeted linear (in, out): A is r x in, B is out x r  ->  r x (in + out); times the layers
    shapes = linear_shapes(s)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; known: {', '.join(shapes)}")
    return s.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in set(targets))


def kv_bytes_per_token(s: ModelShape, dtype_bytes: int = 2) -> int:
    # K and V: 2 x layers x kv_heads x head_dim x bytes
    return 2 * s.layers * s.kv_heads * s.head_dim * dtype_bytes


# ----------------------------------------------------------------------------------------------------
# Precision conventions and activations


@dataclass(frozen=True)
class Precision:
    weights: int  # bytes per parameter on the GPU during compute
    grads: int
    master: int  # fp32 master copy (0 when the weights themselves are fp32)
    adam: int  # AdamW m and v together
    residual: int  # bytes of the residual stream (layer inputs, the activation checkpoints)
    compute: int  # bytes of matmul outputs (bf16 under autocast / bf16 weights)
    autocast: bool = False  # fp32 weights cast to bf16 per matmul (the casts are kept for the backward)

    @property
    def per_param(self) -> int:
        return self.weights + self.grads + self.master + self.adam


PRECISIONS: dict[str, Precision] = {
    "bf16-mixed": Precision(weights=2, grads=2, master=4, adam=8, residual=2, compute=2),
    "fp32-autocast": Precision(weights=4, grads=4, master=0, adam=8, residual=4, compute=2, autocast=True),
    "bf16": Precision(weights=2, grads=2, master=0, adam=4, residual=2, compute=2),
    "fp32": Precision(weights=4, grads=4, master=0, adam=8, residual=4, compute=4),
}
ADAPTER_BYTES = 4 + 4 + 8  # LoRA adapters: fp32 weights, fp32 grads, AdamW m and v


def layer_activation_bytes(s: ModelShape, tokens: int, p: Precision) -> float:
    """Bytes autograd keeps for one Qwen3 decoder layer over `tokens` tokens.

    Saved per token. Each of the two RMSNorms keeps its normalised input before the norm weight (2h, in the
    residual dtype) and the next linear keeps its input (2h, compute dtype); q_norm and k_norm keep theirs
    before the weight (q + kv); attention keeps q and k after RoPE and v (q + 2kv), its output, and o_proj
    its input copy (2q; the copy is a view when the kernel already returns (B, T, H, D), as on CPU); the
    MLP keeps gate, up, silu(gate) and their product (4I); plus the RoPE cos and sin (2 x head_dim). In
    fp32: every RMSNorm upcasts its input and keeps it (2h + q + kv), and the attention logsumexp (heads).
    Checked against the tensors autograd actually saves (tests/test_plan.py).
    """
    h, q, kv, inter = s.hidden, s.q_dim, s.kv_dim, s.intermediate
    residual_elems = 2 * h
    compute_elems = 2 * h + 4 * q + 3 * kv + 4 * inter + 2 * s.head_dim
    fp32_elems = 2 * h + q + kv + s.heads
    return tokens * (residual_elems * p.residual + compute_elems * p.compute + fp32_elems * 4)


def autocast_weight_bytes(s: ModelShape, layers: int) -> int:
    # under torch.autocast every matmul casts its fp32 weight to bf16 and autograd keeps the copy for the
    # backward: 2 bytes x (linear weights of `layers` layers + the V x h LM head)
    return 2 * (layers * sum(i * o for i, o in linear_shapes(s).values()) + s.vocab * s.hidden)


def backward_extra_bytes(s: ModelShape, tokens: int, p: Precision) -> float:
    # gradients alive at once while back-propagating through one layer: those of gate, up and their product
    # (3I) and of the residual stream (2h), in the compute dtype
    return tokens * (3 * s.intermediate + 2 * s.hidden) * p.compute


def logits_mode(mode: str) -> str:
    """A LOGITS_MODES name (`twlib` -> `kept`); ValueError for anything else."""
    mode = LOGITS_ALIASES.get(mode, mode)
    if mode not in LOGITS_MODES:
        raise ValueError(f"logits mode {mode!r}; expected one of {', '.join(LOGITS_MODES)}")
    return mode


def logits_bytes(s: ModelShape, tokens: int, mode: str, chunk: int, compute: int = 2,
                 head_grad: bool = True) -> float:
    """LM head working set over `tokens` positions (V = vocab), see the module docstring.

    `compute`: bytes of the head's matmul output (2: bf16; 4: fp32, then there is no separate fp32 copy).
    `head_grad`: the head is trained (not LoRA), so each chunk makes a V x h weight gradient before
    autograd accumulates it."""
    mode = logits_mode(mode)
    c = min(chunk, tokens)
    raw = compute if compute < 4 else 0  # the head's output before its fp32 cast (none in fp32)
    weight_grad = s.vocab * s.hidden * compute if head_grad and mode != "full" else 0
    if mode == "full":
        # all T x V at once: the head's output + the fp32 copy kept for log-softmax + the fp32 gradient
        return tokens * s.vocab * (raw + 4 + 4)
    if mode == "kept":
        # every chunk's fp32 logits kept by autograd (T x V x 4) + one chunk's backward through autograd's
        # log-softmax: exp(z - lse), its product with the gradient and the gather's gradient (3 x 4 B), and
        # the gradient's cast to the head's dtype
        return tokens * s.vocab * 4 + c * s.vocab * (3 * 4 + raw) + weight_grad
    # chunked (twlib.lm_head): one chunk at a time, in the forward and again in the backward: its fp32
    # buffer (exponentials and gradient formed in place) + the head's output before the cast (forward,
    # recompute) or the gradient cast back to the head's dtype (backward)
    return c * s.vocab * (4 + raw) + weight_grad


def block_mask_bytes(tokens: int, block: int = BLOCK) -> int:
    # BlockMask: 4 int32 index tensors of nb x nb (kv/q, partial/full) + 4 int32 count vectors of nb,
    # nb = ceil(T / 128)
    nb = math.ceil(tokens / block)
    return 4 * 4 * (nb * nb + nb)


def dense_mask_bytes(tokens: int, dtype_bytes: int = 1) -> int:
    # dense T x T mask: 1 byte per entry for bool, 2 / 4 for a bf16 / fp32 additive mask
    return tokens * tokens * dtype_bytes
