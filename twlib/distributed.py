"""Distributed trie SFT: FSDP2 over the same rows and the same loss as `twlib.sft`.

    torchrun --nproc_per_node 8 -m twlib.distributed --config configs/qwen3-8b-sft.yaml [--resume]
    torchrun --nproc_per_node 2 -m twlib.distributed --config configs/tiny-parallel.yaml --set device=cpu
    python -m twlib.distributed --config CONFIG          (no torchrun: one process, world size 1)

Options besides the config (a `twlib.sft.SFTConfig` YAML, `--set key=value` overrides as in `twlib sft`):
`--gradient-checkpointing`, `--logits chunked|kept`, `--logits-chunk N`, `--offload`,
`--max-position-embeddings N`. Their defaults come from the config's `# launcher:` block (the comments
`twlib.plan` reads), so the planner and the trainer read the same settings from the same file.

What is shared with `twlib.sft` (reused, not copied): config loading and validation (`load_config`),
problems -> tries -> packed rows (`load_problems`, `build_trajectories`, `build_rows`), the epoch order
(`_epoch_order`: the rows of a step are a pure function of (seed, step)), the loss (`batch_loss`, i.e.
`twlib.trie.logprobs` with parent-pointer targets), the schedule (`lr_factor`), the AdamW parameter groups
(`_param_groups`), model and tokenizer loading, the metrics CSV columns and the atomic checkpoint swap.

Design choices
- FSDP2 (`torch.distributed.fsdp.fully_shard`): one unit per decoder layer, plus a root unit. The root is
  a small wrapper module (`TrieLoss`) whose forward IS the SFT loss of a micro-batch. `twlib.trie.logprobs`
  calls the decoder body and the LM head separately (it gathers hidden states at the parents before the
  head), so the HF model's own forward never runs; making the loss the root's forward is what lets the
  root's hooks all-gather the embedding, final norm and LM head (tied weights stay in one unit).
- Data parallel over the SAME rows as one process: every rank builds all rows (deterministic, checked by
  comparing the rows' fingerprint across ranks) and takes every N-th row of the step, `chosen[rank::N]`.
  A rank with fewer rows than another runs a zero-weighted copy of a real row, so every rank runs the same
  number of forward/backward passes (the collectives must match).
- Loss normalisation: each micro-batch backpropagates (sum of -log p over its trained tokens) / N_step,
  where N_step is the global number of trained tokens of the step: the per-rank counts are all-reduced
  (and checked against the count every rank can compute itself). FSDP's gradient reduce-scatter is set
  to a plain SUM (`set_gradient_divide_factor(1.0)` + `set_force_sum_reduction_for_comms(True)` on every
  unit; gloo has no PREMUL_SUM) instead of its default mean, so the summed
  gradient equals the single-process gradient of `twlib.sft.train` exactly (up to float summation order).
  Tested on CPU/gloo (tests/test_distributed.py): 2 ranks reproduce the single-process loss curve (to the
  6 printed decimals), grad norms (5.6e-7 relative) and final weights; also with checkpointing + chunked head.
- Gradients are reduce-scattered after every micro-batch (no `no_sync`): FSDP2's no-sync keeps UNSHARDED
  gradients, a full fp32 copy of the model per GPU at 8B. The grad norm is the global one (DTensor).
- Precision: on CUDA, fp32 sharded master weights and AdamW states with `MixedPrecisionPolicy(param_dtype
  =bfloat16, reduce_dtype=float32)`: bf16 all-gathers and matmuls, fp32 gradient reduction. That is the
  planner's `bf16-mixed` and what the reference's DeepSpeed bf16 mode amounts to; `dtype: bfloat16` in the
  config gives pure bf16 instead. On CPU everything is fp32 (no policy). `autocast` is not used here.
- Attention masks as in twlib.sft: `attn: auto` = flex_attention with the `BlockMask` on CUDA (never
  N x N), sdpa with the dense bool ancestor mask on CPU (FlexAttention has no CPU backward in torch 2.13).
- Activation checkpointing: `model.gradient_checkpointing_enable(use_reentrant=False)`, HF's per-decoder-
  layer checkpointing, composed with the per-layer FSDP units (FSDP2 skips its hooks during recompute).
  On when `--gradient-checkpointing`, the config's `gradient_checkpointing` field or the launcher block
  says so.
- LM head: `--logits chunked` (default) recomputes each chunk's [chunk x vocab] logits in the backward
  (`twlib.trie.logprobs` through `twlib.lm_head`: one chunk's buffer at a time); `--logits kept` keeps every
  chunk's fp32 logits for the backward (24.9 GB at 40,960 tokens x 151,936 vocab; same numbers).
- Loading: only rank 0 materialises the base model's weights (on the CPU, as `twlib.sft` loads them).
  Every rank builds the architecture on the meta device, shards it, allocates its own shards only
  (`to_empty`), and receives the weights from rank 0 one tensor at a time (`set_model_state_dict` with
  `full_state_dict=True, broadcast_from_rank0=True`; the non-persistent RoPE buffers by `broadcast`). Host
  memory: one full copy per node (rank 0's, freed once sharded) instead of one per rank (32 GB each at 8B
  in fp32); the other ranks peak at their shards plus the largest tensor (the 8B embedding, 2.5 GB in
  fp32). A load error on rank 0 is raised on every rank. `DistResult.load` reports what each rank held
  (tests/test_distributed.py checks that rank 1 never held a full copy and never called the loader).
- Checkpoints: `torch.distributed.checkpoint` (DCP), each rank writes its shards of the model and AdamW
  states in parallel (`checkpoint/dcp/`), plus the scheduler, per-rank RNG states, trainer state and config;
  written to `.checkpoint.tmp/` and swapped in by renames (`twlib.sft._swap_into_place`), so a crash at any
  instant leaves a complete `checkpoint/` or `checkpoint.old/`. DCP re-shards on load, so a run may resume
  on another number of ranks (the data order does not depend on it); RNG states are then reset (training
  draws no random numbers: no dropout). A shared filesystem is assumed (all ranks write one directory).
- The final model (`out_dir/final/`) is an ordinary `save_pretrained` directory: the full state dict is
  gathered to rank 0 and saved through a meta-device copy of the model, so every later stage (vLLM,
  `twlib.pgrpo`, `twlib eval`) loads it as usual. Rank 0 writes metrics.csv (the columns of twlib.sft) and
  result.json.
- Long context: `--max-position-embeddings 131072` sets the model config's field before the rows are built
  and saves it with the model, as the reference does for Qwen3-8B. Qwen3's default RoPE has no length
  parameter, so this only lifts the position limit (and vLLM's max_model_len later); it adds no RoPE
  scaling (add YaRN to the model config yourself if you want it). Trie positions are depths, so a
  40,960-token row never needs more than its longest path.

Deviations and limits
- `--offload` uses FSDP2's `CPUOffloadPolicy`, which offloads parameters and gradients too (DeepSpeed's
  `offload_optimizer` keeps the bf16 parameters on the GPU); the optimizer step then runs on the CPU.
  Not exercised on a GPU in this project's tests.
- No LoRA (an FSDP'd peft model needs its own wrapping policy) and no eval hook (it would need the full
  model on one rank); both are refused / ignored with a message. Use twlib.sft for those.
- The CPU test runs on gloo; NCCL, bf16 and flex_attention paths run only on GPUs.
- A finished worker leaves with `exit_process` (os._exit after flushing), skipping interpreter teardown:
  on CPU/gloo about 1 run in 30 aborted there (SIGABRT, "terminate called without an active exception")
  after every rank had written its results and destroyed the process group, which torchrun reports as
  a failed run.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from twlib import sft
from twlib.sft import ConfigError, DataError, batch_loss, load_config, lr_factor
from twlib.trie import IGNORE, PackedTrie

__all__ = ["Launch", "Ranks", "TrieLoss", "LoadReport", "load_base_on_rank0", "shard_from_rank0", "rank_rows",
           "micro_batch_plan", "launch_options", "train", "DistResult", "main"]

LOGITS = ("chunked", "kept")
DCP_DIR = "dcp"


# ----------------------------------------------------------------------------------------------------
# Launch options (what SFTConfig does not have)


@dataclass
class Launch:
    """Settings of the distributed run that are not SFTConfig fields.

    gradient_checkpointing   HF per-layer activation checkpointing (non-reentrant)
    logits, logits_chunk     "chunked" (each LM-head chunk recomputed in the backward) | "kept" (logits kept)
    offload                  FSDP2 CPUOffloadPolicy (parameters, gradients and optimizer step on the CPU)
    max_position_embeddings  override the model config's field (131072: the reference's Qwen3-8B runs)
    """

    gradient_checkpointing: bool = False
    logits: str = "chunked"
    logits_chunk: int = 4096
    offload: bool = False
    max_position_embeddings: int | None = None

    def validate(self) -> "Launch":
        if self.logits not in LOGITS:
            raise ConfigError(f"logits: expected one of {', '.join(LOGITS)} (got {self.logits!r})")
        if self.logits_chunk < 1:
            raise ConfigError(f"logits_chunk: must be >= 1 (got {self.logits_chunk})")
        if self.max_position_embeddings is not None and self.max_position_embeddings < 1:
            raise ConfigError(f"max_position_embeddings: must be >= 1 (got {self.max_position_embeddings})")
        return self


def launch_options(config_path=None, **overrides) -> Launch:
    """Launch settings from the config's `# launcher:` block (twlib.plan.read_launcher), then `overrides`
    (None values are ignored). The planner's logits mode "full" counts as "kept" here."""
    launch = Launch()
    if config_path is not None:
        from twlib.plan import read_launcher

        block = read_launcher(config_path)
        launch.gradient_checkpointing = block.gradient_checkpointing
        launch.logits = "chunked" if block.logits == "chunked" else "kept"
        launch.logits_chunk = block.logits_chunk
        launch.offload = block.offload_optimizer
    for key, value in overrides.items():
        if value is not None:
            setattr(launch, key, value)
    return launch.validate()


# ----------------------------------------------------------------------------------------------------
# Process group


@dataclass
class Ranks:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    created: bool  # this module initialised the process group (and destroys it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device(config) -> torch.device:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if config.device == "auto" or config.device.startswith("cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    raise ConfigError(f"field 'device': {config.device!r} is not supported by twlib.distributed (cpu or cuda)")


def exit_process(code: int = 0):
    """End this worker now, skipping interpreter teardown (atexit handlers, C++ static destructors).

    Measured on this project's 2-core CPU with scripts/stress_two_ranks.py: of 30 two-rank gloo runs of
    tests/test_distributed.py's worker exiting normally, one died with SIGABRT ("terminate called without
    an active exception") during teardown, after both ranks had written their results and called
    destroy_process_group: a race among torch's C++ threads at exit. With this call: 0 of 40. Call it only
    when the work is saved; stdout, stderr and logging are flushed first.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def init_ranks(config) -> Ranks:
    """Join the process group torchrun set up (env://), an existing one, or make a 1-process group.
    NCCL on CUDA (one GPU per rank: LOCAL_RANK), gloo on CPU."""
    device = _device(config)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        created = True
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                 device, created)


# ----------------------------------------------------------------------------------------------------
# The loss module (the FSDP root)


class TrieLoss(torch.nn.Module):
    """forward(batch, normalizer) -> (loss, trained tokens): the SFT loss of one micro-batch.

    Made the FSDP root so that its forward hooks gather the root unit (embeddings, final norm, LM head):
    the loss calls the decoder body and the head directly, never the HF model's forward."""

    def __init__(self, model, mask_kind: str, logits: str = "chunked", logits_chunk: int = 4096):
        super().__init__()
        self.model = model
        self.mask_kind, self.logits, self.logits_chunk = mask_kind, logits, logits_chunk

    def forward(self, batch: PackedTrie, normalizer: float):
        return batch_loss(self.model, batch, self.mask_kind, normalizer=normalizer, chunk_size=self.logits_chunk,
                          recompute=self.logits == "chunked")


def precision(config, device: torch.device):
    """(storage dtype, MixedPrecisionPolicy or None): fp32 master + bf16 compute on CUDA, fp32 on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return (sft.DTYPES[config.dtype] if config.dtype != "auto" else torch.float32), None
    if config.dtype in ("bfloat16", "float16"):
        return sft.DTYPES[config.dtype], None  # pure low precision, as asked
    return torch.float32, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model, ranks: Ranks, mask_kind: str, launch: Launch, mp_policy, root=None) -> torch.nn.Module:
    """Wrap the model in `root` (a loss module class taking (model, mask_kind, logits, logits_chunk);
    default TrieLoss, the SFT loss; twlib.distributed_pgrpo passes its own) and apply fully_shard: each
    decoder layer, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    options = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(),
               "offload_policy": CPUOffloadPolicy() if launch.offload else OffloadPolicy()}
    if launch.gradient_checkpointing:
        sft.enable_gradient_checkpointing(model)
    for layer in model.model.layers:
        fully_shard(layer, **options)
    module = fully_shard((root or TrieLoss)(model, mask_kind, launch.logits, launch.logits_chunk), **options)
    for unit in module.modules():
        if isinstance(unit, FSDPModule):  # SUM over ranks: the loss is already globally normalised
            unit.set_gradient_divide_factor(1.0)
            if hasattr(unit, "set_force_sum_reduction_for_comms"):
                unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return module


# ----------------------------------------------------------------------------------------------------
# Loading: the full weights on rank 0 only


@dataclass
class LoadReport:
    """What one rank held while a model was loaded and sharded (see the module docstring, "Loading").

    full_copy_bytes    bytes of the base model's parameters this rank materialised (rank 0's full copy)
    meta_until_shard   every parameter of the model this rank sharded was on the meta device until sharded
    shard_bytes        bytes of this rank's parameter shards once the weights arrived
    """

    full_copy_bytes: int
    meta_until_shard: bool
    shard_bytes: int


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params if not p.is_meta)


def load_base_on_rank0(config, tokenizer, rt, storage_dtype: torch.dtype, ranks: Ranks, source=None):
    """(full model or None, model config). Rank 0 loads the base model with its weights on the CPU in the
    storage dtype (`twlib.sft.load_base_model`: a seeded preset, a folder or a cached hub id); the other
    ranks load nothing and receive its config. An error on rank 0 is raised on every rank."""
    full, error = None, None  # error: (is a ConfigError, message), sent to every rank
    if ranks.main:
        cpu = sft.Runtime(torch.device("cpu"), storage_dtype, rt.attn, rt.mask_kind, False)
        try:
            full = sft.load_base_model(config.model, tokenizer, config.seed, cpu)
        except ConfigError as e:
            error = (True, f"{source or 'config'}: {e}")
        except Exception as e:
            dist.broadcast_object_list([(None, (False, f"{type(e).__name__}: {e}"))], src=0)
            raise  # the original exception on rank 0, a RuntimeError naming it elsewhere
    box = [(copy.deepcopy(full.config) if full is not None else None, error)]
    dist.broadcast_object_list(box, src=0)
    model_config, error = box[0]
    if error is not None:
        if error[0]:
            raise ConfigError(error[1])
        raise RuntimeError(f"rank 0 could not load the base model: {error[1]}")
    return full, model_config


def meta_model_like(model_config, attn: str, storage_dtype: torch.dtype):
    """The architecture of `model_config` on the meta device, built as `twlib.sft.load_base_model` builds
    it (fp32, then cast: buffers get the same dtypes). No storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(model_config), attn_implementation=attn,
                                                 dtype=torch.float32)
    return model.to(storage_dtype)


def _broadcast_weights(module, full, ranks: Ranks) -> None:
    """Rank 0's `full` weights into every rank's shards of `module` (a root wrapping it as `.model`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = {f"model.{k}": v for k, v in full.state_dict().items()} if full is not None else {}
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    sources = dict(full.named_buffers()) if full is not None else {}
    with torch.no_grad():
        for name, buffer in module.named_buffers():  # RoPE's inv_freq is in no state dict
            if ranks.main:
                source = sources[name.removeprefix("model.")]
                if source.dtype != buffer.dtype or source.shape != buffer.shape:
                    raise RuntimeError(f"buffer {name}: {source.dtype} {tuple(source.shape)} on rank 0, "
                                       f"{buffer.dtype} {tuple(buffer.shape)} in the sharded model")
                buffer.copy_(source)
            dist.broadcast(buffer, src=0)


def shard_from_rank0(full, model_config, ranks: Ranks, rt, storage_dtype: torch.dtype, launch: Launch, mp_policy,
                     root=None, trainable: bool = True):
    """(sharded root module, LoadReport): every rank builds `model_config` on the meta device, shards it
    (`shard`), allocates its own shards only and receives rank 0's weights from `full` (None elsewhere).
    `trainable=False`: a frozen copy in eval mode (the KL reference of twlib.distributed_pgrpo)."""
    model = meta_model_like(model_config, rt.attn, storage_dtype)
    if trainable:
        model.train()
    else:
        model.eval().requires_grad_(False)
    meta_until_shard = all(p.is_meta for p in model.parameters())
    count = len(list(model.parameters()))
    module = shard(model, ranks, rt.mask_kind, launch, mp_policy, root=root)
    module.to_empty(device=torch.device("cpu") if launch.offload else ranks.device)
    if len(list(module.parameters())) != count:
        raise RuntimeError(f"{count} parameters before allocating the shards, {len(list(module.parameters()))} "
                           f"after: tied weights came apart")
    if launch.offload:  # parameters stay on the host (CPUOffloadPolicy); buffers are used on the GPU
        for sub in module.modules():
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None:
                    sub._buffers[name] = buffer.to(ranks.device)
    _broadcast_weights(module, full, ranks)
    shard_bytes = _param_bytes(p.to_local() if hasattr(p, "to_local") else p for p in module.parameters())
    full_bytes = _param_bytes(full.parameters()) if full is not None else 0
    return module, LoadReport(full_bytes, meta_until_shard, shard_bytes)


# ----------------------------------------------------------------------------------------------------
# Rows per rank


def rank_rows(chosen: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The rows of a step this rank trains on: every `world`-th one, starting at `rank`."""
    return chosen[rank::world]


def micro_batch_plan(n_mine: int, n_step: int, world: int, rows_per_micro_batch: int) -> list[range | None]:
    """Index ranges into this rank's rows, one per micro-batch; None = a zero-weighted filler pass.

    Every rank gets the same number of passes: that of the rank with the most rows, ceil(n_step / world)."""
    most = -(-n_step // world)
    passes = max(1, -(-most // rows_per_micro_batch))
    plan = []
    for m in range(passes):
        lo = m * rows_per_micro_batch
        plan.append(range(lo, min(lo + rows_per_micro_batch, n_mine)) if lo < n_mine else None)
    return plan


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def global_trained(rows: PackedTrie, chosen: torch.Tensor, mine: torch.Tensor, device: torch.device) -> int:
    """N of the step: the trained tokens of every rank's rows, all-reduced; checked against the count of
    `chosen` (every rank has all rows), which catches ranks that disagree about the data."""
    local = int((rows.labels.index_select(0, mine) != IGNORE).sum()) if len(mine) else 0
    total = int(_all_sum([local], device)[0])
    expected = int((rows.labels.index_select(0, chosen) != IGNORE).sum())
    if total != expected:
        raise RuntimeError(f"ranks disagree about the step's rows: {total} trained tokens summed over ranks, "
                           f"{expected} expected")
    return total


# ----------------------------------------------------------------------------------------------------
# Checkpoints (DCP)


def _save_checkpoint(out_dir: Path, module, optimizer, scheduler, state: dict, config, ranks: Ranks) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp, final, old = out_dir / sft.CHECKPOINT_TMP, out_dir / sft.CHECKPOINT, out_dir / sft.CHECKPOINT_OLD
    if ranks.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / DCP_DIR).mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / DCP_DIR))
    torch.save(sft._rng_state(), tmp / f"rng-{ranks.rank}.pt")
    dist.barrier()
    if ranks.main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        sft.save_config(config, tmp / "train_config.yaml")
        sft._swap_into_place(tmp, final, old)
    dist.barrier()


def _load_checkpoint(path: Path, module, optimizer, scheduler, ranks: Ranks) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / DCP_DIR / ".metadata").is_file():
        raise DataError(f"{path}: not a twlib.distributed checkpoint (no {DCP_DIR}/.metadata); a twlib.sft "
                        f"checkpoint resumes with `python -m twlib sft --resume`")
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    trainer = json.loads((path / "trainer_state.json").read_text())
    rng = path / f"rng-{ranks.rank}.pt"
    if trainer.get("world_size") == ranks.world and rng.is_file():
        sft._set_rng_state(torch.load(rng, weights_only=False))
    return trainer


def _save_final(out_dir: Path, module, model_config, tokenizer, config, ranks: Ranks) -> Path:
    """Gather the full state dict to rank 0 and write an ordinary save_pretrained directory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = out_dir / "final"
    if ranks.main:
        weights = {k.removeprefix("model."): v for k, v in full.items()}
        tmp = out_dir / ".final.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(model_config)  # no storage: only config + save logic
        with sft._NoHFBars():
            shell.save_pretrained(str(tmp), state_dict=weights)
            tokenizer.save_pretrained(str(tmp))
        sft.save_config(config, tmp / "train_config.yaml")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


# ----------------------------------------------------------------------------------------------------
# The loop


@dataclass
class DistResult:
    steps: int
    final_loss: float  # loss of the last optimizer step (before its update)
    mean_loss_last: float  # mean loss of the last `log_every` steps of this run
    wall_s: float
    train_s: float
    tokens: int
    trained_tokens: int
    tokens_per_s: float
    out_dir: str
    final_dir: str
    rows: int
    world_size: int
    load: dict = field(default_factory=dict)  # this rank's LoadReport
    losses: list = field(default_factory=list, repr=False)  # per step of this run

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "losses"}


def _check_config(config, log) -> None:
    if config.eval_hook is not None:
        log("warning: eval_hook is ignored by twlib.distributed (it needs the full model on one rank)")
    if config.autocast:
        log("note: autocast is not used; on CUDA the FSDP mixed-precision policy computes in bfloat16")


def _build_data(config, tokenizer, model, source, ranks: Ranks, log):
    problems, tries, rows = sft.training_rows(config, tokenizer, model, source, log)
    fingerprint = sft._fingerprint(rows)
    prints = [None] * ranks.world
    dist.all_gather_object(prints, fingerprint)
    if len(set(prints)) != 1:
        raise DataError(f"ranks built different rows (fingerprints {sorted(set(prints))}): the data must be "
                        f"identical on every rank")
    return problems, tries, rows, fingerprint


def _step(module, optimizer, scheduler, rows, chosen, config, ranks: Ranks) -> dict:
    """One optimizer step over the step's rows `chosen`, split across ranks."""
    mine = rank_rows(chosen, ranks.rank, ranks.world)
    normalizer = max(global_trained(rows, chosen, mine, ranks.device), 1)
    loss_sum, tokens = 0.0, 0
    for part in micro_batch_plan(len(mine), len(chosen), ranks.world, config.rows_per_micro_batch):
        batch = sft._select(rows, mine[part.start:part.stop] if part is not None else chosen[:1])
        loss, _ = module(batch, normalizer)
        if part is None:
            loss = loss * 0.0  # a filler pass: same collectives, no contribution
        loss.backward()
        if part is not None:
            loss_sum += float(loss.detach())
            tokens += batch.num_tokens
    grad_norm = _clip(optimizer, config.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss_sum, tokens = _all_sum([loss_sum, tokens], ranks.device)
    return {"loss": loss_sum, "tokens": int(tokens), "trained": normalizer, "grad_norm": grad_norm}


def _clip(optimizer, grad_clip: float) -> float:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def train(config, launch: Launch | None = None, on_step: Callable[[int, dict], None] | None = None,
          quiet: bool = False, source: str | None = None) -> DistResult:
    """Run distributed SFT (call on every rank). `on_step(step, metrics_row)` runs on every rank after each
    step (after any checkpoint); raising from it on every rank stops the run there (tests: interruption)."""
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(int(config.threads))
    ranks = None
    try:
        config = copy.copy(config)
        config.validate(source or "config")
        if config.lora:
            raise ConfigError(f"{source or 'config'}: field 'lora': twlib.distributed does full fine-tuning only; "
                              f"use twlib.sft for LoRA")
        ranks = init_ranks(config)
        return _train(config, (launch or Launch()).validate(), ranks, on_step, quiet, source)
    finally:
        torch.set_num_threads(threads)
        if ranks is not None and ranks.created:
            dist.destroy_process_group()


def _train(config, launch: Launch, ranks: Ranks, on_step, quiet: bool, source) -> DistResult:
    wall_start = time.perf_counter()
    launch = copy.copy(launch)

    def log(message: str) -> None:
        if ranks.main and not quiet:
            print(message, flush=True)

    _check_config(config, log)
    rt = sft.resolve_runtime(_with_device(config, ranks.device))
    storage_dtype, mp_policy = precision(config, ranks.device)
    out_dir = Path(config.out_dir)
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    checkpoint = sft.find_checkpoint(out_dir) if config.resume else None
    if checkpoint is None:
        torch.manual_seed(config.seed)
        if config.resume:
            log(f"resume: no checkpoint in {out_dir}, starting from scratch")

    tokenizer = sft.load_tokenizer(config.model)
    if config.mode != "sequential":  # as twlib.sft: every tag one token, else an error naming prepare-model
        sft.require_single_token_tags(tokenizer, config.model)
    if config.gradient_checkpointing:
        launch.gradient_checkpointing = True
    full, model_config = load_base_on_rank0(config, tokenizer, rt, storage_dtype, ranks, source)
    if launch.max_position_embeddings is not None:
        model_config.max_position_embeddings = launch.max_position_embeddings
    module, load = shard_from_rank0(full, model_config, ranks, rt, storage_dtype, launch, mp_policy)
    del full  # rank 0's full copy: every rank now holds its shards
    model = module.model
    problems, tries, rows, fingerprint = _build_data(config, tokenizer, model, source, ranks, log)

    n_rows = rows.shape[0]
    rows_per_step = config.rows_per_micro_batch * config.grad_accum
    spe = sft._steps_per_epoch(n_rows, rows_per_step)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * spe))
    warmup_steps = round(config.warmup * total_steps)
    optimizer = torch.optim.AdamW(sft._param_groups(module, config.weight_decay), lr=config.lr,
                                  betas=tuple(config.betas), eps=config.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, config.min_lr_ratio))

    start_step, train_s, tokens_seen, trained_seen = 0, 0.0, 0, 0
    if checkpoint is not None:
        trainer = _load_checkpoint(checkpoint, module, optimizer, scheduler, ranks)
        if trainer.get("fingerprint") != fingerprint:
            raise DataError(f"{checkpoint}: the checkpoint was trained on different rows; use a new out_dir "
                            f"or resume=false")
        start_step, train_s = int(trainer["step"]), float(trainer.get("train_s", 0.0))
        tokens_seen, trained_seen = int(trainer.get("tokens", 0)), int(trainer.get("trained_tokens", 0))
        log(f"resumed from {checkpoint} at step {start_step} (saved by {trainer.get('world_size')} rank(s), "
            f"now {ranks.world})")

    metrics_path = out_dir / "metrics.csv"
    if ranks.main:
        if start_step == 0 and metrics_path.exists():
            metrics_path.unlink()
        sft._truncate_metrics(metrics_path, start_step)
    log(f"distributed sft: {ranks.world} rank(s) on {ranks.device.type}, FSDP2 ({len(model.model.layers)} layer "
        f"units + root), storage {str(storage_dtype).removeprefix('torch.')}, compute "
        f"{'bfloat16' if mp_policy else str(storage_dtype).removeprefix('torch.')}, attn {rt.attn}, "
        f"checkpointing {launch.gradient_checkpointing}, logits {launch.logits}, offload {launch.offload}")
    log(f"data: {len(problems)} problems, {len(tries)} trajectories, {n_rows} rows of <= {config.tokens_per_batch} "
        f"tokens; {rows_per_step} rows per step (~{-(-rows_per_step // ranks.world)} per rank); {total_steps} steps")

    def trainer_state(step: int, loss: float) -> dict:
        return {"step": step, "epoch": step // spe, "position": (step % spe) * rows_per_step,
                "rows_done": step * rows_per_step, "total_steps": total_steps, "train_s": train_s,
                "tokens": tokens_seen, "trained_tokens": trained_seen, "loss": loss, "fingerprint": fingerprint,
                "rows": n_rows, "world_size": ranks.world, "format": "dcp"}

    losses: list[float] = []
    order_epoch, order = -1, None
    writer_file = metrics_path.open("a", newline="") if ranks.main else None
    try:
        writer = csv.DictWriter(writer_file, fieldnames=sft.METRICS_FIELDS) if writer_file else None
        if writer and metrics_path.stat().st_size == 0:
            writer.writeheader()
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            epoch, k = divmod(step, spe)
            if epoch != order_epoch:
                order, order_epoch = sft._epoch_order(n_rows, config.seed, epoch), epoch
            lr_now = optimizer.param_groups[0]["lr"]
            out = _step(module, optimizer, scheduler, rows, order[k * rows_per_step:(k + 1) * rows_per_step],
                        config, ranks)
            dt = time.perf_counter() - t0
            train_s += dt
            tokens_seen += out["tokens"]
            trained_seen += out["trained"]
            losses.append(out["loss"])
            done = step + 1
            row = {"step": done, "epoch": round(done / spe, 4), "loss": round(out["loss"], 6),
                   "lr": f"{lr_now:.6g}", "grad_norm": round(out["grad_norm"], 6), "tokens": out["tokens"],
                   "trained_tokens": out["trained"], "tokens_per_s": round(out["tokens"] / dt, 1),
                   "elapsed_s": round(train_s, 3)}
            if writer:
                writer.writerow(row)
                writer_file.flush()
            if done % config.log_every == 0 or done == total_steps:
                recent = losses[-config.log_every:]
                log(f"step {done}/{total_steps} loss {sum(recent) / len(recent):.4f} lr {lr_now:.3g} "
                    f"grad_norm {out['grad_norm']:.3g} tok/s {tokens_seen / max(train_s, 1e-9):.0f} "
                    f"elapsed {train_s:.0f}s")
            if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == total_steps):
                _save_checkpoint(out_dir, module, optimizer, scheduler, trainer_state(done, out["loss"]), config,
                                 ranks)
            if on_step is not None:
                on_step(done, row)
    finally:
        if writer_file:
            writer_file.close()

    final_dir = _save_final(out_dir, module, model_config, tokenizer, config, ranks)
    recent = losses[-config.log_every:]
    result = DistResult(
        steps=total_steps, final_loss=losses[-1] if losses else float("nan"),
        mean_loss_last=sum(recent) / len(recent) if recent else float("nan"),
        wall_s=time.perf_counter() - wall_start, train_s=train_s, tokens=tokens_seen, trained_tokens=trained_seen,
        tokens_per_s=tokens_seen / train_s if train_s else 0.0, out_dir=str(out_dir), final_dir=str(final_dir),
        rows=n_rows, world_size=ranks.world, load=vars(load), losses=losses)
    if ranks.main:
        (out_dir / "result.json").write_text(json.dumps(
            {**result.to_dict(), "steps_this_run": len(losses), "launch": vars(launch)}, indent=1))
    log(f"done: {total_steps} steps on {ranks.world} rank(s), loss {result.mean_loss_last:.4f}, "
        f"{result.tokens_per_s:.0f} tok/s -> {final_dir}")
    return result


def _with_device(config, device: torch.device):
    clone = copy.copy(config)
    clone.device = device.type if device.type == "cpu" else f"cuda:{device.index}"
    return clone


# ----------------------------------------------------------------------------------------------------
# Command line


def add_launch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The memory-saver flags (defaults: the config's `# launcher:` block); shared with distributed_pgrpo."""
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="per-layer activation checkpointing (default: the '# launcher:' block)")
    parser.add_argument("--logits", choices=LOGITS, default=None,
                        help="LM head: chunked recomputes each chunk's logits in the backward, kept keeps them "
                             "(default: the launcher block, else chunked)")
    parser.add_argument("--logits-chunk", type=int, default=None, help="tokens per LM-head chunk (default 4096)")
    parser.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                        help="FSDP2 CPUOffloadPolicy (default: the launcher's offload_optimizer)")
    parser.add_argument("--max-position-embeddings", type=int, default=None,
                        help="set the model's max_position_embeddings (reference Qwen3-8B: 131072)")
    return parser


def launch_from_args(args: argparse.Namespace) -> Launch:
    return launch_options(args.config, gradient_checkpointing=args.gradient_checkpointing, logits=args.logits,
                          logits_chunk=args.logits_chunk, offload=args.offload,
                          max_position_embeddings=args.max_position_embeddings)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="YAML file of twlib.sft.SFTConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint if present")
    from twlib.plan import add_dry_run_argument

    return add_launch_arguments(add_dry_run_argument(parser))


def main_args(args: argparse.Namespace) -> int:
    if args.dry_run:
        from twlib.plan import print_dry_run

        return print_dry_run(args)
    try:
        overrides = list(args.set or []) + (["resume=true"] if args.resume else [])
        config = load_config(args.config, overrides)
        train(config, launch_from_args(args), source=str(args.config))
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m twlib.distributed",
                                                   description=__doc__.split("\n")[0]))
    return main_args(parser.parse_args(argv))


if __name__ == "__main__":
    exit_process(main())
