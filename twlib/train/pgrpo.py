"""P-GRPO: parallelization-aware GRPO (spec section 5), on the same trie rows and decoder as SFT.

    python -m twlib pgrpo --config configs/tiny-pgrpo.yaml [--set steps=5] [--resume]

One step, for P prompts with k rollouts each (paper notation; i = rollout, g(i) = its prompt group):

    rollouts   y_i ~ pi_theta( . | x_g)         the 5-phase state machine, temperature 1.0
    rewards    r_i = 1[correct] * (1 + R_accel(y_i))  (+ incorrect_reward otherwise; twlib.rewards)
    advantage  A_i = r_i - mean_{j in g(i)} r_j      (std_normalize: divided by std_g + eps, the ablation)
    loss       L(theta) = -(1/N) * sum_i A_i * sum_{c in calls(y_i)} sum_{t in completion(c)} log pi_theta(y_ict | context)

with N the number of completion tokens of all calls of all rollouts in the batch. Tokens the
orchestrator inserted (`\\n<Thread>\\n{n}:`, the join glue, a forced `</Thread>`) are contexts, never
completions, so they get no loss.

Design choices, and where we deviate from the reference
- ONE packed trie per prompt group (`packing="group"`, default): all calls of all k rollouts of a prompt
  are inserted into one trie, so the prompt and every shared prefix are computed once. The reference
  trains one row per engine call (shared contexts recomputed for every thread and every rollout).
  It is exact, not an approximation: a trie node n that is a completion token of several (rollout,
  call) pairs carries the weight w_n = sum of their advantages, and sum_n w_n log p(n) is the same sum
  as the per-call one because log p(n) is the same number on every path through n (ancestor-only
  attention; tested against `packing="call"`, the reference layout, to 1e-5 for loss and gradients).
  `packing="trajectory"` (one trie per rollout) sits in between. `benchmarks/pgrpo.py` measures them.
- On-policy, one update per batch by default (the reference: clip ratios inert, no KL, no entropy).
  `updates_per_batch > 1` turns on PPO clipping with the reference's asymmetric ratios (0.2 / 0.28):
      L = -(1/N) sum_n [ W+_n min(rho_n, clip(rho_n)) + W-_n max(rho_n, clip(rho_n)) ],  rho_n = pi/pi_old
  where W+ / W- are the sums of the positive / negative advantages on node n (per-rollout clipping of
  min(rho A, clip(rho) A), regrouped exactly). With one update rho = 1 and its gradient is the
  on-policy one. `kl_coef > 0` adds the k3 estimator to a frozen reference (the starting model):
      KL_n = exp(ref_n - logp_n) - (ref_n - logp_n) - 1, counted once per occurrence, / N.
- The sequential baseline gets ordinary GRPO through the same code (`mode="sequential"`: one call per
  rollout, the trie of a group is then a plain prefix tree of k chains).
- ONE loop (`run_steps`) for one process (`LocalPolicy`: `HFEngine` on the model, a fresh engine each step
  so no prefix cache survives an update) and for one rank of N (`twlib.train.pgrpo_fsdp.FSDPPolicy`: FSDP2,
  weight-synced engines). Every rollout is sampled with its own seed, from (seed, step, group, j), and
  prompts are drawn from (seed, step) alone, so a resumed run repeats exactly the steps an uninterrupted
  run would take and N ranks draw the same rollouts as one process (both tested: same weights).
- Diagnostics per step: `METRICS_FIELDS` (metrics.csv, TensorBoard with `tensorboard: true`, progress bar);
  zero_std_groups is the fraction of groups without a learning signal.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from twlib.decoding import DecodeConfig, DecodeResult, HFEngine, ParallelDecoder, SamplingParams, sequential_decoder
from twlib.rewards import Reward, score
from twlib.checkpoint import (console, find_checkpoint, fork_rng, load_base_model, load_checkpoint_state,
                              load_tokenizer, resolve_runtime, save_checkpoint, save_final_model, set_rng_state,
                              torch_threads)
from twlib.config import PACKINGS, ConfigError, PGRPOConfig, load_pgrpo_config
from twlib.metrics import MetricsLog
from twlib.infra.planner import add_dry_run_argument, print_dry_run
from twlib.train.sft import param_groups
from twlib.train.data import load_problems
from twlib.tokenizer import require_single_token_tags
from twlib.trie import PackedTrie, collate, logprobs, pack

TRUNCATION_FLAGS = ("truncated", "token_budget", "thread_unclosed", "context_overflow", "iteration_cap")
# "speedup": the mean self-parallelism T/L of the step's rollouts (PathStats.self_parallelism); the shipped curves
# keep the column name. The speed-up against the sequential model, T_seq/L, is twlib.eval.compare's.
METRICS_FIELDS = ["step", "reward", "reward_std", "zero_std_groups", "accuracy", "parallel_rate", "eta",
                  "speedup", "critical_path", "total_tokens", "truncation_rate", "invalid_rate", "loss",
                  "kl", "clip_frac", "grad_norm", "lr", "rollout_s", "update_s", "trie_tokens",
                  "completion_tokens"]


# ----------------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards: Sequence[float], std_normalize: bool = False, eps: float = 1e-6) -> list[float]:
    """A_i = r_i - mean(r) over one prompt's rollouts; with `std_normalize`, divided by (std(r) + eps).

    Population std (divide by k), as in GRPO implementations. The paper argues against the division:
    when every rollout is correct, the rewards differ only by the small acceleration bonus, and dividing
    by their tiny std blows that bonus up to the size of a correctness signal.
    """
    r = torch.tensor([float(x) for x in rewards], dtype=torch.float64)
    if r.numel() == 0:
        return []
    a = r - r.mean()
    if std_normalize:
        a = a / (r.std(unbiased=False) + eps)
    return a.tolist()


# ----------------------------------------------------------------------------------------------------
# Rollouts -> weighted trie rows


@dataclass
class Rollout:
    group: int  # index of the prompt group in the step
    problem_id: str
    answer: str
    result: DecodeResult
    reward: Reward
    advantage: float = 0.0

    @property
    def pairs(self) -> list[tuple[list[int], list[int]]]:
        """(context, completion) of every engine call, in order: exactly what the model generated."""
        return [(list(c.context_ids), list(c.completion_ids)) for c in self.result.calls if c.completion_ids]


@dataclass
class PolicyBatch:
    """Packed rows plus per-node weights (all [rows, length]).

    pos_weight / neg_weight  sum of the positive / negative advantages of every (rollout, call) in which
                             the node is a completion token
    counts                   number of such (rollout, call) occurrences (the per-call layout's token count)
    n_tokens                 N of the loss: completion tokens summed over calls and rollouts (= counts.sum())
    """

    rows: PackedTrie
    pos_weight: torch.Tensor
    neg_weight: torch.Tensor
    counts: torch.Tensor
    n_tokens: int

    @property
    def weight(self) -> torch.Tensor:
        return self.pos_weight + self.neg_weight

    def select(self, index: Sequence[int]) -> "PolicyBatch":
        index = torch.as_tensor(list(index), dtype=torch.long)
        rows = PackedTrie(**{k: getattr(self.rows, k).index_select(0, index)
                             for k in ("input_ids", "position_ids", "parents", "labels", "exits", "sample_ids")})
        return PolicyBatch(rows, self.pos_weight.index_select(0, index), self.neg_weight.index_select(0, index),
                           self.counts.index_select(0, index), self.n_tokens)


def _units(rollouts: Sequence[Rollout], packing: str) -> list[list[tuple[list[int], list[int], float]]]:
    """Group (context, completion, advantage) triples into the units that become one trie each."""
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    units: dict = {}
    for n, r in enumerate(rollouts):
        for c, (context, completion) in enumerate(r.pairs):
            key = r.group if packing == "group" else (n if packing == "trajectory" else (n, c))
            units.setdefault(key, []).append((context, completion, r.advantage))
    return list(units.values())


def _weigh(trie: PackedTrie, triples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walk each (context, completion) through `trie`; completion nodes collect advantages and counts."""
    child = {(int(p), int(t)): i for i, (p, t) in enumerate(zip(trie.parents[0].tolist(), trie.input_ids[0].tolist()))}
    n = trie.shape[1]
    pos = torch.zeros(n, dtype=torch.float64)
    neg = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    for context, completion, advantage in triples:
        node = -1
        for j, tok in enumerate(list(context) + list(completion)):
            node = child[(node, int(tok))]
            if j >= len(context):
                counts[node] += 1
                (pos if advantage > 0 else neg)[node] += advantage
    return pos, neg, counts


def build_batch(rollouts: Sequence[Rollout], packing: str = "group", max_tokens: int | None = None,
                pad_id: int = 0) -> PolicyBatch:
    """Pack the rollouts' calls into trie rows (`packing` unit per trie, tries first-fit into rows of at
    most `max_tokens`; None = one trie per row) with the node weights of the P-GRPO loss."""
    units = _units(rollouts, packing)
    if not units:
        raise ValueError("build_batch: the rollouts have no completion tokens")
    tries, weights = [], []
    for triples in units:
        trie = pack([(c, y) for c, y, _ in triples], loss="completions")
        tries.append(trie)
        weights.append(_weigh(trie, triples))
    if max_tokens is not None:  # a unit longer than the budget gets a row of its own rather than an error
        max_tokens = max(max_tokens, max(t.shape[1] for t in tries))
    rows = collate(tries, max_tokens=max_tokens, pad_id=pad_id)
    shape = rows.input_ids.shape
    pos = torch.zeros(shape, dtype=torch.float64)
    neg = torch.zeros(shape, dtype=torch.float64)
    counts = torch.zeros(shape, dtype=torch.float64)
    for i, (p, q, c) in enumerate(weights):
        where = rows.sample_ids == i  # collate keeps a trie's nodes contiguous and in order
        pos[where], neg[where], counts[where] = p, q, c
    return PolicyBatch(rows, pos.float(), neg.float(), counts.float(), int(counts.sum()))


# ----------------------------------------------------------------------------------------------------
# The loss


@dataclass
class LossParts:
    loss: torch.Tensor
    kl: float = 0.0
    clip_frac: float = 0.0


def policy_loss(logp: torch.Tensor, batch: PolicyBatch, old_logp: torch.Tensor | None = None,
                ref_logp: torch.Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.28,
                kl_coef: float = 0.0, normalizer: int | None = None) -> LossParts:
    """The P-GRPO loss of (a micro-batch of) `batch`, divided by the whole batch's N (`normalizer`).

    old_logp None: the on-policy loss  -(1/N) sum_n w_n log p_n.  Else the clipped PPO surrogate.
    """
    N = max(1, normalizer or batch.n_tokens)
    pos, neg = batch.pos_weight.to(logp.device), batch.neg_weight.to(logp.device)
    clip_frac = 0.0
    if old_logp is None:
        surrogate = (pos + neg) * logp
    else:
        ratio = torch.exp(logp - old_logp)
        clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
        surrogate = pos * torch.minimum(ratio, clipped) + neg * torch.maximum(ratio, clipped)
        active = batch.counts.to(logp.device) > 0
        clip_frac = float(((ratio != clipped) & active).sum()) / max(1, int(active.sum()))
    loss = -surrogate.sum() / N
    kl = 0.0
    if kl_coef > 0 and ref_logp is not None:
        counts = batch.counts.to(logp.device)
        d = ref_logp - logp
        k3 = torch.exp(d) - d - 1.0
        kl_term = (counts * k3).sum() / N
        loss = loss + kl_coef * kl_term
        kl = float(kl_term.detach())
    return LossParts(loss, kl, clip_frac)


def batch_logprobs(model, batch: PolicyBatch, mask_kind: str = "bool") -> torch.Tensor:
    """log p of every node of the batch's rows (`twlib.trie.logprobs`: parent-pointer targets)."""
    return logprobs(model, batch.rows, mask_kind=mask_kind)


# ----------------------------------------------------------------------------------------------------
# Rollouts


def prompt_pool(config: PGRPOConfig, source: str | None = None) -> list:
    """The prompts: the first n_train of `data`, or the train split of the generated task (as SFT's)."""
    return load_problems(config, source)


def step_prompts(pool: Sequence, config: PGRPOConfig, step: int) -> list:
    """The step's prompts: a pure function of (seed, step), so resuming repeats them exactly."""
    rng = random.Random(config.seed * 1_000_003 + step)
    return rng.sample(list(pool), min(config.prompts_per_step, len(pool)))


def decode_config(config: PGRPOConfig, step: int) -> DecodeConfig:
    return DecodeConfig(max_new_tokens=config.max_new_tokens, max_thread_tokens=config.max_thread_tokens,
                        sampling=SamplingParams(temperature=config.temperature, top_p=config.top_p,
                                                seed=config.seed * 1_000_003 + step))


def rollout_seed(seed: int, step: int, group: int, j: int) -> int:
    """The sampling seed of rollout j of prompt group `group` (its index in the step) at `step`."""
    return ((seed * 1_000_003 + step) * 1_000_033 + group) * 1_009 + j


def collect_rollouts(model, tokenizer, problems: Sequence, config: PGRPOConfig, step: int, engine=None,
                     groups: Sequence[int] | None = None) -> list[Rollout]:
    """k sampled rollouts per problem, scored, with group-centred advantages.

    `groups` are the problems' indices among the step's prompts (default 0, 1, ...). Every rollout is
    seeded on its own from (seed, step, group, j) (`ParallelDecoder.decode(seeds=...)`), so it does not
    depend on which other rollouts share its batch: a run split over ranks (`twlib.train.pgrpo_fsdp`,
    each rank decoding its own groups) draws exactly the rollouts of a single process. `engine` defaults to
    a fresh HFEngine over `model` (no KV from before the last weight update); any `Engine` works.
    """
    engine = engine if engine is not None else HFEngine(model, tokenizer)
    groups = list(range(len(problems))) if groups is None else list(groups)
    dcfg = decode_config(config, step)
    decoder = (ParallelDecoder(engine, tokenizer, dcfg) if config.mode == "parallel"
               else sequential_decoder(engine, tokenizer, dcfg))
    k = config.rollouts_per_prompt
    prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems for _ in range(k)]
    seeds = [rollout_seed(config.seed, step, g, j) for g in groups for j in range(k)]
    results = decoder.decode(prompts, batch_size=config.rollout_batch, seeds=seeds)
    rollouts = []
    for n, result in enumerate(results):
        p = problems[n // k]
        reward = (config.reward_fn(result.text, p.answer, result.stats) if config.reward_fn is not None
                  else score(result.text, p.answer, config.reward, stats=result.stats))
        rollouts.append(Rollout(groups[n // k], p.id, p.answer, result, reward))
    for g in range(len(problems)):
        members = rollouts[g * k:(g + 1) * k]
        for r, a in zip(members, group_advantages([m.reward.total for m in members], config.std_normalize)):
            r.advantage = a
    return rollouts


def rollout_metrics(rollouts: Sequence[Rollout], k: int) -> dict:
    """The per-step diagnostics of the rollouts (see the module docstring)."""
    n = len(rollouts)
    rewards = [r.reward.total for r in rollouts]
    groups = [rewards[i:i + k] for i in range(0, n, k)]
    stds = [float(torch.tensor(g).std(unbiased=False)) for g in groups]
    return {
        "reward": sum(rewards) / n,
        "reward_std": sum(stds) / len(stds),
        "zero_std_groups": sum(s < 1e-9 for s in stds) / len(stds),
        "accuracy": sum(r.reward.correct for r in rollouts) / n,
        "parallel_rate": sum(r.result.stats.blocks > 0 for r in rollouts) / n,
        "eta": sum(r.result.stats.eta for r in rollouts) / n,
        "speedup": sum(r.result.stats.self_parallelism for r in rollouts) / n,
        "critical_path": sum(r.result.stats.longest for r in rollouts) / n,
        "total_tokens": sum(r.result.stats.total for r in rollouts) / n,
        "truncation_rate": sum(any(f in TRUNCATION_FLAGS for f in r.result.flags) for r in rollouts) / n,
        "invalid_rate": sum(not r.result.valid for r in rollouts) / n,
    }


# ----------------------------------------------------------------------------------------------------
# One update


def micro_batches(batch: PolicyBatch, tokens_per_micro_batch: int) -> list[list[int]]:
    """Row indices per micro-batch: as many rows as fit `tokens_per_micro_batch` (at least one)."""
    length = batch.rows.shape[1]
    per = max(1, tokens_per_micro_batch // max(1, length))
    return [list(range(i, min(i + per, batch.rows.shape[0]))) for i in range(0, batch.rows.shape[0], per)]


def has_signal(batch: PolicyBatch | None) -> bool:
    """Does any completion token carry a non-zero advantage? Without one (and without a KL term), the
    policy gradient of the batch is exactly zero."""
    return batch is not None and bool(batch.pos_weight.any() or batch.neg_weight.any())


IDLE_UPDATE = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0}  # the metrics of a skipped step


def step_schedule(scheduler) -> None:
    """Advance the learning-rate schedule by one training step, also after a skipped (idle) update:
    the schedule counts steps, not optimizer updates, so torch's order warning does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def update(model, optimizer, batch: PolicyBatch, config: PGRPOConfig, mask_kind: str = "bool",
           ref_model=None) -> dict:
    """`updates_per_batch` optimizer steps on one batch of rollouts; returns loss / kl / clip / grad norm."""
    if config.skip_idle_steps and config.kl_coef == 0 and not has_signal(batch):
        return dict(IDLE_UPDATE)
    chunks = micro_batches(batch, config.tokens_per_batch)
    old, ref = None, None
    if config.updates_per_batch > 1:
        with torch.no_grad():
            old = [batch_logprobs(model, batch.select(c), mask_kind) for c in chunks]
    if config.kl_coef > 0 and ref_model is not None:
        with torch.no_grad():
            ref = [batch_logprobs(ref_model, batch.select(c), mask_kind) for c in chunks]
    out = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(config.updates_per_batch):
        loss_sum, kl_sum, clip_sum = 0.0, 0.0, 0.0
        for j, c in enumerate(chunks):
            part = batch.select(c)
            logp = batch_logprobs(model, part, mask_kind)
            parts = policy_loss(logp, part, old[j] if old else None, ref[j] if ref else None,
                                config.clip_low, config.clip_high, config.kl_coef, normalizer=batch.n_tokens)
            parts.loss.backward()
            loss_sum += float(parts.loss.detach())
            kl_sum += parts.kl
            clip_sum += parts.clip_frac / len(chunks)
        clip = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out = {"loss": loss_sum, "kl": kl_sum, "clip_frac": clip_sum, "grad_norm": grad_norm}
    return out


def make_optimizer(model, config: PGRPOConfig):
    """AdamW (no decay on embeddings and 1-d parameters) and the schedule: linear warm-up over
    `warmup` x steps, then constant. Shared with twlib.train.pgrpo_fsdp (where `model` is the FSDP root)."""
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=tuple(config.betas))
    warmup_steps = round(config.warmup * config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
    return optimizer, scheduler


def step_line(row: dict, steps: int) -> str:
    """The log line of one step's metrics row."""
    return (f"step {row['step']}/{steps} reward {row['reward']:.3f} acc {row['accuracy']:.3f} "
            f"parallel {row['parallel_rate']:.2f} eta {row['eta']:.3f} L {row['critical_path']:.1f} "
            f"zero-std {row['zero_std_groups']:.2f} loss {row['loss']:.4f} "
            f"({row['rollout_s']:.1f}s + {row['update_s']:.1f}s)")


# ----------------------------------------------------------------------------------------------------
# The loop


@dataclass
class PGRPOResult:
    steps: int
    final_dir: str
    out_dir: str
    wall_s: float
    first: dict  # metrics of the first step of this run
    last: dict  # metrics of the last step
    model: object = field(default=None, repr=False)
    tokenizer: object = field(default=None, repr=False)


def _load_models(config: PGRPOConfig, rt, checkpoint: Path | None):
    """(tokenizer, policy, frozen reference or None): the policy from the checkpoint when resuming."""
    tokenizer = load_tokenizer(config.model)
    if config.mode == "parallel":  # every tag one token, else an error naming `python -m twlib prepare-model`
        require_single_token_tags(tokenizer, config.model)
    model = load_base_model(str(checkpoint / "model") if checkpoint else config.model, tokenizer, config.seed, rt)
    ref_model = None
    if config.kl_coef > 0:
        ref_model = load_base_model(config.model, tokenizer, config.seed, rt).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    return tokenizer, model, ref_model


class LocalPolicy:
    """World size 1 for `run_steps` (`twlib.train.pgrpo_fsdp.FSDPPolicy` is one rank of N): the plain model,
    rolled out by `HFEngine` on itself, `save_pretrained` checkpoints with optimizer and RNG state."""

    world, rank, main = 1, 0, True

    def __init__(self, config: PGRPOConfig, model, ref_model, tokenizer, mask_kind: str):
        self.config, self.model, self.ref_model = config, model, ref_model
        self.tokenizer, self.mask_kind = tokenizer, mask_kind

    def rollouts(self, problems, step: int) -> tuple[list[Rollout], list[Rollout]]:  # (this rank's, everyone's)
        self.model.eval()
        with fork_rng():  # sampling leaves the training RNG alone
            rollouts = collect_rollouts(self.model, self.tokenizer, problems, self.config, step)
        self.model.train()
        return rollouts, rollouts

    def batch(self, rollouts: list[Rollout]) -> PolicyBatch:
        return build_batch(rollouts, self.config.packing, max_tokens=self.config.tokens_per_batch,
                           pad_id=self.tokenizer.pad_token_id or 0)

    def update(self, optimizer, batch: PolicyBatch, problems) -> dict:
        return update(self.model, optimizer, batch, self.config, self.mask_kind, self.ref_model)

    def synced(self) -> None:
        pass  # the rollouts decode the trained model itself

    def all_sum(self, values: list) -> list:
        return values

    def save_checkpoint(self, out_dir: Path, optimizer, scheduler, done: int) -> None:
        save_checkpoint(out_dir, self.model, self.tokenizer, optimizer, scheduler, {"step": done}, self.config)


def policy_step(run, config: PGRPOConfig, optimizer, scheduler, pool, step: int) -> dict:
    """One step on `run` (LocalPolicy or FSDPPolicy): prompts, rollouts, trie batch, update; its metrics row."""
    t0 = time.perf_counter()
    problems = step_prompts(pool, config, step)
    rollouts, everyone = run.rollouts(problems, step)
    t1 = time.perf_counter()
    row = {"step": step + 1, **rollout_metrics(everyone, config.rollouts_per_prompt),
           "lr": optimizer.param_groups[0]["lr"]}
    batch = run.batch(rollouts)
    row.update(run.update(optimizer, batch, problems))
    step_schedule(scheduler)
    run.synced()
    trie_tokens, completion = run.all_sum([batch.rows.num_tokens, batch.n_tokens] if batch is not None else [0, 0])
    row.update(rollout_s=t1 - t0, update_s=time.perf_counter() - t1, trie_tokens=int(trie_tokens),
               completion_tokens=int(completion))
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}


def run_steps(run, config: PGRPOConfig, optimizer, scheduler, pool, start: int, out_dir: Path, log,
              on_step=None, bar=None) -> tuple[dict | None, dict | None]:
    """The loop, for one process or one rank of N: each step's row to metrics.csv (and TensorBoard; the main
    rank writes the global rows), checkpoints, `on_step(done, row)`. Returns this run's (first, last) row."""
    first = last = None
    with MetricsLog(out_dir, METRICS_FIELDS, start_step=start, tensorboard=config.tensorboard,
                    enabled=run.main) as metrics:
        for step in range(start, config.steps):
            row = policy_step(run, config, optimizer, scheduler, pool, step)
            metrics.write(row)
            first, last = first or row, row
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.2f}",
                                eta=f"{row['eta']:.3f}")
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                log(step_line(row, config.steps))
            done = step + 1
            if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps):
                run.save_checkpoint(out_dir, optimizer, scheduler, done)
            if on_step is not None:
                on_step(done, row)
    return first, last


def train(config: PGRPOConfig, on_step: Callable[[int, dict], None] | None = None, quiet: bool = False,
          source: str | None = None) -> PGRPOResult:
    """Run P-GRPO (or GRPO for mode="sequential") as configured; `on_step(step, metrics)` after each step."""
    with torch_threads(config.threads):
        return _train(config, on_step, quiet, source)


def _train(config: PGRPOConfig, on_step, quiet: bool, source: str | None) -> PGRPOResult:
    from tqdm.auto import tqdm

    wall = time.perf_counter()
    config = copy.copy(config)
    config.validate(source or "config")
    rt = resolve_runtime(config)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = console(config.progress, quiet)
    checkpoint = find_checkpoint(out_dir) if config.resume else None
    tokenizer, model, ref_model = _load_models(config, rt, checkpoint)
    optimizer, scheduler = make_optimizer(model, config)
    start = 0
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = int(state["trainer"]["step"])
        log(f"resumed from {checkpoint} at step {start}")
    else:
        torch.manual_seed(config.seed)
    pool = prompt_pool(config, source)
    log(f"pgrpo: mode={config.mode} model={config.model} {config.prompts_per_step} prompts x "
        f"{config.rollouts_per_prompt} rollouts, {config.steps} steps, packing={config.packing}, "
        f"reward={config.acceleration} std_normalize={config.std_normalize} device={rt.device}")
    bar = tqdm(total=config.steps, initial=start, disable=not log.progress, dynamic_ncols=True,
               desc=f"pgrpo {config.mode}")
    run = LocalPolicy(config, model, ref_model, tokenizer, rt.mask_kind)
    first, last = run_steps(run, config, optimizer, scheduler, pool, start, out_dir, log, on_step, bar)
    bar.close()
    final_dir = save_final_model(out_dir, model, tokenizer, config, "pgrpo_config.yaml")
    result = PGRPOResult(config.steps, str(final_dir), str(out_dir), time.perf_counter() - wall, first or {},
                         last or {}, model, tokenizer)
    saved = ("steps", "final_dir", "wall_s", "first", "last")
    (out_dir / "result.json").write_text(json.dumps({key: getattr(result, key) for key in saved}, indent=1))
    log(f"done: {config.steps} steps in {result.wall_s / 60:.1f} min -> {final_dir}")
    return result


# ----------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="YAML file of PGRPOConfig fields (configs/tiny-pgrpo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint")
    return add_dry_run_argument(parser)


def main_args(args: argparse.Namespace) -> int:
    if getattr(args, "dry_run", False):
        if args.config is None:
            print("error: --dry-run needs --config", file=sys.stderr)
            return 2
        return print_dry_run(args)
    try:
        config = load_pgrpo_config(args.config, args.set)
        if args.resume:
            config.resume = True
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train(config, source=args.config)
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m twlib.train.pgrpo", description=__doc__.split("\n")[0]))
    return main_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
