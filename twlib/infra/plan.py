"""Memory, time and cost planner for full-scale runs (Qwen3-0.6B / 1.7B / 8B), and a dry run of a config.

    python -m twlib plan --model Qwen3-8B --gpus 8 --gpu h100-80gb --tokens 40960 --price 2.5
    python -m twlib plan --preset small-gpu --model Qwen3-1.7B --lora --precision bf16 [--json]
    python -m twlib plan --dry-run configs/qwen3-8b-sft.yaml

Every number printed here is an ESTIMATE from closed-form formulas, not a measurement. It is meant to
answer "does it fit, roughly how long, roughly how much", within maybe 10-30%. Measure before you buy.

Design choices (and where this deviates from the paper / the reference, and why)
- Parameter counts come from the config by formula (`param_count`), never from loading weights; the
  tests check them against `twlib.models.count_parameters(meta_model(name))`.
- Bytes per parameter follow one named convention per precision (`PRECISIONS`):
      bf16-mixed     bf16 weights 2 + bf16 grads 2 + fp32 master 4 + AdamW m, v 8 = 16 B  (the reference's
                     DeepSpeed bf16 mode; the ZeRO paper's "16 bytes per parameter")
      fp32-autocast  fp32 weights 4 + fp32 grads 4 + m, v 8 = 16 B; bf16 matmuls (twlib.train.sft with
                     dtype=float32, autocast=true: what the sft docstring recommends at lr 1e-5)
      bf16           bf16 weights, grads and AdamW states = 8 B (twlib.train.sft with dtype=bfloat16; updates
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

import dataclasses
import math
from dataclasses import dataclass

from twlib.config import LOGITS_ALIASES, LOGITS_MODES, SHARDINGS
from twlib.infra.sizes import (ADAPTER_BYTES, ATTNS, BLOCK, GIB, GPU, GPUS, LORA_TARGETS, ModelShape, PRECISIONS, Precision, autocast_weight_bytes, backward_extra_bytes, block_mask_bytes, dense_mask_bytes, get_gpu, kv_bytes_per_token, layer_activation_bytes, layer_params, linear_shapes, logits_bytes, logits_mode, lora_params, matmul_params, model_shape, param_count, root_params)


# the formulas' names too: a plan is read with them (twlib.infra.sizes)
__all__ = ["ADAPTER_BYTES", "ATTNS", "BLOCK", "GIB", "GPU", "GPUS", "HARDWARE", "LORA_TARGETS", "Memory", "ModelShape", "PRECISIONS", "Plan", "PlanConfig", "Precision", "SCHEDULES", "Schedule", "Term", "Throughput", "activation_terms", "autocast_weight_bytes", "backward_extra_bytes", "block_mask_bytes", "decode_step_s", "dense_mask_bytes", "flops_per_token", "get_gpu", "kv_bytes_per_token", "kv_capacity", "layer_activation_bytes", "layer_params", "linear_shapes", "logits_bytes", "logits_mode", "lora_params", "make_plan", "mask_comparison", "matmul_params", "model_shape", "optimizer_step_s", "param_count", "rl_memories", "rl_time", "rollout_non_kv", "root_params", "self_train_decode", "sft_memory", "sft_time", "state_terms"]


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
    # One 24 GB GPU, Qwen3-0.6B full fine-tune with twlib.train.sft, gradient checkpointing off (its
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
                 "(estimates from formulas: see `python -m twlib plan --help` and the twlib.infra.plan docstring)"]
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


def shard_count(c: PlanConfig) -> int:
    # FSDP / ZeRO-3 divide weights, grads and optimizer states by N; without sharding every GPU holds all
    return c.gpus if c.sharding != "none" else 1


def _units(s: ModelShape) -> list[tuple[str, int, int]]:
    return [("decoder layer", s.layers, layer_params(s)),
            ("root (embed_tokens + norm" + ("" if s.tied else " + lm_head") + ")", 1, root_params(s))]


def state_terms(c: PlanConfig, s: ModelShape, p: Precision) -> list[Term]:
    """Weights, gradients, optimizer states (sharded or not, offloaded or not) and the gathered FSDP units."""
    n, params = shard_count(c), param_count(s)
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
    shard = trained / shard_count(c)
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
