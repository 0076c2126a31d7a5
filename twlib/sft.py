"""Supervised fine-tuning: trie SFT of parallel trajectories, the sequential baseline and the leakage ablation.

    python -m twlib sft --config configs/tiny-parallel.yaml [--set lr=1e-3 --set max_steps=50] [--resume]

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
- Rows are built once, deterministically: one trie per trajectory, first-fit-decreasing packed into rows
  of at most `tokens_per_batch` trie tokens (`twlib.trie.collate`), so a "row" is what the reference calls
  a sample of its 40,960-token block. Each epoch visits the rows in a permutation drawn from
  `(seed, epoch)` alone, so the data position is a pure function of the step: resuming needs only the
  step number. `max_steps`, when set, wins over `epochs` (and defines the schedule length).
- Padding is trimmed per micro-batch (rows are padded at the end), so short rows cost nothing extra.
- Masks: `attn="auto"` picks sdpa with the dense bool ancestor mask on CPU (FlexAttention has no backward
  pass on CPU in torch 2.13) and flex_attention with the `BlockMask` on CUDA (never materialising N x N).
  `eager` gets the additive float mask (a bool mask is silently wrong with eager). The reference builds a
  dense float mask per sample and never used flex_attention.
- Precision: `dtype="auto"` is float32 on CPU and bfloat16 on CUDA; the parameters themselves are cast
  (no `torch.autocast`), which is what a tiny model needs and keeps one code path. Caveat, documented
  rather than hidden: pure-bf16 AdamW rounds away updates smaller than ~2^-8 of a weight, so at the
  reference's lr 1e-5 on a real 8B model use `dtype=float32` plus `autocast=true` (fp32 master weights,
  bf16 matmuls under `torch.autocast`), which is what the reference's DeepSpeed bf16 mode amounts to.
- Full fine-tuning by default (as the paper); `lora=true` wraps the model with a peft LoRA adapter
  (rank/alpha/dropout/targets configurable), only adapter weights train. The final model is saved merged
  so every later stage loads it the same way; the adapter is also saved on its own (`final/adapter`).
- Checkpoints (`checkpoint_every` steps, and at the end): `out_dir/checkpoint/` holds the model
  (save_pretrained + tokenizer, or the LoRA adapter), optimizer, scheduler, RNG states (torch, python,
  numpy, CUDA), step/epoch/position and the config. A checkpoint is written to a temporary directory and
  swapped in by renames; at every instant either `checkpoint/` or `checkpoint.old/` is complete, and
  loading falls back to `checkpoint.old/` when a crash fell between the two renames.
- Exact resume: with `resume=true` the run continues from the checkpoint and ends with weights equal
  (`torch.equal`, on CPU) to an uninterrupted run: same rows, same order, same optimizer state and RNG.
  A changed data set is detected (fingerprint of the rows) and refused.
- The eval hook (`SFTConfig.eval_hook`, a callable, never in YAML) runs every `eval_every` steps and at
  the end, in eval mode, under no_grad, with all RNG states forked, so evaluating never changes training.
- Bad input fails early and names the culprit: unknown or invalid config fields (and the file), a missing
  data file, an empty data set, a trajectory longer than `tokens_per_batch` (with the fix). A trajectory
  that fails `twlib.format.parse` is skipped with one warning that counts them and names the problem ids;
  if all fail, it is an error.
- Relative paths in a config (model, data, out_dir) are relative to the working directory (the repo root).
- Interrupting a run (Ctrl-C, a crash) keeps the last checkpoint valid; rerun with `--resume`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import difflib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import types
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
import yaml

from twlib.tokenizer import require_single_token_tags
from twlib.trie import IGNORE, LOSS_POLICIES, PackedTrie, collate, logprobs, pack, tokenize_calls

__all__ = [
    "MODES", "SFTConfig", "ConfigError", "DataError", "SFTResult", "load_config", "save_config", "apply_overrides",
    "load_problems", "eval_problems", "get_task_config", "build_trajectories", "build_rows", "batch_loss", "lr_factor", "train",
    "load_checkpoint_state", "find_checkpoint", "sequential_accuracy", "main", "main_args",
]

MODES = ("parallel", "sequential", "causal")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention")
MASK_KIND = {"sdpa": "bool", "eager": "float", "flex_attention": "block"}
CHECKPOINT, CHECKPOINT_OLD, CHECKPOINT_TMP = "checkpoint", "checkpoint.old", ".checkpoint.tmp"
METRICS_FIELDS = ["step", "epoch", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "tokens_per_s",
                  "elapsed_s"]


class ConfigError(ValueError):
    """An unknown or invalid configuration field; the message names the field and where it came from."""


class DataError(ValueError):
    """Unusable training data: empty, all trajectories malformed, a trajectory over the row budget."""


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class SFTConfig:
    """Everything a run needs; YAML keys are the field names.

    model            preset name (`tiny`, `small`, `base`: from scratch, seeded by `seed`), a directory
                     written by `save_pretrained` (e.g. a previous run's `out_dir/final`) or a hub id
                     (`Qwen/Qwen3-0.6B`) already in the Hugging Face cache (twlib.hub; never downloaded)
    item_tokens      presets only: the byte tokenizer with one token per `letter digit` item (a checkpoint
                     directory always brings its own tokenizer)
    task, data       problems: `data` = a Parquet path (`twlib.tasks.save_parquet`), or null to generate
                     `make_splits(task, n_train, n_eval, data_seed, task_options)` and train on its train
                     split (the eval split stays held out; `python -m twlib data` writes the same split).
                     With `data`, `n_train` (if set) keeps the first n problems.
    task_options     keyword arguments of the task's config class, e.g. {max_groups: 3}
    mode             "parallel" | "sequential" | "causal" (see the module docstring)
    loss_policy      "completions" (the state machine's completion tokens) | "paper" (every response token)
    lr, min_lr_ratio, warmup (fraction of steps), weight_decay, betas, eps, grad_clip (<= 0: off)
    epochs, max_steps  max_steps (if set) wins and fixes the schedule length
    tokens_per_batch trie-token budget of one packed row (`collate(max_tokens=...)`)
    rows_per_micro_batch, grad_accum   rows per forward pass; micro-batches per optimizer step
    seed             model init (presets), data order, torch/python/numpy RNG
    device           "auto" (cuda if available) | "cpu" | "cuda" | "cuda:1" ...
    threads          torch.set_num_threads for the run (null: torch's default, one per core). On a shared
                     2-core machine 1 thread can be several times faster than 2 (no spinning on a busy core)
    dtype            "auto" (float32 on CPU, bfloat16 on CUDA) | "float32" | "bfloat16" | "float16"
    autocast         run forward/backward under torch.autocast(bfloat16) with the parameters kept in dtype
    attn             "auto" (sdpa + bool mask on CPU, flex_attention + BlockMask on CUDA) | "sdpa" | "eager"
                     | "flex_attention"
    gradient_checkpointing  recompute each decoder layer's activations in the backward (HF activation
                     checkpointing, non-reentrant): activation memory of one layer instead of all, ~1/3 more compute
    lora, lora_rank, lora_alpha, lora_dropout, lora_targets   peft LoRA (off: full fine-tuning)
    checkpoint_every steps between checkpoints (0: only at the end); resume: continue from out_dir/checkpoint
    out_dir, log_every (console line every n steps), progress (tqdm bar; null: only on a TTY)
    eval_every       steps between calls of eval_hook (0: only at the end)
    eval_hook        callable(model, tokenizer, step) -> dict of metrics; set in Python, never in YAML
    """

    model: str = "small"
    item_tokens: bool = False
    task: str = "groupsum"
    data: str | None = None
    n_train: int | None = 2000
    n_eval: int = 500
    data_seed: int = 0
    task_options: dict = field(default_factory=dict)
    mode: str = "parallel"
    loss_policy: str = "completions"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None
    tokens_per_batch: int = 1024
    rows_per_micro_batch: int = 4
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    dtype: str = "auto"
    autocast: bool = False
    attn: str = "auto"
    gradient_checkpointing: bool = False
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    checkpoint_every: int = 0
    resume: bool = False
    out_dir: str = "runs/sft"
    log_every: int = 10
    progress: bool | None = None
    eval_every: int = 0
    eval_hook: Callable | None = field(default=None, repr=False, compare=False, metadata={"yaml": False})

    # -- validation ----------------------------------------------------------------------------------

    def validate(self, source: str = "config") -> "SFTConfig":
        """Coerce every field to its type and check its range; ConfigError naming the field and `source`."""
        hints = get_type_hints(SFTConfig)
        for f in fields(self):
            if f.metadata.get("yaml", True):
                setattr(self, f.name, _coerce(f.name, hints[f.name], getattr(self, f.name), source))

        def bad(name, why):
            raise ConfigError(f"{source}: field {name!r}: {why} (got {getattr(self, name)!r})")

        def choice(name, options):
            if getattr(self, name) not in options:
                bad(name, f"expected one of {', '.join(map(repr, options))}")

        choice("mode", MODES)
        choice("loss_policy", LOSS_POLICIES)
        choice("dtype", ("auto", *DTYPES))
        choice("attn", ATTN_IMPLEMENTATIONS)
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")
                or self.device == "mps"):
            bad("device", "expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.data is None:
            from twlib.tasks import TASKS

            if self.task not in TASKS:
                bad("task", f"unknown task; known: {', '.join(sorted(TASKS))}")
            if self.n_train is None or self.n_train < 1:
                bad("n_train", "must be >= 1 when the problems are generated (data: null)")
        elif self.n_train is not None and self.n_train < 1:
            bad("n_train", "must be >= 1 or null (all problems of the file)")
        if self.n_eval < 0:
            bad("n_eval", "must be >= 0")
        for name in ("lr",):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        if not 0 <= self.warmup < 1:
            bad("warmup", "must be a fraction of the steps in [0, 1)")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            bad("betas", "both must be in [0, 1)")
        if not self.eps > 0:
            bad("eps", "must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", "must be >= 1 or null")
        if self.max_steps is None and not self.epochs > 0:
            bad("epochs", "must be > 0 (or set max_steps)")
        for name in ("tokens_per_batch", "rows_per_micro_batch", "grad_accum", "log_every", "lora_rank"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0 (0: off)")
        if self.threads is not None and self.threads < 1:
            bad("threads", "must be >= 1 or null")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        if self.lora and not self.lora_targets:
            bad("lora_targets", "LoRA needs at least one target module name")
        if not isinstance(self.task_options, dict):
            bad("task_options", "expected a mapping of the task config's fields")
        if self.eval_hook is not None and not callable(self.eval_hook):
            bad("eval_hook", "expected a callable(model, tokenizer, step) -> dict")
        return self

    def to_dict(self) -> dict:
        """The YAML-able fields (everything but the eval hook), tuples as lists."""
        out = {}
        for f in fields(self):
            if not f.metadata.get("yaml", True):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
        return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(name: str, tp, value, source: str):
    """`value` as type `tp` (a field annotation); strings from `--set` or YAML are parsed. ConfigError if not."""

    def fail(expected=None):
        raise ConfigError(f"{source}: field {name!r}: expected {expected or _type_name(tp)}, got {value!r}")

    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~", "")):
            if len(options) < len(get_args(tp)):
                return None
            fail()
        for option in options:
            try:
                return _coerce(name, option, value, source)
            except ConfigError:
                continue
        fail(" or ".join(_type_name(o) for o in options) + " or null")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        fail("true or false")
    if tp is int:
        if isinstance(value, bool):
            fail("an integer")
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            fail("an integer")
        if not number.is_integer():
            fail("an integer")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            fail("a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            fail("a number")
        if not math.isfinite(number):
            fail("a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        fail("a string")
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str):
            value_list = [v for v in value.strip("[]() ").split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            value_list = list(value)
        else:
            fail(f"a list of {len(args)} numbers")
        if len(value_list) != len(args):
            fail(f"a list of {len(args)} numbers")
        return tuple(_coerce(name, a, v, source) for a, v in zip(args, value_list))
    if origin is list:
        (item,) = get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            fail("a list")
        return [_coerce(name, item, v, source) for v in value]
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) or {}
        if not isinstance(value, dict):
            fail("a mapping")
        return dict(value)
    return value  # pragma: no cover - every field type is handled above


def _field_names(cls=None) -> list[str]:
    return [f.name for f in fields(cls or SFTConfig) if f.metadata.get("yaml", True)]


def _unknown(name: str, source: str, cls=None) -> ConfigError:
    names = _field_names(cls)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{source}: unknown field {name!r}{hint}; valid fields: {', '.join(names)}")


def apply_overrides(config, overrides: Sequence[str] = (), source: str = "--set"):
    """Apply `key=value` strings (values parsed as YAML, then coerced to the field's type) and validate.

    Works for any config dataclass with a `validate(source)` method (SFTConfig, twlib.pgrpo.PGRPOConfig).
    """
    cls = type(config)
    hints = get_type_hints(cls)
    for item in overrides or ():
        where = f"{source} {item}"
        if "=" not in item:
            raise ConfigError(f"{where}: expected key=value, e.g. lr=1e-3")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in _field_names(cls):
            raise _unknown(key, where, cls)
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            parsed = raw
        value = raw.strip() if isinstance(parsed, str) else parsed
        setattr(config, key, _coerce(key, hints[key], value, where))
    if overrides:
        return config.validate(f"{source} {' '.join(overrides)}")
    return config


def load_config(path=None, overrides: Sequence[str] = (), cls=None):
    """An `SFTConfig` (or `cls`) from a YAML file (None: the defaults) plus `key=value` overrides.

    Raises ConfigError naming the unknown or invalid field and the file (or the override), and
    FileNotFoundError for a missing file.
    """
    cls = cls or SFTConfig
    config = cls()
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value, got {type(raw).__name__}")
        for key, value in raw.items():
            if str(key) not in _field_names(cls):
                raise _unknown(str(key), str(path), cls)
            setattr(config, str(key), value)
        config.validate(str(path))
    apply_overrides(config, list(overrides or ()))
    return config.validate(source)


def save_config(config, path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------------------------
# Data: problems -> tries -> packed rows


def get_task_config(task: str, options: dict | None, source: str = "config"):
    """The task's config object from `task_options` (None when there are none: the task's defaults)."""
    from twlib.tasks import get_task

    if not options:
        return None
    try:
        return get_task(task).config_cls(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: field 'task_options': {e}") from None


def load_problems(config: SFTConfig, source: str | None = None) -> list:
    """The training problems: from `config.data` (Parquet) or generated (train split of `make_splits`)."""
    from twlib.tasks import load_parquet, make_splits

    where = f" (field 'data' of {source})" if source else ""
    if config.data is not None:
        path = Path(config.data)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} not found{where}; write one with `python -m twlib data` "
                                    f"or set data: null to generate the problems")
        problems = load_parquet(path)
        if config.n_train is not None:
            problems = problems[:config.n_train]
    else:
        task_config = get_task_config(config.task, config.task_options, source or "config")
        problems, _ = make_splits(config.task, config.n_train, config.n_eval, config.data_seed, task_config)
    if not problems:
        raise DataError(f"no training problems{where}: the data set is empty")
    return problems


def eval_problems(config: SFTConfig) -> list:
    """The held-out split that goes with generated training problems (same task, sizes and seed)."""
    from twlib.tasks import make_splits

    if config.data is not None:
        raise ValueError("eval_problems() needs generated data (data: null); load your eval Parquet instead")
    task_config = get_task_config(config.task, config.task_options)
    return make_splits(config.task, config.n_train, config.n_eval, config.data_seed, task_config)[1]


def trajectory_pairs(problem, tokenizer, mode: str) -> list[tuple[list[int], list[int]]]:
    """The (context ids, completion ids) pairs one problem trains on, after validating its text with `parse`.

    parallel: the state machine's calls (final call ends with EOS); sequential / causal: one pair
    (prompt, response + EOS) with the sequential / the parallel response text.
    """
    from twlib.format import engine_calls, parse

    if mode == "parallel":
        return tokenize_calls(engine_calls(problem.parallel, problem.prompt), tokenizer)
    text = problem.sequential if mode == "sequential" else problem.parallel
    parse(text)  # a malformed text raises FormatError, like engine_calls does in parallel mode
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encode = lambda s: list(tokenizer.encode(s, add_special_tokens=False)) if s else []  # noqa: E731
    return [(encode(problem.prompt), encode(text) + eos)]


def build_trajectories(problems, tokenizer, mode: str = "parallel", loss_policy: str = "completions",
                       ) -> tuple[list[str], list[PackedTrie]]:
    """One trie per problem (chains for sequential/causal). Problems whose text fails to parse are skipped
    with one warning naming them; if all fail, ValueError. Returns (problem ids, tries)."""
    from twlib.format import FormatError

    ids, tries, failed = [], [], []
    for problem in problems:
        try:
            pairs = trajectory_pairs(problem, tokenizer, mode)
        except FormatError as e:
            failed.append((problem.id, str(e)))
            continue
        ids.append(problem.id)
        tries.append(pack(pairs, loss=loss_policy))
    if failed:
        shown = "; ".join(f"{pid}: {msg}" for pid, msg in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        message = f"skipped {len(failed)} of {len(problems)} problems whose {mode} trajectory does not parse: {shown}{more}"
        if not tries:
            raise DataError("every trajectory failed to parse; " + message)
        warnings.warn(message, stacklevel=2)
    return ids, tries


def build_rows(ids: Sequence[str], tries: Sequence[PackedTrie], tokens_per_batch: int, pad_id: int = 0,
               max_positions: int | None = None) -> PackedTrie:
    """First-fit-decreasing packing of the tries into rows of at most `tokens_per_batch` tokens."""
    for pid, t in zip(ids, tries):
        n = t.shape[1]
        if n > tokens_per_batch:
            raise DataError(
                f"problem {pid}: its trajectory has {n} trie tokens, more than tokens_per_batch="
                f"{tokens_per_batch}; raise the budget (e.g. --set tokens_per_batch={_next_pow2(n)})")
        depth = int(t.position_ids.max()) + 1
        if max_positions is not None and depth > max_positions:
            raise DataError(f"problem {pid}: a path of {depth} tokens exceeds the model's "
                             f"max_position_embeddings={max_positions}")
    return collate(list(tries), max_tokens=tokens_per_batch, pad_id=pad_id)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _select(rows: PackedTrie, index) -> PackedTrie:
    """Rows `index` of a packed batch, trimmed to their longest real content (padding sits at the end)."""
    index = torch.as_tensor(index, dtype=torch.long)
    picked = {k: getattr(rows, k).index_select(0, index) for k in ("input_ids", "position_ids", "parents",
                                                                    "labels", "exits", "sample_ids")}
    length = int((picked["sample_ids"] >= 0).sum(1).max())
    return PackedTrie(**{k: v[:, :length].contiguous() for k, v in picked.items()})


def _fingerprint(rows: PackedTrie) -> str:
    h = hashlib.sha1()
    for k in ("input_ids", "parents", "labels", "sample_ids"):
        h.update(getattr(rows, k).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Loss


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


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# ----------------------------------------------------------------------------------------------------
# Model, tokenizer, device


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    attn: str
    mask_kind: str
    autocast: bool


def resolve_runtime(config: SFTConfig) -> Runtime:
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if config.device == "auto" else config.device))
    dtype = DTYPES[config.dtype] if config.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    attn = config.attn if config.attn != "auto" else ("flex_attention" if device.type == "cuda" else "sdpa")
    if attn == "flex_attention" and device.type == "cpu":
        raise ConfigError("field 'attn': flex_attention has no backward pass on CPU (torch 2.13); "
                          "use attn: sdpa (or auto) to train on CPU")
    return Runtime(device, dtype, attn, MASK_KIND[attn], bool(config.autocast))


def _local_model(model: str, need: str) -> str:
    """A local folder for a checkpoint directory or a hub id in the HF cache (twlib.hub); ConfigError if none."""
    from twlib.hub import ModelNotFound, resolve_model
    from twlib.models import PRESETS

    try:
        return resolve_model(model, need=need)
    except ModelNotFound as e:
        raise ConfigError(f"field 'model': {model!r} is not a preset ({', '.join(PRESETS)}): {e}") from None


def load_tokenizer(model: str, item_tokens: bool = False):
    """The tokenizer saved with a checkpoint directory (or a hub id's cached snapshot), else the project's
    byte tokenizer (`item_tokens`: with one token per `letter digit` item, see twlib.tokenizer)."""
    from twlib.models import PRESETS
    from twlib.tokenizer import build_tokenizer

    if model not in PRESETS:
        path = _local_model(model, "config")
        if (Path(path) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path)
    return build_tokenizer(item_tokens=item_tokens)


def load_base_model(model: str, tokenizer, seed: int, rt: Runtime):
    """A preset built from scratch (seeded), a `save_pretrained` directory or a hub id whose snapshot is in
    the Hugging Face cache (never downloaded: twlib.hub); on rt.device in rt.dtype."""
    from twlib.models import PRESETS, build_model

    if model in PRESETS:
        return build_model(model, tokenizer, seed=seed, device=rt.device, dtype=rt.dtype,
                           attn_implementation=rt.attn)
    path = _local_model(model, "weights")
    from transformers import AutoModelForCausalLM

    with _NoHFBars():
        loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation=rt.attn, dtype=torch.float32)
    if len(tokenizer) > loaded.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"{model}: tokenizer has {len(tokenizer)} tokens, the model's embedding only "
                         f"{loaded.get_input_embeddings().weight.shape[0]}")
    return loaded.to(device=rt.device, dtype=rt.dtype)


def enable_gradient_checkpointing(model) -> None:
    """HF per-decoder-layer activation checkpointing, non-reentrant (the transformers 5 name, or the older one)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _wrap_lora(model, config: SFTConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 alias that warns on every wrap
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _NoHFBars:
    """No transformers progress bars ("Loading weights", "Writing model shards") at every checkpoint."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.hf, self.enabled = hf_logging, hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        if self.enabled:
            self.hf.enable_progress_bar()
        return False


def _save_model(model, tokenizer, path: Path) -> None:
    with _NoHFBars():
        model.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))


def _swap_into_place(tmp: Path, final: Path, old: Path) -> None:
    """Commit a fully written checkpoint: final -> old, tmp -> final, drop old. Every state is loadable."""
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(out_dir: Path, model, tokenizer, optimizer, scheduler, state: dict, config: SFTConfig) -> Path:
    """Write `out_dir/checkpoint/` atomically (temporary directory, then renames)."""
    out_dir = Path(out_dir)
    tmp, final, old = out_dir / CHECKPOINT_TMP, out_dir / CHECKPOINT, out_dir / CHECKPOINT_OLD
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _save_model(model, tokenizer, tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    save_config(config, tmp / "train_config.yaml")
    _swap_into_place(tmp, final, old)
    return final


def find_checkpoint(out_dir) -> Path | None:
    """`out_dir/checkpoint`, or `checkpoint.old` when a crash fell between the two renames; None if neither."""
    for name in (CHECKPOINT, CHECKPOINT_OLD):
        path = Path(out_dir) / name
        if (path / "trainer_state.json").is_file():
            return path
    return None


def load_checkpoint_state(path) -> dict:
    """Trainer state, optimizer, scheduler and RNG states of a checkpoint directory (trusted files)."""
    path = Path(path)
    return {
        "trainer": json.loads((path / "trainer_state.json").read_text()),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=False),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=False),
        "rng": torch.load(path / "rng.pt", weights_only=False),
    }


def _load_lora_weights(model, path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{path}: adapter weights do not fit the model: {unexpected[:3]}")


# ----------------------------------------------------------------------------------------------------
# The loop


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
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "tokenizer")}


def _steps_per_epoch(n_rows: int, rows_per_step: int) -> int:
    return -(-n_rows // rows_per_step)


def _epoch_order(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n_rows, generator=g)


def _fork_all_rng():
    """Context manager: code inside may consume any RNG; training's RNG states are restored after."""
    class _Fork:
        def __enter__(self):
            self.state = _rng_state()

        def __exit__(self, *exc):
            _set_rng_state(self.state)
            return False

    return _Fork()


def _run_eval(config, model, tokenizer, step, out_dir, log) -> None:
    was_training = model.training
    model.eval()
    try:
        with _fork_all_rng(), torch.no_grad():
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


def _truncate_metrics(path: Path, upto_step: int) -> None:
    """Keep metric rows with step <= upto_step (a resumed run rewrites the steps after its checkpoint)."""
    if not path.exists():
        return
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= upto_step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def training_rows(config: SFTConfig, tokenizer, model, source: str | None, log) -> tuple[list, list, PackedTrie]:
    """(problems, tries, packed rows) of a config; skipped-trajectory warnings go to `log` and are re-raised
    as warnings. Shared by this trainer and `twlib.distributed` (every rank builds the same rows)."""
    problems = load_problems(config, source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, tries = build_trajectories(problems, tokenizer, config.mode, config.loss_policy)
    for w in caught:
        log(f"warning: {w.message}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    rows = build_rows(ids, tries, config.tokens_per_batch, pad_id=tokenizer.pad_token_id or 0,
                      max_positions=getattr(model.config, "max_position_embeddings", None))
    return problems, tries, rows


def train(config: SFTConfig, on_step: Callable[[int, dict], None] | None = None, source: str | None = None,
          quiet: bool = False) -> SFTResult:
    """Run SFT as configured; returns an `SFTResult` (with the trained model and tokenizer attached).

    `on_step(step, metrics)` runs after every optimizer step (after any checkpoint); raising from it
    stops the run there (used by the tests to simulate an interruption). `quiet` silences the console.
    `config.threads` applies for the run only (the previous torch thread count is restored).
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(int(config.threads))
    try:
        return _train(config, on_step, source, quiet)
    finally:
        torch.set_num_threads(threads)


def _train(config: SFTConfig, on_step, source: str | None, quiet: bool) -> SFTResult:
    from tqdm.auto import tqdm

    wall_start = time.perf_counter()
    config = copy.copy(config)
    config.validate(source or "config")
    try:
        rt = resolve_runtime(config)
    except ConfigError as e:
        raise ConfigError(f"{source or 'config'}: {e}") from None
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = config.progress if config.progress is not None else sys.stderr.isatty()

    def log(message: str) -> None:
        if not quiet:
            tqdm.write(message) if progress else print(message, flush=True)

    checkpoint = find_checkpoint(out_dir) if config.resume else None
    if config.resume and checkpoint is None:
        log(f"resume: no checkpoint in {out_dir}, starting from scratch")
    if checkpoint is None:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)

    # Model and tokenizer.
    tokenizer = load_tokenizer(str(checkpoint / "model") if checkpoint is not None and not config.lora
                               else config.model, config.item_tokens)
    if config.mode != "sequential":  # trie rows and the tags' stop tokens need every tag as one token
        require_single_token_tags(tokenizer, config.model)
    if checkpoint is not None and not config.lora:
        model = load_base_model(str(checkpoint / "model"), tokenizer, config.seed, rt)
    else:
        try:
            model = load_base_model(config.model, tokenizer, config.seed, rt)
        except ConfigError as e:
            raise ConfigError(f"{source or 'config'}: {e}") from None
        if config.lora:
            model = _wrap_lora(model, config)
            if checkpoint is not None:
                _load_lora_weights(model, checkpoint / "model")
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()

    # Data.
    problems, tries, rows = training_rows(config, tokenizer, model, source, log)
    n_rows = rows.shape[0]
    rows_per_step = config.rows_per_micro_batch * config.grad_accum
    spe = _steps_per_epoch(n_rows, rows_per_step)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * spe))
    warmup_steps = round(config.warmup * total_steps)
    fingerprint = _fingerprint(rows)
    fill = rows.num_tokens / (n_rows * config.tokens_per_batch)

    # Optimizer and schedule.
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=tuple(config.betas), eps=config.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, config.min_lr_ratio))

    start_step, train_s, tokens_seen, trained_seen = 0, 0.0, 0, 0
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        trainer = state["trainer"]
        if trainer.get("fingerprint") != fingerprint:
            raise DataError(f"{checkpoint}: the checkpoint was trained on different rows (the data or its "
                            f"generator, mode, loss policy or tokens_per_batch changed); use a new out_dir "
                            f"or resume=false")
        if trainer.get("total_steps") != total_steps:
            log(f"warning: the schedule had {trainer.get('total_steps')} steps, now {total_steps}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_step = int(trainer["step"])
        train_s = float(trainer.get("train_s", 0.0))
        tokens_seen = int(trainer.get("tokens", 0))
        trained_seen = int(trainer.get("trained_tokens", 0))
        log(f"resumed from {checkpoint} at step {start_step}")

    metrics_path = out_dir / "metrics.csv"
    if start_step == 0 and metrics_path.exists():
        metrics_path.unlink()
    _truncate_metrics(metrics_path, start_step)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"sft: mode={config.mode} loss={config.loss_policy} model={config.model} ({n_params:,} params, "
        f"{n_train:,} trained) device={rt.device} dtype={str(rt.dtype).removeprefix('torch.')} attn={rt.attn}")
    log(f"data: {len(problems)} problems, {len(tries)} trajectories, {n_rows} rows of <= "
        f"{config.tokens_per_batch} tokens ({100 * fill:.1f}% filled), {rows.num_trained:,} trained tokens "
        f"per epoch; {spe} steps/epoch x {rows_per_step} rows; {total_steps} steps")

    def trainer_state(step: int, loss: float) -> dict:
        rows_done = step * rows_per_step
        return {"step": step, "epoch": step // spe, "position": (step % spe) * rows_per_step,
                "rows_done": rows_done, "total_steps": total_steps, "train_s": train_s, "tokens": tokens_seen,
                "trained_tokens": trained_seen, "loss": loss, "fingerprint": fingerprint, "rows": n_rows}

    recent: list[float] = []
    loss_value = float("nan")
    bar = tqdm(total=total_steps, initial=start_step, disable=not progress or quiet, dynamic_ncols=True,
               desc=f"sft {config.mode}")
    order_epoch, order = -1, None
    autocast = (torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16) if rt.autocast
                else None)
    with metrics_path.open("a", newline="") as metrics_file:
        writer = csv.DictWriter(metrics_file, fieldnames=METRICS_FIELDS)
        if start_step == 0 or metrics_path.stat().st_size == 0:
            writer.writeheader()
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            epoch, k = divmod(step, spe)
            if epoch != order_epoch:
                order, order_epoch = _epoch_order(n_rows, config.seed, epoch), epoch
            chosen = order[k * rows_per_step:(k + 1) * rows_per_step]
            normalizer = int((rows.labels.index_select(0, chosen) != IGNORE).sum())
            lr_now = optimizer.param_groups[0]["lr"]
            loss_sum, step_tokens = 0.0, 0
            for m in range(0, len(chosen), config.rows_per_micro_batch):
                batch = _select(rows, chosen[m:m + config.rows_per_micro_batch])
                if autocast is not None:
                    with autocast:
                        loss, _ = batch_loss(model, batch, rt.mask_kind, normalizer=max(normalizer, 1))
                else:
                    loss, _ = batch_loss(model, batch, rt.mask_kind, normalizer=max(normalizer, 1))
                loss.backward()
                loss_sum += loss.item()
                step_tokens += batch.num_tokens
            params = [p for group in optimizer.param_groups for p in group["params"]]
            clip = config.grad_clip if config.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            train_s += dt
            tokens_seen += step_tokens
            trained_seen += normalizer
            loss_value = loss_sum
            recent = (recent + [loss_value])[-config.log_every:]
            done = step + 1
            row = {"step": done, "epoch": round(done / spe, 4), "loss": round(loss_value, 6),
                   "lr": f"{lr_now:.6g}", "grad_norm": round(grad_norm, 6), "tokens": step_tokens,
                   "trained_tokens": normalizer, "tokens_per_s": round(step_tokens / dt, 1),
                   "elapsed_s": round(train_s, 3)}
            writer.writerow(row)
            metrics_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{step_tokens / dt:.0f}")
            if done % config.log_every == 0 or done == total_steps:
                log(f"step {done}/{total_steps} epoch {done / spe:.2f} loss {sum(recent) / len(recent):.4f} "
                    f"lr {lr_now:.3g} grad_norm {grad_norm:.3g} tok/s {tokens_seen / train_s:.0f} "
                    f"elapsed {train_s:.0f}s")
            if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == total_steps):
                save_checkpoint(out_dir, model, tokenizer, optimizer, scheduler, trainer_state(done, loss_value),
                                config)
            if config.eval_hook is not None and config.eval_every and done % config.eval_every == 0 \
                    and done != total_steps:
                _run_eval(config, model, tokenizer, done, out_dir, log)
            if on_step is not None:
                on_step(done, row)
    bar.close()

    if config.eval_hook is not None:
        _run_eval(config, model, tokenizer, total_steps, out_dir, log)

    # Final model: merged weights (LoRA: also the adapter alone) + tokenizer + the config.
    final_dir = out_dir / "final"
    tmp_final = out_dir / ".final.tmp"
    if tmp_final.exists():
        shutil.rmtree(tmp_final)
    tmp_final.mkdir(parents=True)
    if config.lora:
        model.save_pretrained(str(tmp_final / "adapter"))
        model = model.merge_and_unload()
    _save_model(model, tokenizer, tmp_final)
    save_config(config, tmp_final / "train_config.yaml")
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_final, final_dir)

    steps_done = total_steps - start_step
    if not recent and checkpoint is not None:
        loss_value = float(state["trainer"].get("loss", float("nan")))
    result = SFTResult(
        steps=total_steps, final_loss=loss_value,
        mean_loss_last=sum(recent) / len(recent) if recent else loss_value,
        wall_s=time.perf_counter() - wall_start, train_s=train_s, tokens=tokens_seen,
        trained_tokens=trained_seen, tokens_per_s=tokens_seen / train_s if train_s else 0.0,
        out_dir=str(out_dir), final_dir=str(final_dir), rows=n_rows, trajectories=len(tries),
        skipped=len(problems) - len(tries), model=model, tokenizer=tokenizer)
    (out_dir / "result.json").write_text(json.dumps({**result.to_dict(), "steps_this_run": steps_done}, indent=1))
    log(f"done: {total_steps} steps, loss {result.mean_loss_last:.4f}, {result.tokens_per_s:.0f} tok/s, "
        f"{result.wall_s / 60:.1f} min -> {final_dir}")
    return result


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
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="YAML file of SFTConfig fields (configs/tiny-*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set lr=1e-3 --set max_steps=50 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint if present")
    from twlib.plan import add_dry_run_argument

    return add_dry_run_argument(parser)


def main_args(args: argparse.Namespace) -> int:
    """Run from parsed arguments (`twlib.cli` delegates here). Config errors print and return 2."""
    if getattr(args, "dry_run", False):
        from twlib.plan import print_dry_run

        return print_dry_run(args)
    try:
        overrides = list(args.set or []) + (["resume=true"] if getattr(args, "resume", False) else [])
        config = load_config(args.config, overrides)
        train(config, source=str(args.config))
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m twlib sft", description=__doc__.split("\n")[0]))
    return main_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
