"""Memory, time and cost planner for full-scale runs (Qwen3-0.6B / 1.7B / 8B), and a dry run of a config.

    python -m twlib.plan --model Qwen3-8B --gpus 8 --gpu h100-80gb --tokens 40960 --price 2.5
    python -m twlib.plan --preset small-gpu --model Qwen3-1.7B --lora --precision bf16 [--json]
    python -m twlib.plan --dry-run configs/qwen3-8b-sft.yaml

Every number printed here is an ESTIMATE from closed-form formulas, not a measurement. It is meant to
answer "does it fit, roughly how long, roughly how much", within maybe 10-30%. Measure before you buy.

Design choices (and where this deviates from the paper / the reference, and why)
- Parameter counts come from the config by formula (`param_count`), never from loading weights; the
  tests check them against `twlib.models.count_parameters(meta_model(name))`.
- Bytes per parameter follow one named convention per precision (`PRECISIONS`):
      bf16-mixed     bf16 weights 2 + bf16 grads 2 + fp32 master 4 + AdamW m, v 8 = 16 B  (the reference's
                     DeepSpeed bf16 mode; the ZeRO paper's "16 bytes per parameter")
      fp32-autocast  fp32 weights 4 + fp32 grads 4 + m, v 8 = 16 B; bf16 matmuls (twlib.sft with
                     dtype=float32, autocast=true: what the sft docstring recommends at lr 1e-5)
      bf16           bf16 weights, grads and AdamW states = 8 B (twlib.sft with dtype=bfloat16; updates
                     smaller than ~2^-8 of a weight are rounded away)
      fp32           everything fp32, fp32 activations = 16 B
  LoRA: the frozen base costs its weights only; adapters are fp32 (peft upcasts adapters of a bf16 base)
  with fp32 grads and AdamW states: 16 B per trainable parameter.
- Sharding: FSDP full-shard and DeepSpeed ZeRO-3 get the same model: weights, grads and optimizer states
  are divided by N, plus the gathered working set (the largest FSDP unit gathered with its gradient, and
  the next unit prefetched). Units: one per decoder layer, plus the root unit (embeddings, final norm,
  LM head), which is what auto-wrapping Qwen3DecoderLayer gives. `offload_optimizer` moves the fp32
  master weights and AdamW states to host memory (DeepSpeed's offload_optimizer, the reference's setup).
- Activations, per micro-batch of `rows` packed trie rows of T tokens, from the tensors autograd saves in
  one Qwen3 decoder layer (`layer_activation_bytes`; the tests compare it with the bytes autograd really
  saves on CPU: within -5%/+10%). With activation checkpointing: every layer's input (T x hidden) plus one
  layer's full recompute working set; without: every layer's saved tensors. Under fp32-autocast the bf16
  casts of the weights are kept for the backward too (all layers without checkpointing). FlexAttention
  never materialises T x T scores, so attention costs O(T) here.
- The LM head (vocab 151,936: at T = 40,960 the fp32 logits alone are 24.9 GB) has three modes:
  `full` (logits of all tokens at once, as `model(...).logits` + a loss does), `kept` (the forward runs
  in chunks but autograd keeps every chunk's fp32 logits for the backward: `twlib.trie.logprobs(...,
  recompute=False)`, `--logits kept`; `twlib` is its former name, accepted), `chunked` (each chunk's
  logits recomputed in the backward: `twlib.trie.logprobs` by default, through `twlib.lm_head`). Each
  counts one chunk's transients and the head's weight gradient of a chunk before it is accumulated;
  tests/test_lm_head.py measures the peak of a long row on CPU (fp32 and bf16, both modes) against them.
- Masks: the FlexAttention BlockMask (int32 block indices, (T/128)^2 per tensor: ~1.6 MB at 40,960) is
  shown next to the dense masks for comparison (bool T^2 = 1.7 GB, float32 T^2 = 6.7 GB: the reference
  builds the latter per sample).
- RL (P-GRPO, colocated FSDP + vLLM as in the reference): two phases on the same GPUs. Training is the SFT
  model with rows that hold a whole rollout, max(T, context) (no reference model: the reference uses no
  KL; with kl_coef > 0 the dry run adds a line for the reference's shards). Rollouts hold the resident
  training state (grads freed), a bf16 copy of the weights for vLLM (tensor parallel 1, one engine per
  GPU) and the KV cache, 2 x layers x kv_heads x head_dim x 2 bytes per token; vLLM's KV cache is freed
  (sleep mode) while training. The peak is the larger phase.
- Time: training FLOPs = 6 x (matmul parameters) x tokens (4 x for LoRA: no weight gradients for frozen
  matrices) + attention FLOPs of trie rows; divided by (GPUs x dense bf16 peak x MFU). MFU counts useful
  FLOPs only, so activation recompute is an overhead inside it. Decoding (rollouts, self-training data)
  is a memory-bandwidth roofline: each decode step reads all weights once plus every live sequence's KV
  cache. An RL step waits for its longest rollout (the straggler), so its rollout time is at least that
  rollout's length x the single-sequence step time. With CPU offload each optimizer step adds a CPU-Adam
  update and the PCIe transfers of its shard.
- Every assumption is a named dataclass field with its source (spec section 6/7, a datasheet, or
  "assumption") in a comment; prices are on-demand list prices of the order of 2025 and an argument.

What is ignored (hence the fixed `overhead_gib` per GPU, default 1 GiB: the CUDA context alone is
~0.5-1 GB): allocator fragmentation (often another 5-15% of the peak), NCCL buffers, FSDP/DeepSpeed flat
buffer padding and bucket sizes, pinned host buffers, RMSNorm rstd vectors, communication time not
hidden behind compute, checkpoint saving, evaluation, data loading, the GPT-5 rewriting that made the 959
SFT samples, and failed or repeated runs. The self-training decode (53k prompts, spec section 7) IS
counted, as its own row.

The dry run (`dry_run(path)`) validates a trainer's YAML config with `twlib.config.load_config`, takes its
`launch:` section (twlib.config.LaunchConfig: GPUs, sharding, offload, gradient checkpointing, logits
mode; the same settings the FSDP2 run applies), builds the model
on the meta device, and prints the sharding plan and the memory estimate. A config error names the field
and exits with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from twlib.config import (LOGITS_ALIASES, LOGITS_MODES, SHARDINGS, ConfigError, DataError, LaunchConfig, load_config,
                          load_pgrpo_config, read_launch)

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


# ----------------------------------------------------------------------------------------------------
# What to plan


@dataclass
class PlanConfig:
    """Hardware and memory settings of one run (defaults: the paper's SFT, spec section 6)."""

    model: str = "Qwen3-8B"  # a QWEN3_CONFIGS name or a tiny preset
    gpu: str = "h100-80gb"  # a GPUS key
    gpus: int = 8  # spec 6: 8 x 80 GB
    gpus_per_node: int = 8  # host memory is reported per node
    tokens: int = 40_960  # T, trie tokens of one packed row; spec 6: block 40,960 tokens
    rows: int = 1  # packed rows per micro-batch per GPU
    precision: str = "bf16-mixed"  # spec 6: bf16 (DeepSpeed mixed precision)
    sharding: str = "zero3"  # spec 6: DeepSpeed ZeRO-3
    offload_optimizer: bool = True  # spec 6: CPU offload
    checkpointing: bool = True  # spec 6: gradient checkpointing
    logits: str = "chunked"  # full | kept | chunked (module docstring; twlib = kept)
    logits_chunk: int = 4096  # tokens per LM-head chunk (twlib.trie.logprobs uses 4096)
    attn: str = "flex_attention"  # flex_attention (BlockMask) | sdpa (dense bool mask) | eager (dense float)
    lora: bool = False
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    overhead_gib: float = 1.0  # CUDA context (~0.5-1 GB) and other unmodelled per-GPU memory
    # RL rollouts (vLLM)
    concurrent: int | None = None  # sequences per GPU decoding at once; None: what vLLM would run (rl_memories)
    context: int = 40_960  # KV tokens reserved per sequence; spec 6: 40k total-token budget
    vllm_overhead_gib: float = 2.0  # vLLM activations workspace + CUDA graphs; assumption
    max_num_seqs: int = 256  # vLLM's default cap on concurrent sequences

    def validate(self) -> "PlanConfig":
        def bad(name, why):
            raise ValueError(f"plan field {name!r}: {why} (got {getattr(self, name)!r})")

        get_gpu(self.gpu)
        if self.precision not in PRECISIONS:
            bad("precision", f"expected one of {', '.join(PRECISIONS)}")
        if self.sharding not in SHARDINGS:
            bad("sharding", f"expected one of {', '.join(SHARDINGS)}")
        if LOGITS_ALIASES.get(self.logits, self.logits) not in LOGITS_MODES:
            bad("logits", f"expected one of {', '.join(LOGITS_MODES)}")
        if self.attn not in ATTNS:
            bad("attn", f"expected one of {', '.join(ATTNS)}")
        for name in ("gpus", "gpus_per_node", "tokens", "rows", "logits_chunk", "lora_rank", "context",
                     "max_num_seqs"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.concurrent is not None and self.concurrent < 1:
            bad("concurrent", "must be >= 1 or None")
        return self


@dataclass
class Throughput:
    """Speed assumptions (each an assumption unless a source is given)."""

    mfu: float = 0.35  # useful FLOPs / peak; 0.35-0.40 is typical of tuned long-sequence FSDP/ZeRO-3 bf16
    # training with activation recompute on H100 (assumption; the reference reports no throughput)
    decode_bw_util: float = 0.6  # fraction of memory bandwidth a vLLM decode step reaches (assumption)
    cpu_adam_s_per_billion: float = 2.0  # seconds of CPU-Adam per 1e9 parameters on one rank's share of the
    # host (~14 cores of a DGX-class node; assumption, order of magnitude only)
    pcie_gbs: float = 25.0  # achieved host <-> GPU GB/s per GPU (PCIe Gen5 x16: ~50-60 peak; assumption)
    old_logprob_pass: bool = True  # RL: one extra forward for the old log-probs (verl computes them even
    # when on-policy)


@dataclass
class Schedule:
    """The work: SFT stages, self-training decode, RL steps."""

    name: str = "paper"
    sft_stages: tuple[tuple[str, int, float], ...] = (
        ("SFT stage 1", 959, 8.0),  # spec 6: 8 epochs on 959 samples
        ("SFT self-training", 17_491, 1.0),  # spec 6: then 1 epoch on 17,491 samples
    )
    sft_batch: int = 16  # spec 6: effective batch 16 samples
    mean_tokens: int = 15_000  # trie tokens per SFT sample; spec 7: the sequential Qwen3-8B averages 15.1k
    # tokens of latency over the benchmarks, and a trie holds every token of a trajectory once (assumption)
    self_train_prompts: int = 53_000  # spec 7: the SFT model decodes 53k prompts in parallel mode
    rl_steps: int = 350  # spec 6 (paper RL)
    rl_prompts: int = 16  # spec 6: 16 prompts x 8 rollouts
    rl_rollouts: int = 8
    rl_mean_tokens: int = 15_000  # tokens per rollout (assumption, as mean_tokens)
    rl_longest_tokens: int = 40_960  # the straggler: spec 6's 40k budget; with 128 rollouts of a long-tailed
    # length distribution the longest usually hits it (assumption)
    prompt_tokens: int = 200  # prompt incl. chat template (assumption)


SCHEDULES: dict[str, Schedule] = {
    "paper": Schedule(),
    # The small-GPU track: the multiplication task (configs/qwen3-0.6b-sft.yaml, -1.7b-sft.yaml) and the
    # public multiplication RL run (spec 6: 128 prompts x 8 rollouts, max response 8,192, 400 steps).
    "multiply": Schedule(
        name="multiply",
        sft_stages=(("SFT multiply", 10_000, 2.0),),  # spec 6: 10k train problems; 2 epochs (our configs)
        mean_tokens=400,  # twlib's multiply trajectories: ~740 characters, ~0.5 Qwen3 tokens/char (assumption)
        self_train_prompts=0,
        rl_steps=400, rl_prompts=128, rl_rollouts=8,
        rl_mean_tokens=3_500,  # spec 7: 3,322 sequential tokens after RL; a trie totals a bit more (assumption)
        rl_longest_tokens=8_192,  # spec 6: max response 8,192
        prompt_tokens=60,
    ),
}

HARDWARE: dict[str, tuple[PlanConfig, str]] = {
    # 8 x H100 80 GB, Qwen3-8B full fine-tune, the reference's ZeRO-3 + CPU offload + checkpointing.
    "paper": (PlanConfig(), "paper"),
    # One 24 GB GPU, Qwen3-0.6B full fine-tune with twlib.sft, gradient checkpointing off (its
    # `gradient_checkpointing` field turns it on), LM-head chunks recomputed by twlib.trie.logprobs, rows of
    # 2,048 tokens (~5 multiply trajectories).
    "small-gpu": (PlanConfig(model="Qwen3-0.6B", gpu="a10-24gb", gpus=1, gpus_per_node=1, tokens=2048,
                             precision="fp32-autocast", sharding="none", offload_optimizer=False,
                             checkpointing=False, logits="chunked", context=8192 + 60), "multiply"),
}


# ----------------------------------------------------------------------------------------------------
# Results


@dataclass
class Term:
    name: str
    bytes: float
    where: str = "gpu"  # gpu | cpu (host memory per node)
    note: str = ""


@dataclass
class Memory:
    phase: str
    terms: list[Term]
    capacity_gib: float
    tokens: int | None = None  # tokens per packed row of the training phases

    def total(self, where: str = "gpu") -> float:
        return sum(t.bytes for t in self.terms if t.where == where)

    def term(self, name: str) -> float:
        """Bytes of the term whose name starts with `name` (0 if there is none)."""
        return sum(t.bytes for t in self.terms if t.name.startswith(name))

    @property
    def gpu_gib(self) -> float:
        return self.total("gpu") / GIB

    @property
    def fits(self) -> bool:
        return self.gpu_gib <= self.capacity_gib


@dataclass
class Plan:
    """Memory per GPU (SFT, RL training, RL rollouts), masks, time and cost. `.table()`: rows of dicts."""

    config: PlanConfig
    throughput: Throughput
    schedule: Schedule
    shape: ModelShape
    params: int
    trainable: int
    units: list[tuple[str, int, int]]  # (unit, count, params per unit)
    memories: list[Memory]
    masks: list[Term]
    time: list[dict]
    price_per_hour: float

    def memory(self, phase: str) -> Memory:
        return next(m for m in self.memories if m.phase == phase)

    @property
    def totals(self) -> dict:
        gpu_h = sum(r["gpu_hours"] for r in self.time)
        return {"gpu_hours": gpu_h, "hours": sum(r["hours"] for r in self.time), "cost": gpu_h * self.price_per_hour}

    def table(self) -> list[dict]:
        """One dict per printed line: section, item, value, unit, note."""
        c, rows = self.config, []

        def add(section, item, value, unit="", note=""):
            rows.append({"section": section, "item": item, "value": value, "unit": unit, "note": note})

        add("model", "parameters", self.params, "params", f"{self.shape.name}: {self.shape.layers} layers, "
            f"hidden {self.shape.hidden}, vocab {self.shape.vocab}")
        add("model", "trainable", self.trainable, "params", f"LoRA rank {c.lora_rank}" if c.lora else "full")
        for unit, count, n in self.units:
            add("model", f"unit {unit}", n, "params", f"x {count}")
        for m in self.memories:
            section = f"memory per GPU: {m.phase}" + (f" (rows of {m.tokens:,} tokens)" if m.tokens else "")
            for t in m.terms:
                add(section, t.name, round(t.bytes / GIB, 3), "GiB" if t.where == "gpu" else "GiB host/node",
                    t.note)
            add(section, "TOTAL per GPU", round(m.gpu_gib, 3), "GiB",
                f"{'fits' if m.fits else 'DOES NOT FIT'} in {m.capacity_gib:g} GiB")
        for t in self.masks:
            add(f"masks at T={c.tokens:,}", t.name, round(t.bytes / GIB, 6), "GiB", t.note)
        for r in self.time:
            add("time", r["stage"], round(r["hours"], 3), "h",
                f"{r['gpu_hours']:.1f} GPU-h, ${r['gpu_hours'] * self.price_per_hour:,.0f}; {r['note']}")
        t = self.totals
        add("time", "TOTAL", round(t["hours"], 3), "h",
            f"{t['gpu_hours']:.1f} GPU-h x ${self.price_per_hour:.2f} = ${t['cost']:,.0f}")
        return rows

    def to_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "throughput": dataclasses.asdict(self.throughput),
                "schedule": dataclasses.asdict(self.schedule), "params": self.params, "trainable": self.trainable,
                "fits": {m.phase: m.fits for m in self.memories},
                "gpu_gib": {m.phase: round(m.gpu_gib, 3) for m in self.memories},
                "totals": self.totals, "price_per_hour": self.price_per_hour, "rows": self.table()}

    def __str__(self) -> str:
        c, gpu = self.config, get_gpu(self.config.gpu)
        lines = [f"plan: {self.shape.name} on {c.gpus} x {gpu.name} ({gpu.memory_gib:g} GiB, "
                 f"{gpu.peak_tflops:g} TFLOPs bf16), T={c.tokens:,} x {c.rows} row(s), {c.precision}, "
                 f"sharding={c.sharding}{' + optimizer offload' if c.offload_optimizer else ''}, "
                 f"checkpointing={'on' if c.checkpointing else 'off'}, logits={c.logits}, attn={c.attn}"
                 f"{f', LoRA r={c.lora_rank}' if c.lora else ''}",
                 "(estimates from formulas: see `python -m twlib.plan --help` and the twlib.plan docstring)"]
        section = None
        for r in self.table():
            if r["section"] != section:
                section = r["section"]
                lines.append(f"\n{section}")
            value = r["value"]
            shown = f"{value:,}" if isinstance(value, int) else f"{value:,.3f}" if value < 1000 else f"{value:,.1f}"
            lines.append(f"  {r['item']:<44} {shown:>16} {r['unit']:<14} {r['note']}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Memory


def _shards(c: PlanConfig) -> int:
    # FSDP / ZeRO-3 divide weights, grads and optimizer states by N; without sharding every GPU holds all
    return c.gpus if c.sharding != "none" else 1


def _units(s: ModelShape) -> list[tuple[str, int, int]]:
    return [("decoder layer", s.layers, layer_params(s)),
            ("root (embed_tokens + norm" + ("" if s.tied else " + lm_head") + ")", 1, root_params(s))]


def state_terms(c: PlanConfig, s: ModelShape, p: Precision) -> list[Term]:
    """Weights, gradients, optimizer states (sharded or not, offloaded or not) and the gathered FSDP units."""
    n, params = _shards(c), param_count(s)
    where_opt = "cpu" if c.offload_optimizer else "gpu"
    per_node = min(c.gpus, c.gpus_per_node)  # shards whose host copy lives on one node
    opt_scale = per_node if c.offload_optimizer else 1  # host memory is reported per node
    shard = f"/{n}" if n > 1 else "unsharded"
    terms = []
    if c.lora:
        trainable = lora_params(s, c.lora_rank, c.lora_targets)
        terms.append(Term("weights (frozen base)", params * p.weights / n, note=f"{p.weights} B/param, {shard}"))
        terms.append(Term("LoRA adapters + grads + AdamW", trainable * ADAPTER_BYTES / n,
                          note=f"{ADAPTER_BYTES} B/trainable param, fp32"))
    else:
        terms.append(Term("weights", params * p.weights / n, note=f"{p.weights} B/param, {shard}"))
        terms.append(Term("gradients", params * p.grads / n, note=f"{p.grads} B/param, {shard}"))
        if p.master:
            terms.append(Term("fp32 master weights", params * p.master / n * opt_scale, where_opt,
                              note=f"{p.master} B/param"))
        terms.append(Term("AdamW m, v", params * p.adam / n * opt_scale, where_opt, note=f"{p.adam} B/param"))
    if n > 1:
        # gathered working set: the largest unit with its full gradient + the next unit prefetched
        sizes = sorted((u[2] for u in _units(s)), reverse=True)
        grad = 0 if c.lora else p.grads
        terms.append(Term("gathered units (FSDP/ZeRO-3)", sizes[0] * (p.weights + grad) + sizes[1] * p.weights,
                          note=f"largest unit {sizes[0] / 1e6:,.0f}M params + prefetch"))
    return terms


def activation_terms(c: PlanConfig, s: ModelShape, p: Precision, tokens: int) -> list[Term]:
    """Activations of `c.rows` rows of `tokens` tokens, the LM head working set and the attention mask."""
    rows, terms = c.rows, []
    if c.checkpointing:
        # checkpoints: the input of every layer, rows x L x T x h x residual bytes
        terms.append(Term("activation checkpoints", rows * s.layers * tokens * s.hidden * p.residual,
                          note=f"{s.layers} x T x {s.hidden} x {p.residual} B"))
        # one layer recomputed in the backward: its saved tensors + the gradients in flight
        terms.append(Term("one layer's recompute", rows * (layer_activation_bytes(s, tokens, p)
                                                           + backward_extra_bytes(s, tokens, p)),
                          note="saved tensors + gradients in flight"))
    else:
        terms.append(Term("activations (all layers)", rows * s.layers * layer_activation_bytes(s, tokens, p),
                          note="no checkpointing"))
        terms.append(Term("backward gradients in flight", rows * backward_extra_bytes(s, tokens, p)))
    if p.autocast:
        # with checkpointing only the layer being recomputed holds its casts
        kept = 1 if c.checkpointing else s.layers
        terms.append(Term("autocast bf16 weight copies", autocast_weight_bytes(s, kept),
                          note=f"{kept} layer(s) + LM head"))
    # the final hidden states (input of the LM head, T x h) + the logits working set
    mode = logits_mode(c.logits)
    head = rows * (tokens * s.hidden * p.compute
                   + logits_bytes(s, tokens, mode, c.logits_chunk, p.compute, head_grad=not c.lora))
    terms.append(Term(f"LM head / logits ({mode})", head,
                      note=f"chunk {c.logits_chunk}" if mode != "full" else "all T x V at once"))
    terms.append(Term("attention mask", rows * _mask_bytes(c.attn, tokens, p), note=c.attn))
    return terms


def _mask_bytes(attn: str, tokens: int, p: Precision) -> int:
    if attn == "flex_attention":
        return block_mask_bytes(tokens)
    if attn == "sdpa":
        return dense_mask_bytes(tokens, 1)
    return dense_mask_bytes(tokens, p.compute)


def sft_memory(c: PlanConfig, s: ModelShape) -> Memory:
    p = PRECISIONS[c.precision]
    terms = state_terms(c, s, p) + activation_terms(c, s, p, c.tokens)
    terms.append(Term("fixed overhead", c.overhead_gib * GIB, note="CUDA context etc."))
    return Memory("SFT", terms, get_gpu(c.gpu).memory_gib, c.tokens)


def rollout_non_kv(c: PlanConfig, s: ModelShape) -> list[Term]:
    """Rollout phase without the KV cache: resident training state (grads freed) + vLLM's weights."""
    p = PRECISIONS[c.precision]
    resident = [t for t in state_terms(c, s, p) if t.name not in ("gradients", "gathered units (FSDP/ZeRO-3)")]
    return resident + [
        Term("vLLM weights (bf16, TP=1)", param_count(s) * 2, note="a full copy per GPU"),
        Term("vLLM workspace", c.vllm_overhead_gib * GIB, note="activations, CUDA graphs (assumption)"),
        Term("fixed overhead", c.overhead_gib * GIB, note="CUDA context etc."),
    ]


def kv_capacity(c: PlanConfig, s: ModelShape, context: int, non_kv: float | None = None) -> int:
    # sequences of `context` tokens whose KV cache fits next to everything else
    if non_kv is None:
        non_kv = sum(t.bytes for t in rollout_non_kv(c, s) if t.where == "gpu")
    free = get_gpu(c.gpu).memory_gib * GIB - non_kv
    return max(0, int(free // (context * kv_bytes_per_token(s))))


def rl_memories(c: PlanConfig, s: ModelShape, schedule: Schedule) -> list[Memory]:
    """RL training (the SFT terms, rows long enough for one rollout's trie: max(tokens, context)) and RL
    rollouts (vLLM next to the training state).

    KV cache = concurrent sequences x context x kv bytes per token. By default the concurrency is what vLLM
    would run: the rollouts per GPU, capped by max_num_seqs and by how many full-context sequences fit
    (vLLM queues or preempts the rest); `concurrent` asks for a fixed number instead.
    """
    gpu = get_gpu(c.gpu)
    rl_tokens = max(c.tokens, c.context)
    train = Memory("RL training", sft_memory(dataclasses.replace(c, tokens=rl_tokens), s).terms, gpu.memory_gib,
                   rl_tokens)
    non_kv = rollout_non_kv(c, s)
    fit = kv_capacity(c, s, c.context, sum(t.bytes for t in non_kv if t.where == "gpu"))
    demand = math.ceil(schedule.rl_prompts * schedule.rl_rollouts / c.gpus)
    concurrent = c.concurrent or max(1, min(demand, c.max_num_seqs, fit))
    per_token = kv_bytes_per_token(s)
    mean_context = schedule.prompt_tokens + schedule.rl_mean_tokens
    kv = Term("vLLM KV cache", concurrent * c.context * per_token,
              note=f"{concurrent} seqs x {c.context:,} tok x {per_token / 1024:.0f} KiB; {demand} rollouts/GPU, "
                   f"{fit} fit at {c.context:,} tok, {min(demand, c.max_num_seqs)} at the mean "
                   f"{mean_context:,} tok take {min(demand, c.max_num_seqs) * mean_context * per_token / GIB:.1f} GiB")
    return [train, Memory("RL rollouts", non_kv + [kv], gpu.memory_gib)]


def mask_comparison(c: PlanConfig) -> list[Term]:
    t = c.tokens
    return [Term("FlexAttention BlockMask", block_mask_bytes(t), note=f"4 x (T/{BLOCK})^2 int32 + counts"),
            Term("dense bool mask", dense_mask_bytes(t, 1), note="T^2 bytes (sdpa)"),
            Term("dense bf16 mask", dense_mask_bytes(t, 2), note="T^2 x 2 (eager, bf16)"),
            Term("dense float32 mask", dense_mask_bytes(t, 4), note="T^2 x 4 (the reference, per sample)")]


# ----------------------------------------------------------------------------------------------------
# Time


def flops_per_token(s: ModelShape, sample_tokens: float, lora: bool, passes: str = "train") -> float:
    """FLOPs per token of samples of `sample_tokens` tokens.

    Matmuls: forward 2 x P_mm per token; training adds the backward, 4 x P_mm (2 x for LoRA, which needs the
    input gradients but no weight gradients of frozen matrices). Attention: a token attends to its
    ancestors, at most (n+1)/2 keys on average for an n-token causal sample (a trie has fewer, but
    FlexAttention computes partially masked 128 x 128 blocks in full); QK^T and PV cost 2 x q_dim FLOPs
    per pair each, so the forward costs 4 x L x q_dim x (n+1)/2 per token and training 3 x that.
    """
    pairs_per_token = (sample_tokens + 1) / 2
    attention_fwd = 4 * s.layers * s.q_dim * pairs_per_token
    if passes == "forward":
        return 2 * matmul_params(s) + attention_fwd
    matmul = (4 if lora else 6) * matmul_params(s)
    return matmul + 3 * attention_fwd


def decode_step_s(c: PlanConfig, s: ModelShape, batch: int, context: float, t: Throughput) -> float:
    # one decode step reads every weight once and each live sequence's KV cache:
    #   t = (2 x P + batch x context x kv_bytes) / (bandwidth x utilisation)
    gpu = get_gpu(c.gpu)
    read = 2 * param_count(s) + batch * context * kv_bytes_per_token(s)
    return read / (gpu.bandwidth_tbs * 1e12 * t.decode_bw_util)


def optimizer_step_s(c: PlanConfig, s: ModelShape, t: Throughput) -> float:
    p = PRECISIONS[c.precision]
    trained = lora_params(s, c.lora_rank, c.lora_targets) if c.lora else param_count(s)
    shard = trained / _shards(c)
    if c.offload_optimizer:
        # CPU-Adam over this rank's shard + gradients down and updated weights up over PCIe
        return shard / 1e9 * t.cpu_adam_s_per_billion + shard * (p.grads + p.weights) / (t.pcie_gbs * 1e9)
    # on the GPU AdamW is memory-bound: read and write every byte of state once
    bytes_ = ADAPTER_BYTES if c.lora else p.per_param
    return 2 * shard * bytes_ / (get_gpu(c.gpu).bandwidth_tbs * 1e12 * t.decode_bw_util)


def _train_s(c: PlanConfig, s: ModelShape, tokens: float, flops_token: float, t: Throughput) -> float:
    # time = tokens x FLOPs/token / (GPUs x peak x MFU)
    gpu = get_gpu(c.gpu)
    return tokens * flops_token / (c.gpus * gpu.peak_tflops * 1e12 * t.mfu)


def _row(stage, seconds, gpus, note) -> dict:
    return {"stage": stage, "hours": seconds / 3600, "gpu_hours": seconds * gpus / 3600, "note": note}


def sft_time(c: PlanConfig, s: ModelShape, schedule: Schedule, t: Throughput) -> list[dict]:
    rows = []
    per_token = flops_per_token(s, schedule.mean_tokens, c.lora)
    for stage, samples, epochs in schedule.sft_stages:
        tokens = samples * epochs * schedule.mean_tokens
        steps = math.ceil(samples * epochs / schedule.sft_batch)
        seconds = _train_s(c, s, tokens, per_token, t) + steps * optimizer_step_s(c, s, t)
        rows.append(_row(stage, seconds, c.gpus, f"{tokens / 1e6:,.0f}M tokens, {steps} steps, "
                                                 f"{tokens * per_token:.2e} FLOPs"))
    if schedule.self_train_prompts:
        rows.append(self_train_decode(c, s, schedule, t))
    return rows


def self_train_decode(c: PlanConfig, s: ModelShape, schedule: Schedule, t: Throughput) -> dict:
    """Decoding the self-training prompts with vLLM alone on the GPUs (no training state)."""
    context = schedule.prompt_tokens + schedule.mean_tokens
    non_kv = (2 * param_count(s) + (c.vllm_overhead_gib + c.overhead_gib) * GIB)
    batch = max(1, min(c.max_num_seqs, kv_capacity(c, s, context, non_kv)))
    step = decode_step_s(c, s, batch, schedule.prompt_tokens + schedule.mean_tokens / 2, t)
    tokens = schedule.self_train_prompts * schedule.mean_tokens
    seconds = tokens / (c.gpus * batch / step)
    return _row("self-training decode", seconds, c.gpus,
                f"{schedule.self_train_prompts:,} prompts x {schedule.mean_tokens:,} tok, "
                f"{batch} seqs/GPU at {batch / step:,.0f} tok/s/GPU")


def rl_time(c: PlanConfig, s: ModelShape, schedule: Schedule, t: Throughput) -> dict:
    sequences = schedule.rl_prompts * schedule.rl_rollouts
    mean_context = schedule.prompt_tokens + schedule.rl_mean_tokens
    # rollouts: concurrency per GPU is capped by the batch, the KV memory and vLLM's max_num_seqs
    fit = kv_capacity(c, s, mean_context)
    batch = max(1, min(c.concurrent or math.ceil(sequences / c.gpus), fit, c.max_num_seqs))
    step = decode_step_s(c, s, batch, schedule.prompt_tokens + schedule.rl_mean_tokens / 2, t)
    tokens = sequences * schedule.rl_mean_tokens
    throughput_s = tokens / (c.gpus * batch / step)
    # the straggler decodes its last tokens almost alone
    straggler_s = schedule.rl_longest_tokens * decode_step_s(
        c, s, 1, schedule.prompt_tokens + schedule.rl_longest_tokens / 2, t)
    generate_s = max(throughput_s, straggler_s)
    # training on the rollouts (+ a forward for the old log-probs)
    per_token = flops_per_token(s, mean_context, c.lora)
    if t.old_logprob_pass:
        per_token += flops_per_token(s, mean_context, c.lora, passes="forward")
    train_s = _train_s(c, s, sequences * mean_context, per_token, t) + optimizer_step_s(c, s, t)
    seconds = schedule.rl_steps * (generate_s + train_s)
    return _row("RL (P-GRPO)", seconds, c.gpus,
                f"{schedule.rl_steps} steps x (rollouts {generate_s:,.0f}s "
                f"[{'straggler' if straggler_s >= throughput_s else 'throughput'}-bound, {batch} seqs/GPU] "
                f"+ train {train_s:,.0f}s)")


# ----------------------------------------------------------------------------------------------------
# The plan


def make_plan(config: PlanConfig | None = None, throughput: Throughput | None = None,
              schedule: Schedule | str | None = None, price_per_hour: float | None = None,
              shape: ModelShape | None = None) -> Plan:
    """Everything for one configuration. `shape` overrides `config.model` (e.g. from a checkpoint)."""
    c = (config or PlanConfig()).validate()
    t = throughput or Throughput()
    if isinstance(schedule, str) or schedule is None:
        name = schedule or "paper"
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
        schedule = SCHEDULES[name]
    s = shape or model_shape(c.model)
    gpu = get_gpu(c.gpu)
    price = gpu.price_per_hour if price_per_hour is None else price_per_hour
    return Plan(
        config=c, throughput=t, schedule=schedule, shape=s, params=param_count(s),
        trainable=lora_params(s, c.lora_rank, c.lora_targets) if c.lora else param_count(s),
        units=_units(s), memories=[sft_memory(c, s), *rl_memories(c, s, schedule)],
        masks=mask_comparison(c), time=[*sft_time(c, s, schedule, t), rl_time(c, s, schedule, t)],
        price_per_hour=price)


# ----------------------------------------------------------------------------------------------------
# Dry run of a twlib.sft config


def read_launcher(path) -> LaunchConfig:
    """The `launch:` section of a trainer config file (twlib.config.LaunchConfig), checked (`check_launch`)."""
    return check_launch(read_launch(path), path)


def check_launch(launch: LaunchConfig, path) -> LaunchConfig:
    """`launch` with its GPU and precision names checked against this module's tables (ConfigError)."""
    if launch.gpu not in GPUS:
        raise ConfigError(f"{path} (launch): field 'gpu': expected one of {', '.join(GPUS)} (got {launch.gpu!r})")
    if launch.precision is not None and launch.precision not in PRECISIONS:
        raise ConfigError(f"{path} (launch): field 'precision': expected one of {', '.join(PRECISIONS)} "
                          f"(got {launch.precision!r})")
    return launch


def resolve_model(model: str):
    """(meta-device model, ModelShape, note) for SFTConfig.model.

    A preset name; an existing checkpoint directory (its config.json); a hub id cached by huggingface_hub
    (its snapshot's config.json, twlib.hub); or a name that is neither whose last component names a Qwen3
    size (`models/Qwen3-8B`, `Qwen/Qwen3-8B` -> QWEN3_CONFIGS['Qwen3-8B']) or a real-tokenizer preset
    (`models/qwen3-tiny` -> REAL_TOKENIZER_PRESETS['qwen3-tiny']).
    """
    from twlib.models import PRESETS as TINY, QWEN3_CONFIGS, REAL_TOKENIZER_PRESETS, meta_model

    if model in TINY:
        return meta_model(model), model_shape(model), f"preset {model!r}"
    if model in REAL_TOKENIZER_PRESETS:
        return meta_model(model), model_shape(model), f"preset {model!r} (Qwen3 architecture and vocabulary)"
    path = Path(model)
    if not path.exists():  # a hub id whose snapshot is in the Hugging Face cache: its config.json
        from twlib.hub import ModelNotFound, looks_like_hub_id, resolve_model as hub_resolve

        if looks_like_hub_id(model):
            try:
                path = Path(hub_resolve(model, need="config"))
            except ModelNotFound:
                pass
    if (path / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(config)
        return built, ModelShape.from_config(config, Path(model).name), f"checkpoint {path}"
    by_name = {k.lower(): k for k in [*QWEN3_CONFIGS, *REAL_TOKENIZER_PRESETS]}
    name = by_name.get(path.name.lower())
    if name is None:
        raise ConfigError(f"field 'model': {model!r} is neither a preset ({', '.join(TINY)}), a checkpoint "
                          f"directory with a config.json, nor named after a Qwen3 size "
                          f"({', '.join([*QWEN3_CONFIGS, *REAL_TOKENIZER_PRESETS])})")
    if name in REAL_TOKENIZER_PRESETS:
        note = (f"{model} not found locally: using the {name} preset's architecture from twlib.models "
                f"(write it there before training: python -m twlib prepare-model --preset {name} --tokenizer "
                f"QWEN3_TOKENIZER --out {model})")
    else:
        note = (f"{model} not found locally: using the {name} architecture from twlib.models.QWEN3_CONFIGS "
                f"(download the checkpoint there before training)")
    return meta_model(name), model_shape(name), note


def precision_of(dtype: str, autocast: bool) -> str:
    """PRECISIONS key of an SFTConfig's dtype/autocast on a GPU (dtype auto = bfloat16 on CUDA)."""
    if dtype == "float32":
        return "fp32-autocast" if autocast else "fp32"
    return "bf16"  # bfloat16, float16 (same bytes) and auto


def sharding_units(model) -> list[tuple[str, int]]:
    """FSDP units of a meta model: one per decoder layer, then the root (every other module with weights)."""
    layers = list(model.model.layers)
    units = [(f"model.layers.{i}", sum(p.numel() for p in layer.parameters())) for i, layer in enumerate(layers)]
    total = sum(p.numel() for p in model.parameters())  # tied weights count once
    children = [*model.model.named_children(), *[(n, m) for n, m in model.named_children() if n != "model"]]
    names = [n for n, m in children if n != "layers" and any(True for _ in m.parameters())]
    tied = getattr(model.config, "tie_word_embeddings", False)
    label = "root: " + ", ".join(names) + (" (lm_head tied to embed_tokens)" if tied else "")
    units.append((label, total - sum(n for _, n in units)))
    return units


def plan_config_of(cfg, launcher: LaunchConfig, shape: ModelShape) -> PlanConfig:
    """The PlanConfig of an SFTConfig plus its launcher block (attn auto = flex_attention on CUDA)."""
    return PlanConfig(
        model=shape.name, gpu=launcher.gpu, gpus=launcher.gpus, gpus_per_node=min(launcher.gpus, 8),
        tokens=cfg.tokens_per_batch, rows=cfg.rows_per_micro_batch,
        precision=launcher.precision or precision_of(cfg.dtype, cfg.autocast), sharding=launcher.sharding,
        offload_optimizer=launcher.offload_optimizer, checkpointing=launcher.gradient_checkpointing,
        logits=launcher.logits, logits_chunk=launcher.logits_chunk,
        attn="flex_attention" if cfg.attn == "auto" else cfg.attn, lora=cfg.lora, lora_rank=cfg.lora_rank,
        lora_targets=tuple(cfg.lora_targets), overhead_gib=launcher.overhead_gib)


def _header_lines(path, cfg, launcher, plan: Plan, model_note: str, meta_count: int) -> list[str]:
    ranks, formula = launcher.gpus, plan.params
    lines = [f"dry run: {path}",
             f"  config: valid SFTConfig (mode {cfg.mode}, loss {cfg.loss_policy}, lr {cfg.lr:g}, warmup "
             f"{cfg.warmup:g}, betas {tuple(cfg.betas)}, weight_decay {cfg.weight_decay:g}, dtype {cfg.dtype}, "
             f"autocast {cfg.autocast}, lora {cfg.lora})",
             f"  batch: {cfg.rows_per_micro_batch} row(s) of {cfg.tokens_per_batch:,} tokens x grad_accum "
             f"{cfg.grad_accum} = {cfg.rows_per_micro_batch * cfg.grad_accum} rows per optimizer step"
             + (f"; over {ranks} data-parallel ranks: grad_accum {cfg.grad_accum / ranks:g} per rank"
                if ranks > 1 else ""),
             f"  model: {model_note}",
             f"  parameters: {meta_count:,} on the meta device; formula {formula:,} "
             f"({'equal' if meta_count == formula else 'DIFFERENT: not a plain Qwen3 layout'})"]
    if cfg.lora:
        lines.append(f"  trainable (LoRA r={cfg.lora_rank}, {', '.join(cfg.lora_targets)}): {plan.trainable:,}")
    lines.append(f"  launcher: {launcher.gpus} x {launcher.gpu}, sharding {launcher.sharding}, offload optimizer "
                 f"{launcher.offload_optimizer}, gradient checkpointing {launcher.gradient_checkpointing}, "
                 f"logits {launcher.logits} (chunk {launcher.logits_chunk}), precision {plan.config.precision}")
    return lines


def _sharding_lines(units: list[tuple[str, int]], c: PlanConfig) -> list[str]:
    """The FSDP units, identical decoder layers on one line: params per unit, per-GPU shard."""
    n, weight_bytes = _shards(c), PRECISIONS[c.precision].weights
    layers, root = units[:-1], units[-1]
    if len({size for _, size in layers}) == 1:
        rows = [(f"model.layers.0..{len(layers) - 1}", len(layers), layers[0][1])]
    else:
        rows = [(name, 1, size) for name, size in layers]
    rows.append((root[0], 1, root[1]))
    lines = [f"\nsharding plan ({c.sharding} over {n} GPU(s)"
             + (": one FSDP unit per decoder layer + the root unit)" if n > 1 else ": every GPU holds all)"),
             f"  {'unit':<52} {'count':>5} {'params/unit':>15} {'shard/GPU':>15} {'GiB/GPU':>9}"]
    for name, count, size in rows:
        # shard per GPU = ceil(unit / N) parameters; GiB/GPU = count x unit x weight bytes / N
        lines.append(f"  {name:<52} {count:>5} {size:>15,} {math.ceil(size / n):>15,} "
                     f"{count * size * weight_bytes / n / GIB:>9.3f}")
    lines.append(f"  (GiB/GPU: the {weight_bytes}-byte weights of all `count` units, divided by {n})")
    return lines


def _memory_lines(m: Memory) -> list[str]:
    lines = [f"\nmemory per GPU, {m.phase} ({'fits' if m.fits else 'DOES NOT FIT'}: {m.gpu_gib:.2f} of "
             f"{m.capacity_gib:g} GiB)"]
    for t in m.terms:
        where = "" if t.where == "gpu" else "  [host memory per node]"
        lines.append(f"  {t.name:<40} {t.bytes / GIB:>10.3f} GiB  {t.note}{where}")
    return lines


def _notes(cfg, launcher: LaunchConfig, plan: Plan) -> list[str]:
    notes = []
    if cfg.data is not None and not Path(cfg.data).is_file():
        notes.append(f"data file {cfg.data} does not exist yet (needed before training)")
    if launcher.logits != "chunked":
        chunked = make_plan(dataclasses.replace(plan.config, logits="chunked"), schedule=plan.schedule,
                            shape=plan.shape)
        notes.append(f"logits {launcher.logits!r} plans for the LM head's logits kept for the backward "
                     f"(--logits kept); twlib.trie.logprobs recomputes each chunk by default "
                     f"(--logits chunked): {chunked.memory('SFT').term('LM head') / GIB:.1f} GiB instead of "
                     f"{plan.memory('SFT').term('LM head') / GIB:.1f}, {chunked.memory('SFT').gpu_gib:.1f} GiB "
                     f"per GPU in all")
    if launcher.gpus > 1 or launcher.sharding != "none":
        notes.append(f"multi-GPU: torchrun --nproc_per_node {launcher.gpus} -m twlib.sft --config CONFIG "
                     "(FSDP2 over the same rows and loss as twlib.sft; see docs/full_scale.md)")
    return ["\nnotes:", *(f"  - {n}" for n in notes)] if notes else []


def _is_pgrpo_config(config_path) -> bool:
    """A P-GRPO config (twlib.pgrpo.PGRPOConfig) rather than an SFT one: it has rollout fields."""
    import yaml

    try:
        raw = yaml.safe_load(Path(config_path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "rollouts_per_prompt" in raw


def _pgrpo_dry_run(config_path, overrides=()) -> tuple[str, Plan]:
    """Validate a P-GRPO config, build its model on the meta device, and plan its RL phases."""
    from twlib.models import QWEN3_CONFIGS, REAL_TOKENIZER_PRESETS, count_parameters

    cfg = load_pgrpo_config(config_path, overrides)
    launcher = check_launch(cfg.launch, config_path)
    try:
        model, shape, model_note = resolve_model(cfg.model)
    except ConfigError:  # an SFT output directory not trained yet: its size is in its name (runs/qwen3-8b-...)
        names = sorted([*QWEN3_CONFIGS, *REAL_TOKENIZER_PRESETS], key=len, reverse=True)
        name = next((n for n in names if n.lower() in cfg.model.lower()), None)
        if name is None:
            raise
        model, shape, model_note = resolve_model(name)
        model_note = f"{cfg.model} (not trained yet; planned as {name}): {model_note}"
    pc = PlanConfig(model=shape.name, gpu=launcher.gpu, gpus=launcher.gpus, gpus_per_node=min(launcher.gpus, 8),
                    tokens=cfg.tokens_per_batch, rows=1, precision=launcher.precision or precision_of(cfg.dtype, cfg.autocast),
                    sharding=launcher.sharding, offload_optimizer=launcher.offload_optimizer,
                    checkpointing=launcher.gradient_checkpointing, logits=launcher.logits,
                    logits_chunk=launcher.logits_chunk, attn="flex_attention" if cfg.attn == "auto" else cfg.attn,
                    overhead_gib=launcher.overhead_gib)
    plan = make_plan(pc, schedule="paper" if shape.name == "Qwen3-8B" else "multiply", shape=shape)
    lines = [f"dry run: {config_path}",
             f"  config: valid PGRPOConfig (mode {cfg.mode}, {cfg.prompts_per_step} prompts x "
             f"{cfg.rollouts_per_prompt} rollouts, {cfg.steps} steps, lr {cfg.lr:g}, temperature {cfg.temperature:g}, "
             f"reward {cfg.acceleration}, std_normalize {cfg.std_normalize}, packing {cfg.packing})",
             f"  model: {model_note}",
             f"  parameters: {(n := count_parameters(model)):,} on the meta device; formula {plan.params:,} "
             f"({'equal' if n == plan.params else 'DIFFERENT: not a plain Qwen3 layout'})",
             *_sharding_lines(sharding_units(model), plan.config)]
    for memory in plan.memories:
        if memory.phase != "SFT":
            lines += _memory_lines(memory)
    if cfg.data is not None:
        found = Path(cfg.data).is_file()
        lines.insert(2, f"  prompts: {cfg.data} ({'found' if found else 'NOT FOUND yet: write it before launching'}), "
                        f"graded as {cfg.task!r}")
    lines += ["\nlaunch:", f"  torchrun --nproc_per_node {min(launcher.gpus, 8)} -m twlib.distributed_pgrpo --config "
              f"{config_path} --rollout {'vllm' if launcher.gpus > 1 else 'hf'}",
              "\nnotes:", "  - FSDP2 trainer + one rollout engine per rank, weights synced after every step "
              "(twlib.distributed_pgrpo; docs/full_scale.md section 3); one process: python -m twlib pgrpo"]
    if cfg.kl_coef > 0:  # the frozen reference is a sharded copy of the model in the trainer's storage dtype
        ref_bytes = plan.params * (2 if plan.config.precision == "bf16" else 4) / plan.config.gpus
        lines.append(f"  - kl_coef {cfg.kl_coef:g}: the frozen reference model adds its shards, "
                     f"{ref_bytes / GIB:.2f} GiB per GPU (not in the totals above), and one forward per micro-batch")
    return "\n".join(lines), plan


def dry_run_plan(config_path, overrides=()) -> tuple[str, Plan]:
    """(report, plan) of a twlib.sft or twlib.pgrpo config (with `--set KEY=VALUE` overrides); raises
    ConfigError / FileNotFoundError on a bad one."""
    from twlib.models import count_parameters

    if _is_pgrpo_config(config_path):
        return _pgrpo_dry_run(config_path, overrides)
    cfg = load_config(config_path, overrides)
    launcher = check_launch(cfg.launch, config_path)
    model, shape, model_note = resolve_model(cfg.model)
    unknown = [t for t in cfg.lora_targets if t not in LORA_TARGETS] if cfg.lora else []
    if unknown:
        raise ConfigError(f"{config_path}: field 'lora_targets': unknown module(s) {unknown}; "
                          f"known: {', '.join(LORA_TARGETS)}")
    schedule = "paper" if shape.name == "Qwen3-8B" else "multiply"
    plan = make_plan(plan_config_of(cfg, launcher, shape), schedule=schedule, shape=shape)
    lines = [*_header_lines(config_path, cfg, launcher, plan, model_note, count_parameters(model)),
             *_sharding_lines(sharding_units(model), plan.config), *_memory_lines(plan.memory("SFT")),
             *_notes(cfg, launcher, plan)]
    return "\n".join(lines), plan


def dry_run(config_path, overrides=()) -> str:
    """The dry-run report of a twlib.sft or twlib.pgrpo config (see dry_run_plan)."""
    return dry_run_plan(config_path, overrides)[0]


def add_dry_run_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--dry-run` for the trainers' command lines (twlib sft / pgrpo / distributed / distributed_pgrpo)."""
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config (with --set), build the model on the meta device, print the "
                             "sharding plan and memory estimate, and exit (twlib.plan)")
    return parser


def print_dry_run(args) -> int:
    """The trainers' `--dry-run`: the report on stdout and 0, or the error on stderr and 2."""

    try:
        print(dry_run(args.config, list(args.set or [])))
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--dry-run", metavar="CONFIG", help="validate a twlib.sft YAML config, print its sharding "
                        "plan and memory estimate (exit 2 on a bad config)")
    parser.add_argument("--preset", default="paper", help=f"starting point: {', '.join(HARDWARE)} (default paper: "
                        "8 x H100, Qwen3-8B, ZeRO-3 + offload; small-gpu: 1 x A10 24 GB, Qwen3-0.6B)")
    parser.add_argument("--model", help="Qwen3-0.6B | Qwen3-1.7B | Qwen3-8B (or a tiny preset)")
    parser.add_argument("--gpu", help=f"one of {', '.join(GPUS)}")
    parser.add_argument("--gpus", type=int, help="number of GPUs")
    parser.add_argument("--tokens", type=int, help="T: tokens of one packed trie row")
    parser.add_argument("--rows", type=int, help="rows per micro-batch per GPU")
    parser.add_argument("--precision", help=f"one of {', '.join(PRECISIONS)}")
    parser.add_argument("--sharding", help=f"one of {', '.join(SHARDINGS)}")
    parser.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                        help="offload optimizer states to host memory")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="activation (gradient) checkpointing")
    parser.add_argument("--logits", help=f"LM-head mode: {', '.join(LOGITS_MODES)}")
    parser.add_argument("--logits-chunk", type=int)
    parser.add_argument("--attn", help=f"one of {', '.join(ATTNS)}")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--lora-rank", type=int)
    parser.add_argument("--concurrent", type=int, help="RL: sequences decoding at once per GPU")
    parser.add_argument("--context", type=int, help="RL: KV tokens per sequence")
    parser.add_argument("--overhead-gib", type=float, help="fixed per-GPU overhead (default 1)")
    parser.add_argument("--schedule", help=f"work to time: {', '.join(SCHEDULES)} (default: the preset's)")
    parser.add_argument("--mean-tokens", type=int, help="tokens per SFT sample and per rollout")
    parser.add_argument("--mfu", type=float, help="model FLOPs utilisation (default 0.35)")
    parser.add_argument("--price", type=float, help="USD per GPU-hour (default: the GPU's list price)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def plan_from_args(args: argparse.Namespace) -> Plan:
    if args.preset not in HARDWARE:
        raise ValueError(f"unknown preset {args.preset!r}; known: {', '.join(HARDWARE)}")
    base, schedule_name = HARDWARE[args.preset]
    mapping = {"model": args.model, "gpu": args.gpu, "gpus": args.gpus, "tokens": args.tokens, "rows": args.rows,
               "precision": args.precision, "sharding": args.sharding, "offload_optimizer": args.offload,
               "checkpointing": args.checkpointing, "logits": args.logits, "logits_chunk": args.logits_chunk,
               "attn": args.attn, "lora": args.lora, "lora_rank": args.lora_rank, "concurrent": args.concurrent,
               "context": args.context, "overhead_gib": args.overhead_gib}
    config = dataclasses.replace(base, **{k: v for k, v in mapping.items() if v is not None})
    if args.gpus is not None:
        config.gpus_per_node = min(args.gpus, 8)
    schedule = SCHEDULES.get(args.schedule or schedule_name)
    if schedule is None:
        raise ValueError(f"unknown schedule {args.schedule!r}; known: {', '.join(SCHEDULES)}")
    if args.mean_tokens is not None:
        schedule = dataclasses.replace(schedule, mean_tokens=args.mean_tokens, rl_mean_tokens=args.mean_tokens)
    throughput = Throughput() if args.mfu is None else Throughput(mfu=args.mfu)
    return make_plan(config, throughput, schedule, price_per_hour=args.price)


def main_args(args: argparse.Namespace) -> int:
    """Run from parsed arguments (for `twlib.cli`); a bad config or value prints and returns 2."""

    try:
        if args.dry_run:
            report, plan = dry_run_plan(args.dry_run)
            print(json.dumps(plan.to_dict(), indent=1) if args.json else report)
            return 0
        plan = plan_from_args(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan)
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m twlib.plan", description=__doc__.split("\n")[0],
        epilog="All numbers are estimates; the assumptions are the fields of PlanConfig, Throughput and "
               "Schedule in twlib/plan.py."))
    return main_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
