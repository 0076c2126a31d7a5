"""Configuration of the trainers: one typed dataclass per trainer, read from YAML plus `--set key=value`.

    load_config("configs/tiny-parallel.yaml", ["lr=1e-3"]); load_config("configs/tiny-pgrpo.yaml", cls=PGRPOConfig)

Design choices
- YAML keys are the dataclass's field names; an unknown key is an error that names the file and the
  closest valid field. Values from YAML or `--set` are coerced to the field's annotation (`coerce`), so
  `--set lr=1e-3`, `--set betas=[0.9,0.95]` and `--set max_steps=null` all work, and a wrong type names the
  field and where the value came from.
- Launch settings (GPUs, sharding, offload, checkpointing, LM-head mode) are the file's `launch:` mapping
  (`LaunchConfig`): the planner's dry run and the FSDP2 trainers read the same settings.
- Retired fields (`RETIRED`) load only at their old value (the configs saved beside shipped checkpoints).
- Callables (eval hooks, reward functions) carry `metadata={"yaml": False}`: never read from or written to YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence, Union, get_args, get_origin, get_type_hints

import torch
import yaml

from twlib.rewards import ACCELERATION_FORMS, RewardConfig
from twlib.tasks import TASKS
from twlib.trie import LOSS_POLICIES

__all__ = ["ConfigError", "DataError", "coerce", "apply_overrides", "load_config", "save_config", "LaunchConfig",
           "SFTConfig", "PGRPOConfig", "load_pgrpo_config", "MODES", "PACKINGS", "DTYPES", "ATTN_IMPLEMENTATIONS",
           "RETIRED", "read_launch"]

MODES = ("parallel", "sequential", "causal")
PACKINGS = ("group", "trajectory", "call")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention")
SHARDINGS = ("none", "fsdp", "zero3")
LOGITS_MODES = ("full", "kept", "chunked")
LOGITS_ALIASES = {"twlib": "kept"}  # the name `kept` had while twlib.trie.logprobs kept the logits
# field -> the only value still accepted (and ignored), with why the option went
RETIRED = {"item_tokens": (False, "one token per `letter digit` item was a probe that did not help; the "
                                  "shipped checkpoints' train_config.yaml still say item_tokens: false")}


class ConfigError(ValueError):
    """An unknown or invalid configuration field; the message names the field and where it came from."""


class DataError(ValueError):
    """Unusable training data: empty, all trajectories malformed, a trajectory over the row budget."""


# ----------------------------------------------------------------------------------------------------
# Coercion: a YAML or --set value as the type of the field


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce_number(name: str, tp, value, fail):
    if isinstance(value, bool):
        fail("an integer" if tp is int else "a number")
    if tp is int and isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        fail("an integer" if tp is int else "a number")
    if tp is int:
        if not number.is_integer():
            fail("an integer")
        return int(number)
    if not math.isfinite(number):
        fail("a finite number")
    return number


def _coerce_bool(value, fail):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    fail("true or false")


def _coerce_sequence(name: str, tp, value, source: str, fail):
    origin, args = get_origin(tp), get_args(tp)
    if origin is tuple:
        if isinstance(value, str):
            items = [v for v in value.strip("[]() ").split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            fail(f"a list of {len(args)} numbers")
        if len(items) != len(args):
            fail(f"a list of {len(args)} numbers")
        return tuple(coerce(name, a, v, source) for a, v in zip(args, items))
    (item,) = args or (str,)
    if isinstance(value, str):
        value = [v.strip() for v in value.strip("[] ").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        fail("a list")
    return [coerce(name, item, v, source) for v in value]


def coerce(name: str, tp, value, source: str):
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
                return coerce(name, option, value, source)
            except ConfigError:
                continue
        fail(" or ".join(_type_name(o) for o in options) + " or null")
    if tp is Any:
        return value
    if tp is bool:
        return _coerce_bool(value, fail)
    if tp in (int, float):
        return _coerce_number(name, tp, value, fail)
    if tp is str:
        return value if isinstance(value, str) else fail("a string")
    if origin in (tuple, list):
        return _coerce_sequence(name, tp, value, source, fail)
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) or {}
        return dict(value) if isinstance(value, dict) else fail("a mapping")
    if dataclasses.is_dataclass(tp):  # a nested section such as `launch:`
        if isinstance(value, tp):
            return value.validate(f"{source} ({name})")
        if isinstance(value, str):
            value = yaml.safe_load(value) or {}
        if not isinstance(value, dict):
            fail(f"a mapping of {_type_name(tp)} fields")
        return read_fields(tp(), value, f"{source} ({name})")
    return value  # pragma: no cover - every field type is handled above


def yaml_fields(cls) -> list[str]:
    return [f.name for f in fields(cls) if f.metadata.get("yaml", True)]


def unknown_field(name: str, source: str, cls) -> ConfigError:
    names = yaml_fields(cls)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{source}: unknown field {name!r}{hint}; valid fields: {', '.join(names)}")


def read_fields(config, raw: dict, source: str):
    """Set `config`'s fields from the mapping `raw` (unknown and retired keys checked), then validate."""
    for key, value in raw.items():
        key = str(key)
        if key in RETIRED and key not in yaml_fields(type(config)):
            kept, why = RETIRED[key]
            if coerce(key, type(kept), value, source) != kept:
                raise ConfigError(f"{source}: field {key!r} was removed ({why}); only {key}: "
                                  f"{str(kept).lower()} is still accepted")
            continue
        if key not in yaml_fields(type(config)):
            raise unknown_field(key, source, type(config))
        setattr(config, key, value)
    return config.validate(source)


def coerce_fields(config, source: str) -> None:
    """Coerce every YAML field of a config dataclass to its annotation, in place."""
    hints = get_type_hints(type(config))
    for f in fields(config):
        if f.metadata.get("yaml", True):
            setattr(config, f.name, coerce(f.name, hints[f.name], getattr(config, f.name), source))


def apply_overrides(config, overrides: Sequence[str] = (), source: str = "--set"):
    """Apply `key=value` strings (values parsed as YAML, then coerced to the field's type) and validate.

    Works for any config dataclass with a `validate(source)` method (SFTConfig, PGRPOConfig).
    """
    cls = type(config)
    hints = get_type_hints(cls)
    for item in overrides or ():
        where = f"{source} {item}"
        if "=" not in item:
            raise ConfigError(f"{where}: expected key=value, e.g. lr=1e-3")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in yaml_fields(cls):
            raise unknown_field(key, where, cls)
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            parsed = raw
        value = raw.strip() if isinstance(parsed, str) else parsed
        setattr(config, key, coerce(key, hints[key], value, where))
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
        read_fields(config, raw, str(path))
    apply_overrides(config, list(overrides or ()))
    return config.validate(source)


def save_config(config, path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def to_dict(config) -> dict:
    """The YAML-able fields, tuples as lists, nested sections as mappings."""
    out = {}
    for f in fields(config):
        if not f.metadata.get("yaml", True):
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        out[f.name] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
    return out


def _checker(config, source: str):
    """(bad, choice): raise a ConfigError naming a field of `config` and `source`."""

    def bad(name, why):
        raise ConfigError(f"{source}: field {name!r}: {why} (got {getattr(config, name)!r})")

    def choice(name, options):
        if getattr(config, name) not in options:
            bad(name, f"expected one of {', '.join(map(repr, options))}")

    return bad, choice


# ----------------------------------------------------------------------------------------------------
# Launch settings (the `launch:` section)


@dataclass
class LaunchConfig:
    """How a run is launched: what the planner's dry run estimates and the FSDP2 trainers apply.

    gpus, gpu            GPUs of the launch (torchrun --nproc_per_node) and their kind (a twlib.infra.plan.GPUS key;
                         planner numbers only)
    sharding             "none" | "fsdp" | "zero3" (the planner; the FSDP2 trainers always shard fully)
    offload_optimizer    FSDP2 CPUOffloadPolicy (parameters, gradients and the optimizer step on the CPU)
    gradient_checkpointing  per-layer activation checkpointing (also on when the trainer's own field is)
    logits, logits_chunk "chunked" (each LM-head chunk recomputed in the backward) | "kept" | "full" (planner
                         only; the trainers run it as kept); tokens per chunk
    precision            a planner precision (bf16-mixed, fp32, ...); null: from the trainer's dtype/autocast
    overhead_gib         the planner's fixed per-GPU overhead
    """

    gpus: int = 1
    gpu: str = "h100-80gb"
    sharding: str = "none"
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False
    logits: str = "chunked"
    logits_chunk: int = 4096
    precision: str | None = None
    overhead_gib: float = 1.0

    def validate(self, source: str = "launch") -> "LaunchConfig":
        coerce_fields(self, source)
        bad, choice = _checker(self, source)
        self.logits = LOGITS_ALIASES.get(self.logits, self.logits)
        choice("sharding", SHARDINGS)
        choice("logits", LOGITS_MODES)
        # gpu and precision name entries of the planner's tables: twlib.infra.plan checks them in the dry run
        for name in ("gpus", "logits_chunk"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        return self

    def to_dict(self) -> dict:
        return to_dict(self)


# ----------------------------------------------------------------------------------------------------
# Trie SFT (twlib.train.sft)


@dataclass
class SFTConfig:
    """Everything an SFT run needs; YAML keys are the field names.

    model            preset name (`tiny`, `small`, `base`: from scratch, seeded by `seed`), a directory
                     written by `save_pretrained` (e.g. a previous run's `out_dir/final`) or a hub id
                     (`Qwen/Qwen3-0.6B`) already in the Hugging Face cache (twlib.hub; never downloaded)
    task, data       problems: `data` = a Parquet path (`twlib.infra.problems.save_parquet`), or null to generate
                     `make_splits(task, n_train, n_eval, data_seed, task_options)` and train on its train
                     split (the eval split stays held out; `python -m twlib data` writes the same split).
                     With `data`, `n_train` (if set) keeps the first n problems.
    task_options     keyword arguments of the task's config class, e.g. {max_groups: 3}
    mode             "parallel" | "sequential" | "causal" (see twlib.train.sft)
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
    tensorboard      also write out_dir/tensorboard event files beside metrics.csv (twlib.metrics; offline)
    eval_every       steps between calls of eval_hook (0: only at the end)
    launch           LaunchConfig: GPUs, sharding, offload, LM-head mode (the planner and the FSDP2 run)
    eval_hook        callable(model, tokenizer, step) -> dict of metrics; set in Python, never in YAML
    """

    model: str = "small"
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
    tensorboard: bool = False
    eval_every: int = 0
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval_hook: Callable | None = field(default=None, repr=False, compare=False, metadata={"yaml": False})

    def validate(self, source: str = "config") -> "SFTConfig":
        """Coerce every field to its type and check its range; ConfigError naming the field and `source`."""
        coerce_fields(self, source)
        bad, choice = _checker(self, source)
        choice("mode", MODES)
        choice("loss_policy", LOSS_POLICIES)
        _check_runtime(self, bad, choice)
        _check_problems(self, bad)
        if not self.lr > 0:
            bad("lr", "must be > 0")
        for name, ok, why in (("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
                              ("warmup", 0 <= self.warmup < 1, "must be a fraction of the steps in [0, 1)"),
                              ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
                              ("betas", all(0 <= b < 1 for b in self.betas), "both must be in [0, 1)"),
                              ("eps", self.eps > 0, "must be > 0")):
            if not ok:
                bad(name, why)
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
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        if self.lora and not self.lora_targets:
            bad("lora_targets", "LoRA needs at least one target module name")
        if self.eval_hook is not None and not callable(self.eval_hook):
            bad("eval_hook", "expected a callable(model, tokenizer, step) -> dict")
        return self

    def to_dict(self) -> dict:
        return to_dict(self)


def _check_runtime(config, bad, choice) -> None:
    """device, dtype, attn and threads: the fields both trainers share."""
    choice("dtype", ("auto", *DTYPES))
    choice("attn", ATTN_IMPLEMENTATIONS)
    if not (config.device in ("auto", "cpu", "mps") or config.device.startswith("cuda")):
        bad("device", "expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if config.threads is not None and config.threads < 1:
        bad("threads", "must be >= 1 or null")


def _check_problems(config: SFTConfig, bad) -> None:
    if config.data is None:
        if config.task not in TASKS:
            bad("task", f"unknown task; known: {', '.join(sorted(TASKS))}")
        if config.n_train is None or config.n_train < 1:
            bad("n_train", "must be >= 1 when the problems are generated (data: null)")
    elif config.n_train is not None and config.n_train < 1:
        bad("n_train", "must be >= 1 or null (all problems of the file)")
    if config.n_eval < 0:
        bad("n_eval", "must be >= 0")
    if not isinstance(config.task_options, dict):
        bad("task_options", "expected a mapping of the task config's fields")


# ----------------------------------------------------------------------------------------------------
# P-GRPO (twlib.train.pgrpo)


@dataclass
class PGRPOConfig:
    """Everything a P-GRPO run needs; YAML keys are the field names.

    model              an SFT checkpoint directory (e.g. assets/checkpoints/tiny-parallel) or a preset
    mode               "parallel" (P-GRPO with the state machine) | "sequential" (GRPO, one call per rollout)
    task, n_train, n_eval, data_seed, task_options   the prompt pool: train split of make_splits (the eval
                       split is the same held-out set as SFT's)
    data               a Parquet of Problems (`twlib.infra.problems.save_parquet`: prompt + answer) as the prompt pool
                       instead (its first n_train); `task` then only names the grader: "groupsum",
                       "multiply" or "math" (math-verify, for the paper's math prompts)
    prompts_per_step, rollouts_per_prompt, steps
    temperature, top_p, max_new_tokens, max_thread_tokens, rollout_batch (problems decoded together)
    acceleration, rho, rho_clip, incorrect_reward   the reward (twlib.rewards; paper form by default)
    std_normalize      divide advantages by the group's std (the paper's ablation; off by default)
    updates_per_batch  1 = on-policy (reference); > 1 turns on PPO clipping with clip_low / clip_high
    kl_coef            > 0 adds a k3 KL penalty to the frozen starting model (reference: 0)
    skip_idle_steps    no optimizer step when every advantage is 0 and kl_coef is 0: the gradient is then 0,
                       yet AdamW's momentum still moves the weights (measured: parallel ratio 0.41 -> 0.02 over
                       such steps from the 33% tiny model at lr 1e-3). Off by default, as the reference.
    lr, warmup (fraction of steps, then constant), weight_decay, betas, grad_clip
    packing            "group" | "trajectory" | "call" (see twlib.train.pgrpo); tokens_per_batch: row budget
    seed, device, threads, dtype, attn, checkpoint_every, resume, out_dir, log_every, progress
    tensorboard        also write out_dir/tensorboard event files beside metrics.csv (twlib.metrics; offline)
    launch             LaunchConfig: GPUs, sharding, offload, LM-head mode (the planner and the FSDP2 run)
    """

    model: str = "assets/checkpoints/tiny-parallel"
    mode: str = "parallel"
    task: str = "groupsum"
    data: str | None = None
    n_train: int = 2000
    n_eval: int = 500
    data_seed: int = 0
    task_options: dict = field(default_factory=dict)
    prompts_per_step: int = 8
    rollouts_per_prompt: int = 8
    steps: int = 50
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    max_thread_tokens: int = 256
    rollout_batch: int = 64
    acceleration: str = "paper"
    rho: float = 0.5
    rho_clip: float = 0.2
    incorrect_reward: float = 0.0
    std_normalize: bool = False
    updates_per_batch: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0
    skip_idle_steps: bool = False
    lr: float = 1e-4
    warmup: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    packing: str = "group"
    tokens_per_batch: int = 8192
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    dtype: str = "auto"
    attn: str = "auto"
    autocast: bool = False
    checkpoint_every: int = 10
    resume: bool = False
    out_dir: str = "runs/pgrpo"
    log_every: int = 1
    progress: bool | None = None
    tensorboard: bool = False
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    # callable(text, answer, stats) -> twlib.rewards.Reward, replacing `score` (set in Python, never in YAML)
    reward_fn: Callable | None = field(default=None, repr=False, compare=False, metadata={"yaml": False})

    def validate(self, source: str = "config") -> "PGRPOConfig":
        coerce_fields(self, source)
        bad, choice = _checker(self, source)
        choice("mode", ("parallel", "sequential"))
        choice("acceleration", ACCELERATION_FORMS)
        choice("packing", PACKINGS)
        _check_runtime(self, bad, choice)
        if self.data is None and self.task not in TASKS:
            bad("task", f"unknown task; known: {', '.join(sorted(TASKS))} (or 'math' with a `data` file)")
        if self.data is not None and self.task not in (*TASKS, "math"):
            bad("task", f"unknown grader; known: {', '.join(sorted(TASKS))}, 'math'")
        for name in ("n_train", "prompts_per_step", "rollouts_per_prompt", "steps", "max_new_tokens",
                     "max_thread_tokens", "rollout_batch", "updates_per_batch", "tokens_per_batch", "log_every"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.rollouts_per_prompt < 2:
            bad("rollouts_per_prompt", "GRPO needs >= 2 rollouts per prompt (advantages are centred per group)")
        if not self.temperature > 0:
            bad("temperature", "must be > 0 (rollouts are sampled; greedy rollouts would all be equal)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if not 0 <= self.warmup < 1:
            bad("warmup", "must be a fraction of the steps in [0, 1)")
        for name in ("clip_low", "clip_high", "kl_coef", "weight_decay", "rho", "rho_clip", "checkpoint_every"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.reward_fn is not None and not callable(self.reward_fn):
            bad("reward_fn", "expected a callable(text, answer, stats) -> Reward")
        return self

    def to_dict(self) -> dict:
        return to_dict(self)

    @property
    def reward(self) -> RewardConfig:
        return RewardConfig(task=self.task, acceleration=self.acceleration, rho=self.rho, rho_clip=self.rho_clip,
                            incorrect_reward=self.incorrect_reward)


def load_pgrpo_config(path=None, overrides: Sequence[str] = ()) -> PGRPOConfig:
    return load_config(path, overrides, cls=PGRPOConfig)


def read_launch(path) -> LaunchConfig:
    """The `launch:` section of a trainer config file (SFT or P-GRPO), validated; the defaults without one."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    section = raw.get("launch") if isinstance(raw, dict) else None
    return coerce("launch", LaunchConfig, section or {}, str(path))
