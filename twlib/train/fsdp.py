"""FSDP2 for the trainers: the process group, sharding, loading on rank 0, sharded checkpoints, the final save.

`twlib.train.sft` (and `twlib.train.pgrpo_fsdp`) run their loop over these when launched with torchrun:

    torchrun --nproc_per_node 8 -m twlib.train.sft --config configs/qwen3-8b-sft.yaml [--resume]
    torchrun --nproc_per_node 2 -m twlib.train.sft --config configs/tiny-parallel.yaml --set device=cpu
    python -m twlib.train.sft --config CONFIG --fsdp          (no torchrun: FSDP2 in one process, world size 1)

Design choices
- FSDP2 (`torch.distributed.fsdp.fully_shard`): one unit per decoder layer, plus a root unit. The root is
  a small module whose forward IS the loss of a micro-batch (`twlib.train.sft.TrieLoss`; P-GRPO passes its own):
  `twlib.trie.logprobs` calls the decoder body and the LM head separately, so the HF model's own forward
  never runs; making the loss the root's forward is what lets the root's hooks all-gather the embedding,
  final norm and LM head (tied weights stay in one unit).
- Data parallel over the SAME rows as one process: every rank builds all rows and takes every N-th row of
  the step, `chosen[rank::N]` (`rank_rows`). A rank with fewer rows than another runs a zero-weighted copy
  of a real row (`micro_batch_plan`), so every rank runs the same number of passes (the collectives match).
- Gradient reduction is a plain SUM (`set_gradient_divide_factor(1.0)` + `set_force_sum_reduction_for_comms`;
  gloo has no PREMUL_SUM): the loss is already divided by the step's global trained-token count
  (`global_trained`), so the summed gradient equals the single-process one (up to float summation order).
  Gradients are reduce-scattered after every micro-batch: FSDP2's no-sync keeps UNSHARDED gradients, a
  full fp32 copy of the model per GPU at 8B. The grad norm is the global one (DTensor).
- Precision (`precision`): on CUDA, fp32 sharded master weights and AdamW states with
  `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`, the planner's `bf16-mixed`;
  `dtype: bfloat16` gives pure bf16 instead. On CPU everything is fp32. `autocast` is not used.
- Loading (`load_base_on_rank0`, `shard_from_rank0`): only rank 0 materialises the weights (on the CPU).
  Every rank builds the architecture on the meta device, shards it, allocates its own shards only and
  receives rank 0's weights one tensor at a time (`set_model_state_dict(full_state_dict=True,
  broadcast_from_rank0=True)`; the non-persistent RoPE buffers by `broadcast`). A load error on rank 0 is
  raised on every rank. `LoadReport` says what each rank held.
- Checkpoints: `torch.distributed.checkpoint` (DCP), each rank writes its shards of the model and AdamW
  states (`checkpoint/dcp/`), plus the scheduler, per-rank RNG states, trainer state and config, swapped in
  by renames as `twlib.checkpoint` does. DCP re-shards on load, so a run may resume on another number of
  ranks; RNG states are then reset (training draws no random numbers). A shared filesystem is assumed.
- The final model is an ordinary `save_pretrained` directory: the full state dict is gathered to rank 0
  and saved through a meta-device copy of the model.
- Launch settings (`Launch`) come from the config's `launch:` section (`twlib.config.LaunchConfig`), then
  the command-line flags. `--max-position-embeddings 131072` lifts the model's position limit as the
  reference does for Qwen3-8B (no RoPE scaling is added).

Deviations and limits
- `--offload` uses FSDP2's `CPUOffloadPolicy`, which offloads parameters and gradients too (DeepSpeed's
  `offload_optimizer` keeps the bf16 parameters on the GPU). Not exercised on a GPU in this project's tests.
- No LoRA and no eval hook under FSDP (refused / ignored with a message). The CPU tests run on gloo;
  NCCL, bf16 and flex_attention paths run only on GPUs.
- A finished worker leaves with `exit_process` (see there): torch's teardown aborted about 1 run in 30.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from twlib import checkpoint
from twlib.checkpoint import CHECKPOINT, CHECKPOINT_OLD, CHECKPOINT_TMP, Runtime, quiet_hf_bars, rng_state, set_rng_state, swap_into_place
from twlib.config import DTYPES, ConfigError, DataError, read_launch, save_config
from twlib.trie import IGNORE, PackedTrie

__all__ = ["Launch", "launch_options", "Ranks", "init_ranks", "in_torchrun", "exit_process", "precision", "shard",
           "LoadReport", "load_base_on_rank0", "shard_from_rank0", "rank_rows", "micro_batch_plan", "all_sum",
           "global_trained", "clip_gradients", "save_dcp_checkpoint", "load_dcp_checkpoint", "save_final",
           "add_launch_arguments", "launch_from_args"]

LOGITS = ("chunked", "kept")
DCP_DIR = "dcp"


# ----------------------------------------------------------------------------------------------------
# Launch settings


@dataclass
class Launch:
    """What the FSDP2 run applies (from the config's `launch:` section, then the command line).

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


def launch_options(source=None, **overrides) -> Launch:
    """Launch settings from a config's `launch:` section (`source`: a config file or a LaunchConfig), then
    `overrides` (None values are ignored). The planner's logits mode "full" counts as "kept" here."""
    launch = Launch()
    if source is not None:
        section = read_launch(source) if isinstance(source, (str, os.PathLike)) else source
        launch.gradient_checkpointing = section.gradient_checkpointing
        launch.logits = "chunked" if section.logits == "chunked" else "kept"
        launch.logits_chunk = section.logits_chunk
        launch.offload = section.offload_optimizer
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


def in_torchrun() -> bool:
    """True in a process torchrun started (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _device(config) -> torch.device:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if config.device == "auto" or config.device.startswith("cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    raise ConfigError(f"field 'device': {config.device!r} is not supported under FSDP2 (cpu or cuda)")


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
        if in_torchrun():
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        created = True
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                 device, created)


def precision(config, device: torch.device):
    """(storage dtype, MixedPrecisionPolicy or None): fp32 master + bf16 compute on CUDA, fp32 on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return (DTYPES[config.dtype] if config.dtype != "auto" else torch.float32), None
    if config.dtype in ("bfloat16", "float16"):
        return DTYPES[config.dtype], None  # pure low precision, as asked
    return torch.float32, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model, ranks: Ranks, mask_kind: str, launch: Launch, mp_policy, root) -> torch.nn.Module:
    """Wrap the model in `root` (a loss module class taking (model, mask_kind, logits, logits_chunk):
    twlib.train.sft.TrieLoss, or twlib.train.pgrpo_fsdp's) and apply fully_shard: each decoder layer, then the
    root. The one place where a model becomes FSDP2 units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    options = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(),
               "offload_policy": CPUOffloadPolicy() if launch.offload else OffloadPolicy()}
    if launch.gradient_checkpointing:
        checkpoint.enable_gradient_checkpointing(model)
    for layer in model.model.layers:
        fully_shard(layer, **options)
    module = fully_shard(root(model, mask_kind, launch.logits, launch.logits_chunk), **options)
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
    storage dtype (`twlib.checkpoint.load_base_model`: a seeded preset, a folder or a cached hub id); the other
    ranks load nothing and receive its config. An error on rank 0 is raised on every rank."""
    full, error = None, None  # error: (is a ConfigError, message), sent to every rank
    if ranks.main:
        cpu = Runtime(torch.device("cpu"), storage_dtype, rt.attn, rt.mask_kind, False)
        try:
            full = checkpoint.load_base_model(config.model, tokenizer, config.seed, cpu)
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
    """The architecture of `model_config` on the meta device, built as `twlib.checkpoint.load_base_model` builds
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
                     root, trainable: bool = True):
    """(sharded root module, LoadReport): every rank builds `model_config` on the meta device, shards it
    (`shard`), allocates its own shards only and receives rank 0's weights from `full` (None elsewhere).
    `trainable=False`: a frozen copy in eval mode (the KL reference of twlib.train.pgrpo_fsdp)."""
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


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """The element-wise sum over ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()



def global_trained(rows: PackedTrie, chosen: torch.Tensor, mine: torch.Tensor, device: torch.device) -> int:
    """N of the step: the trained tokens of every rank's rows, all-reduced; checked against the count of
    `chosen` (every rank has all rows), which catches ranks that disagree about the data."""
    local = int((rows.labels.index_select(0, mine) != IGNORE).sum()) if len(mine) else 0
    total = int(all_sum([local], device)[0])
    expected = int((rows.labels.index_select(0, chosen) != IGNORE).sum())
    if total != expected:
        raise RuntimeError(f"ranks disagree about the step's rows: {total} trained tokens summed over ranks, "
                           f"{expected} expected")
    return total


# ----------------------------------------------------------------------------------------------------
# Checkpoints (DCP)


def save_dcp_checkpoint(out_dir: Path, module, optimizer, scheduler, state: dict, config, ranks: Ranks) -> None:
    """`out_dir/checkpoint/`: every rank's DCP shards, the scheduler, per-rank RNG states, trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp, final, old = out_dir / CHECKPOINT_TMP, out_dir / CHECKPOINT, out_dir / CHECKPOINT_OLD
    if ranks.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / DCP_DIR).mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / DCP_DIR))
    torch.save(rng_state(), tmp / f"rng-{ranks.rank}.pt")
    dist.barrier()
    if ranks.main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        save_config(config, tmp / "train_config.yaml")
        swap_into_place(tmp, final, old)
    dist.barrier()


def load_dcp_checkpoint(path: Path, module, optimizer, scheduler, ranks: Ranks) -> dict:
    """Restore a `save_dcp_checkpoint` directory into `module`, `optimizer`, `scheduler`; its trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / DCP_DIR / ".metadata").is_file():
        raise DataError(f"{path}: not an FSDP2 checkpoint (no {DCP_DIR}/.metadata); a one-process checkpoint "
                        f"resumes with `python -m twlib sft --resume` (without torchrun or --fsdp)")
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    trainer = json.loads((path / "trainer_state.json").read_text())
    rng = path / f"rng-{ranks.rank}.pt"
    if trainer.get("world_size") == ranks.world and rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return trainer


def save_final(out_dir: Path, module, model_config, tokenizer, config, ranks: Ranks) -> Path:
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
        with quiet_hf_bars():
            shell.save_pretrained(str(tmp), state_dict=weights)
            tokenizer.save_pretrained(str(tmp))
        save_config(config, tmp / "train_config.yaml")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def clip_gradients(optimizer, grad_clip: float) -> float:
    """Clip to a global L2 norm (off when <= 0); the norm before clipping, over all ranks."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def with_device(config, device: torch.device):
    """A copy of `config` whose device is this rank's."""
    clone = copy.copy(config)
    clone.device = device.type if device.type == "cpu" else f"cuda:{device.index}"
    return clone


# ----------------------------------------------------------------------------------------------------
# Command line


def add_launch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The memory-saver flags (defaults: the config's `launch:` section); shared with distributed_pgrpo."""
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="per-layer activation checkpointing (default: the config's launch section)")
    parser.add_argument("--logits", choices=LOGITS, default=None,
                        help="LM head: chunked recomputes each chunk's logits in the backward, kept keeps them "
                             "(default: the launch section, else chunked)")
    parser.add_argument("--logits-chunk", type=int, default=None, help="tokens per LM-head chunk (default 4096)")
    parser.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                        help="FSDP2 CPUOffloadPolicy (default: launch.offload_optimizer)")
    parser.add_argument("--max-position-embeddings", type=int, default=None,
                        help="set the model's max_position_embeddings (reference Qwen3-8B: 131072)")
    return parser


def launch_from_args(args: argparse.Namespace) -> Launch:
    return launch_options(args.config, gradient_checkpointing=args.gradient_checkpointing, logits=args.logits,
                          logits_chunk=args.logits_chunk, offload=args.offload,
                          max_position_embeddings=args.max_position_embeddings)

