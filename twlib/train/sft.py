"""Supervised fine-tuning: trie SFT of parallel trajectories, the sequential baseline and the leakage ablation.

    python -m twlib sft --config configs/tiny-parallel.yaml [--set lr=1e-3 --set max_steps=50] [--resume]
    torchrun --nproc_per_node 8 -m twlib.train.sft --config configs/qwen3-8b-sft.yaml      (FSDP2 over 8 ranks)

One training loop, three ways to turn a problem into a training row (`mode`):

- `"parallel"`: the trie of the 5-phase state machine's calls, `engine_calls(problem.parallel, prompt)`
  packed by `twlib.trie.pack`: every thread sees the shared prefix and itself only, exactly as at
  inference (spec section 4).
- `"sequential"`: the sequential baseline, `problem.sequential` as an ordinary causal sequence
  (`twlib.trie.sequential_row`: a chain-shaped trie, so it goes through the same code).
- `"causal"`: the leakage ablation. The *parallel* text, prompt + response, as ONE causal chain: later
  threads see their siblings in training, which they never do at inference.

The objective (paper notation). For an optimizer step over the rows R of the accumulated batch, with T(r)
the trained nodes of row r (the completion tokens of the calls for loss policy `"completions"`; every
response token of every path for `"paper"`, see `twlib.trie`):

    L(theta) = -(1/N) * sum_{r in R} sum_{i in T(r)} log p_theta(x_i | x_{anc(i)}),     N = sum_r |T(r)|

where anc(i) are the ancestors of node i in its trie and x_i is predicted from the hidden state of
parent(i) (parent-pointer targets, not a flat shift). log p comes from `twlib.trie.logprobs`, the same
primitive P-GRPO uses. N counts the whole accumulated batch, so gradient accumulation gives the same
gradient as one big batch (each micro-batch backpropagates its sum divided by the step's N).

Optimizer: AdamW(lr, betas, eps, weight_decay), with decay on matrices only: no decay on norms, biases
and the (tied) embedding, the usual transformer practice (the reference's DeepSpeed AdamW decays
everything; at 1e-4..1e-2 the difference is negligible). Schedule, S optimizer steps, W = round(warmup*S),
rho = min_lr_ratio, s = 0..S-1:

    lr_s = lr * (s+1)/W                                                   for s < W
    lr_s = lr * (rho + (1-rho) * (1 + cos(pi * (s-W)/max(1, S-W-1))) / 2)   otherwise   (last step: rho*lr)

Gradients are clipped to a global L2 norm of `grad_clip`; the logged grad_norm is the norm before clipping.

Defaults follow the reference SFT (spec section 6) where they transfer: AdamW betas (0.9, 0.95), weight
decay 0.01 (paper; the code uses 1e-4), 5% linear warm-up, cosine decay, clipping at 1.0. The peak lr is
far higher (1e-3..3e-3 against 1e-5) because the models are tiny and the base is trained from scratch,
and the cosine ends at `min_lr_ratio * lr` (0.1; set 0 for a decay to zero). The reference's effective
batch is 16 samples of up to 40,960 tokens; here a step is `rows_per_micro_batch * grad_accum` rows of
`tokens_per_batch` tokens.

Design choices, and where we deviate from the reference
- ONE loop for one process and for N ranks (`train`): the loop asks a run object for this rank's share
  of the step's rows, the step's global trained-token count, the clipped global grad norm, and for
  checkpoints. `LocalRun` (world size 1, the default) trains the plain model; `FSDPRun` (under torchrun,
  or `--fsdp`) shards it with FSDP2 (twlib.train.fsdp). Both build the same rows in the same order and
  divide by the same N, so 2 ranks reproduce the one-process curve (tests/test_distributed.py).
- Rows are built once, deterministically: one trie per trajectory, first-fit-decreasing packed into rows
  of at most `tokens_per_batch` trie tokens (`twlib.trie.collate`), so a "row" is what the reference calls
  a sample of its 40,960-token block. Each epoch visits the rows in a permutation drawn from
  `(seed, epoch)` alone, so the data position is a pure function of the step: resuming needs only the
  step number. `max_steps`, when set, wins over `epochs` (and defines the schedule length).
- Padding is trimmed per micro-batch (rows are padded at the end), so short rows cost nothing extra.
- Masks, dtype and device: `twlib.checkpoint.resolve_runtime` (sdpa + dense bool mask on CPU,
  flex_attention + BlockMask on CUDA; float32 on CPU, bfloat16 on CUDA). The parameters themselves are
  cast (no `torch.autocast`). Caveat: pure-bf16 AdamW rounds away updates smaller than ~2^-8 of a weight,
  so at the reference's lr 1e-5 on a real 8B model use `dtype=float32` plus `autocast=true` (one process)
  or FSDP2's mixed precision (fp32 master weights, bf16 matmuls), which is what DeepSpeed bf16 amounts to.
- The LM head runs in chunks recomputed in the backward (`launch.logits: chunked`, `twlib.lm_head`);
  `kept` keeps each chunk's logits instead (same numbers, more memory).
- Full fine-tuning by default (as the paper); `lora=true` (one process) wraps the model with a peft LoRA
  adapter; the final model is saved merged, the adapter also on its own (`final/adapter`).
- Checkpoints (`checkpoint_every` steps, and at the end) are atomic (twlib.checkpoint); with
  `resume=true` the run continues from the checkpoint and ends with weights equal (`torch.equal`, on CPU)
  to an uninterrupted run. A changed data set is detected (fingerprint of the rows) and refused.
- The eval hook (`eval_hook`, a callable, never in YAML; one process only) runs every `eval_every` steps
  and at the end, in eval mode, under no_grad, with all RNG states forked: evaluating never changes training.
- Bad input fails early and names the culprit: config fields (twlib.config), a missing data file, an empty
  data set, a trajectory longer than `tokens_per_batch` (with the fix). A trajectory that fails
  `twlib.format.parse` is skipped with one warning that counts them; if all fail, it is an error.
- Relative paths in a config (model, data, out_dir) are relative to the working directory (the repo root).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from twlib.train import fsdp as fsdp
from twlib.checkpoint import (console, find_checkpoint, fork_rng, load_checkpoint_state, load_tokenizer, resolve_runtime,
                              torch_threads)
from twlib.config import MODES, ConfigError, DataError, SFTConfig, apply_overrides, load_config, save_config
from twlib.metrics import MetricsLog
from twlib.infra.planner import add_dry_run_argument, print_dry_run
from twlib.train.data import (build_rows, build_trajectories, epoch_order, eval_problems, fingerprint, get_task_config,
                              load_problems, select_rows, steps_per_epoch, trajectory_pairs, training_rows)
from twlib.train.runs import FSDPRun, LocalRun
from twlib.trie import IGNORE, PackedTrie, logprobs

__all__ = ["SFTResult", "batch_loss", "lr_factor", "param_groups", "TrieLoss", "train", "sequential_accuracy", "main",
           "main_args",
           # re-exported: what a reader of a trainer reaches for (defined in twlib.config, twlib.checkpoint,
           # twlib.train.data)
           "MODES", "SFTConfig", "ConfigError", "DataError", "load_config", "save_config", "apply_overrides",
           "load_problems", "eval_problems", "get_task_config", "trajectory_pairs", "build_trajectories", "build_rows",
           "LocalRun", "FSDPRun", "load_checkpoint_state", "find_checkpoint", "load_tokenizer", "resolve_runtime"]

METRICS_FIELDS = ["step", "epoch", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "tokens_per_s",
                  "elapsed_s"]


# ----------------------------------------------------------------------------------------------------
# Data: problems -> tries -> packed rows


# ----------------------------------------------------------------------------------------------------
# Loss, schedule, optimizer


def batch_loss(model, batch: PackedTrie, mask_kind: str = "bool", normalizer: float | None = None,
               chunk_size: int = 4096, recompute: bool = True):
    """(loss, trained) for one micro-batch: sum over trained nodes of -log p / `normalizer` (default: the
    micro-batch's own trained count), with log p from `twlib.trie.logprobs` (LM head in chunks of
    `chunk_size` nodes, each recomputed in the backward unless `recompute=False`)."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    batch = batch.to(device)
    mask = batch.attention_mask(mask_kind, dtype=dtype if dtype.is_floating_point else torch.float32)
    lp = logprobs(model, batch, mask=mask, chunk_size=chunk_size, recompute=recompute)
    trained = batch.labels != IGNORE
    count = int(trained.sum())
    total = -(lp * trained).sum()
    return total / (normalizer if normalizer is not None else max(count, 1)), count


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warm-up, cosine to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps - 1))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices only (no decay on norms, biases and the tied embedding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups




class TrieLoss(torch.nn.Module):
    """forward(batch, normalizer) -> (loss, trained tokens): `batch_loss` of one micro-batch.

    The module the loop calls in one process and on every rank; under FSDP2 it is the root unit, so its
    forward hooks gather the embeddings, final norm and LM head (the loss calls the decoder body and the
    head directly, never the HF model's forward). `logits`: "chunked" recomputes each LM-head chunk in
    the backward, "kept" keeps the chunks' logits (same numbers)."""

    def __init__(self, model, mask_kind: str, logits: str = "chunked", logits_chunk: int = 4096):
        super().__init__()
        self.model = model
        self.mask_kind, self.logits, self.logits_chunk = mask_kind, logits, logits_chunk

    def forward(self, batch: PackedTrie, normalizer: float):
        return batch_loss(self.model, batch, self.mask_kind, normalizer=normalizer, chunk_size=self.logits_chunk,
                          recompute=self.logits == "chunked")


@dataclass
class SFTResult:
    steps: int
    final_loss: float  # loss of the last optimizer step (before its update)
    mean_loss_last: float  # mean loss of the last `log_every` steps
    wall_s: float  # whole call: set-up, data, training, checkpoints, final save
    train_s: float  # optimizer steps only (summed over resumed segments)
    tokens: int  # real (non-padding) trie tokens processed
    trained_tokens: int
    tokens_per_s: float  # tokens / train_s
    out_dir: str
    final_dir: str
    rows: int = 0
    trajectories: int = 0
    skipped: int = 0
    world_size: int = 1
    load: dict = field(default_factory=dict)  # FSDP2: what this rank held while loading (LoadReport)
    losses: list = field(default_factory=list, repr=False)  # per optimizer step of this run
    model: Any = field(default=None, repr=False)  # one process: the trained model (FSDP2: None)
    tokenizer: Any = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "tokenizer", "losses")}


def _run_eval(config, model, tokenizer, step, out_dir, log) -> None:
    was_training = model.training
    model.eval()
    try:
        with fork_rng(), torch.no_grad():
            result = config.eval_hook(model, tokenizer, step) or {}
    finally:
        model.train(was_training)
    if result:
        row = {"step": step, **result}
        path = out_dir / "eval.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        log(f"eval @ step {step}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in result.items()))


# ----------------------------------------------------------------------------------------------------
# A sequential greedy check (an eval hook; parallel decoding lives in twlib.decoding)


def sequential_accuracy(model, tokenizer, problems, max_new_tokens: int = 400, batch_size: int = 16,
                        return_texts: bool = False):
    """Greedy `model.generate` from each prompt (left-padded batches, stop at EOS) graded with
    `twlib.tasks.grade`. Sequential decoding only: a `<Parallel>` block is decoded as plain text."""
    from twlib.tasks import grade

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    texts, correct = [], 0
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            encoded = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in chunk]
            width = max(map(len, encoded))
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
            attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
            for p, row in zip(chunk, out[:, width:]):
                row = row.tolist()
                if tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                text = tokenizer.decode(row, skip_special_tokens=False)
                texts.append(text)
                correct += grade(text, p.answer, task=p.task)
    finally:
        model.train(was_training)
    accuracy = correct / max(len(problems), 1)
    return (accuracy, texts) if return_texts else accuracy


# ----------------------------------------------------------------------------------------------------
# The loop


def train(config: SFTConfig, on_step: Callable[[int, dict], None] | None = None, source: str | None = None,
          quiet: bool = False, launch: fsdp.Launch | None = None, use_fsdp: bool | None = None) -> SFTResult:
    """Run SFT as configured (call it on every rank); returns an `SFTResult` (one process: with the trained
    model and tokenizer attached).

    `launch`: the FSDP2 / LM-head settings (default: the config's `launch:` section). `use_fsdp`: None =
    FSDP2 when a process group exists or torchrun started this process; True = FSDP2 even in one process.
    `on_step(step, metrics)` runs after every optimizer step (after any checkpoint); raising from it stops
    the run there (the tests' interruption). `quiet` silences the console. `config.threads` applies for
    the run only (the previous torch thread count is restored).
    """
    config = copy.copy(config)
    config.validate(source or "config")
    launch = copy.copy(launch) if launch is not None else fsdp.launch_options(config.launch)
    if use_fsdp is None:
        use_fsdp = fsdp.in_torchrun() or dist.is_initialized()
    run = None
    log = console(config.progress, quiet, lambda: run.main if run is not None else os.environ.get("RANK", "0") == "0")
    with torch_threads(config.threads):
        try:
            run = (FSDPRun if use_fsdp else LocalRun)(config, launch.validate(), source, log)
            return _train(config, run, on_step, source, log)
        finally:
            if run is not None:
                run.close()


@dataclass
class _Schedule:
    """The step arithmetic of a run: rows per step, steps per epoch, total and warm-up steps."""

    n_rows: int
    rows_per_step: int
    spe: int
    total: int
    warmup: int

    @classmethod
    def of(cls, config: SFTConfig, n_rows: int) -> "_Schedule":
        rows_per_step = config.rows_per_micro_batch * config.grad_accum
        spe = steps_per_epoch(n_rows, rows_per_step)
        total = config.max_steps or max(1, math.ceil(config.epochs * spe))
        return cls(n_rows, rows_per_step, spe, total, round(config.warmup * total))

    def rows_of(self, step: int, seed: int, orders: dict) -> torch.Tensor:
        """The rows of optimizer step `step`: a slice of its epoch's permutation of (seed, epoch)."""
        epoch, k = divmod(step, self.spe)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = epoch_order(self.n_rows, seed, epoch)
        return orders[epoch][k * self.rows_per_step:(k + 1) * self.rows_per_step]


def _train(config: SFTConfig, run: LocalRun, on_step, source: str | None, log) -> SFTResult:
    wall_start = time.perf_counter()
    out_dir = Path(config.out_dir)
    if run.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if run.world > 1 or isinstance(run, FSDPRun):
        dist.barrier()
    found = find_checkpoint(out_dir) if config.resume else None
    if config.resume and found is None:
        log(f"resume: no checkpoint in {out_dir}, starting from scratch")
    if found is None:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
    tokenizer, model, loss_module = run.load(found, TrieLoss)
    problems, tries, rows = training_rows(config, tokenizer, model, source, log)
    prints = fingerprint(rows)
    run.check_rows(prints)
    plan = _Schedule.of(config, rows.shape[0])
    optimizer = torch.optim.AdamW(param_groups(loss_module, config.weight_decay), lr=config.lr,
                                  betas=tuple(config.betas), eps=config.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.total, plan.warmup, config.min_lr_ratio))
    totals = {"step": 0, "train_s": 0.0, "tokens": 0, "trained_tokens": 0, "loss": float("nan")}
    if found is not None:
        totals.update(_resume(run, found, optimizer, scheduler, prints, plan, log))
    fill = rows.num_tokens / (plan.n_rows * config.tokens_per_batch)
    log(run.describe(model))
    log(f"data: {len(problems)} problems, {len(tries)} trajectories, {plan.n_rows} rows of <= "
        f"{config.tokens_per_batch} tokens ({100 * fill:.1f}% filled), {rows.num_trained:,} trained tokens "
        f"per epoch; {plan.spe} steps/epoch x {plan.rows_per_step} rows"
        + (f" (~{-(-plan.rows_per_step // run.world)} per rank)" if run.world > 1 else "") + f"; {plan.total} steps")
    losses = _loop(config, run, loss_module, optimizer, scheduler, rows, plan, totals, prints, on_step, log)
    if config.eval_hook is not None and not isinstance(run, FSDPRun):
        _run_eval(config, model, tokenizer, plan.total, out_dir, log)
    final_dir = run.save_final(out_dir)
    return _finish(config, run, totals, losses, plan, len(tries), len(problems), final_dir, wall_start, log)


def _resume(run: LocalRun, found: Path, optimizer, scheduler, prints: str, plan: _Schedule, log) -> dict:
    """Restore optimizer, scheduler and RNG states from a checkpoint; the totals it had reached."""
    trainer = run.resume(found, optimizer, scheduler)
    if trainer.get("fingerprint") != prints:
        raise DataError(f"{found}: the checkpoint was trained on different rows (the data or its generator, "
                        f"mode, loss policy or tokens_per_batch changed); use a new out_dir or resume=false")
    if trainer.get("total_steps") != plan.total:
        log(f"warning: the schedule had {trainer.get('total_steps')} steps, now {plan.total}")
    log(f"resumed from {found} at step {int(trainer['step'])}")
    return {"step": int(trainer["step"]), "train_s": float(trainer.get("train_s", 0.0)),
            "tokens": int(trainer.get("tokens", 0)), "trained_tokens": int(trainer.get("trained_tokens", 0)),
            "loss": float(trainer.get("loss", float("nan")))}


def _step(config: SFTConfig, run: LocalRun, loss_module, optimizer, scheduler, rows: PackedTrie,
          chosen: torch.Tensor) -> dict:
    """One optimizer step over the step's rows `chosen` (this rank's share of them):

        loss = sum over micro-batches of (sum of -log p over their trained tokens) / N,   N = the step's
        trained tokens over every rank, so accumulation and ranks give the gradient of one big batch."""
    trained = run.trained_tokens(rows, chosen)
    normalizer = max(trained, 1)
    loss_sum, tokens = 0.0, 0
    for index, filler in run.micro_batches(chosen, config.rows_per_micro_batch):
        batch = select_rows(rows, index)
        with run.autocast():
            loss, _ = loss_module(batch, normalizer)
        if filler:
            loss = loss * 0.0  # a filler pass: the same collectives as the other ranks, no contribution
        loss.backward()
        if not filler:
            loss_sum += float(loss.detach())
            tokens += batch.num_tokens
    grad_norm = run.clip(optimizer, config.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss_sum, tokens = run.all_sum([loss_sum, tokens])
    return {"loss": loss_sum, "tokens": int(tokens), "trained": trained, "grad_norm": grad_norm}


def _loop(config, run, loss_module, optimizer, scheduler, rows, plan: _Schedule, totals: dict, prints: str,
          on_step, log) -> list[float]:
    """Steps totals["step"] .. plan.total - 1: metrics rows (rank 0), console lines, checkpoints, eval hook."""
    from tqdm.auto import tqdm

    out_dir, losses, orders = Path(config.out_dir), [], {}
    bar = tqdm(total=plan.total, initial=totals["step"], disable=not (log.progress and run.main), dynamic_ncols=True,
               desc=f"sft {config.mode}")
    with MetricsLog(out_dir, METRICS_FIELDS, start_step=totals["step"], tensorboard=config.tensorboard,
                    enabled=run.main) as metrics:
        for step in range(totals["step"], plan.total):
            t0 = time.perf_counter()
            lr_now = optimizer.param_groups[0]["lr"]
            out = _step(config, run, loss_module, optimizer, scheduler, rows, plan.rows_of(step, config.seed, orders))
            dt = time.perf_counter() - t0
            done = step + 1
            totals.update(step=done, train_s=totals["train_s"] + dt, tokens=totals["tokens"] + out["tokens"],
                          trained_tokens=totals["trained_tokens"] + out["trained"], loss=out["loss"])
            losses.append(out["loss"])
            row = {"step": done, "epoch": round(done / plan.spe, 4), "loss": round(out["loss"], 6),
                   "lr": f"{lr_now:.6g}", "grad_norm": round(out["grad_norm"], 6), "tokens": out["tokens"],
                   "trained_tokens": out["trained"], "tokens_per_s": round(out["tokens"] / dt, 1),
                   "elapsed_s": round(totals["train_s"], 3)}
            metrics.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{out['tokens'] / dt:.0f}")
            if done % config.log_every == 0 or done == plan.total:
                recent = losses[-config.log_every:]
                log(f"step {done}/{plan.total} epoch {done / plan.spe:.2f} loss {sum(recent) / len(recent):.4f} "
                    f"lr {lr_now:.3g} grad_norm {out['grad_norm']:.3g} tok/s "
                    f"{totals['tokens'] / max(totals['train_s'], 1e-9):.0f} elapsed {totals['train_s']:.0f}s")
            if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == plan.total):
                run.save_checkpoint(out_dir, optimizer, scheduler, _trainer_state(plan, totals, prints))
            if config.eval_hook is not None and config.eval_every and done % config.eval_every == 0 \
                    and done != plan.total and not isinstance(run, FSDPRun):
                _run_eval(config, run.model, run.tokenizer, done, out_dir, log)
            if on_step is not None:
                on_step(done, row)
    bar.close()
    return losses


def _trainer_state(plan: _Schedule, totals: dict, prints: str) -> dict:
    step = totals["step"]
    return {"step": step, "epoch": step // plan.spe, "position": (step % plan.spe) * plan.rows_per_step,
            "rows_done": step * plan.rows_per_step, "total_steps": plan.total, "train_s": totals["train_s"],
            "tokens": totals["tokens"], "trained_tokens": totals["trained_tokens"], "loss": totals["loss"],
            "fingerprint": prints, "rows": plan.n_rows}


def _finish(config, run, totals: dict, losses: list, plan: _Schedule, n_tries: int, n_problems: int,
            final_dir: Path, wall_start: float, log) -> SFTResult:
    recent = losses[-config.log_every:]
    train_s = totals["train_s"]
    local = not isinstance(run, FSDPRun)
    result = SFTResult(
        steps=plan.total, final_loss=totals["loss"],
        mean_loss_last=sum(recent) / len(recent) if recent else totals["loss"],
        wall_s=time.perf_counter() - wall_start, train_s=train_s, tokens=totals["tokens"],
        trained_tokens=totals["trained_tokens"], tokens_per_s=totals["tokens"] / train_s if train_s else 0.0,
        out_dir=config.out_dir, final_dir=str(final_dir), rows=plan.n_rows, trajectories=n_tries,
        skipped=n_problems - n_tries, world_size=run.world, load=vars(run.load_report) if hasattr(run, "load_report") else {},
        losses=losses, model=run.model if local else None, tokenizer=run.tokenizer if local else None)
    if run.main:
        (Path(config.out_dir) / "result.json").write_text(json.dumps(
            {**result.to_dict(), "steps_this_run": len(losses), "launch": vars(run.launch)}, indent=1))
    log(f"done: {plan.total} steps" + (f" on {run.world} rank(s)" if run.world > 1 else "")
        + f", loss {result.mean_loss_last:.4f}, {result.tokens_per_s:.0f} tok/s, {result.wall_s / 60:.1f} min "
        f"-> {final_dir}")
    return result


# ----------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="YAML file of SFTConfig fields (configs/tiny-*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set lr=1e-3 --set max_steps=50 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint if present")
    parser.add_argument("--fsdp", action="store_true",
                        help="FSDP2 even in one process (automatic under torchrun)")
    return fsdp.add_launch_arguments(add_dry_run_argument(parser))


def main_args(args: argparse.Namespace) -> int:
    """Run from parsed arguments (`twlib.cli` delegates here). Config errors print and return 2."""
    if getattr(args, "dry_run", False):
        return print_dry_run(args)
    try:
        overrides = list(args.set or []) + (["resume=true"] if getattr(args, "resume", False) else [])
        config = load_config(args.config, overrides)
        launch = fsdp.launch_from_args(args) if hasattr(args, "logits") else None
        train(config, source=str(args.config), launch=launch, use_fsdp=True if getattr(args, "fsdp", False) else None)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m twlib sft", description=__doc__.split("\n")[0]))
    return main_args(parser.parse_args(argv))


if __name__ == "__main__":
    code = main()
    if fsdp.in_torchrun():
        fsdp.exit_process(code)  # skip torch's teardown race once the results are saved (twlib.train.fsdp)
    sys.exit(code)
