"""The planner's front: a trainer config -> a plan (the dry run), and the `twlib plan` command line.

    python -m twlib plan --dry-run configs/qwen3-8b-sft.yaml     (or: python -m twlib sft --config ... --dry-run)
    python -m twlib plan --preset small-gpu --model Qwen3-1.7B

Design choices
- The dry run validates a trainer's YAML config with `twlib.config.load_config`, takes its `launch:`
  section (twlib.config.LaunchConfig: GPUs, sharding, offload, gradient checkpointing, logits mode; the
  same settings the FSDP2 run applies), builds the model on the meta device and prints the sharding plan
  and the memory estimate of `twlib.infra.plan`. A config error names the field and exits with code 2.
- A model that is not on disk yet is planned from its name (`models/Qwen3-8B` -> the published Qwen3-8B
  architecture), so a plan never needs a download.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from twlib.config import (LOGITS_MODES, SHARDINGS, ConfigError, DataError, LaunchConfig, load_config, load_pgrpo_config,
                          read_launch)
from twlib.infra.plan import HARDWARE, Memory, Plan, PlanConfig, SCHEDULES, Throughput, make_plan, shard_count
from twlib.infra.sizes import ATTNS, GIB, GPUS, LORA_TARGETS, ModelShape, PRECISIONS, model_shape


# ----------------------------------------------------------------------------------------------------
# Dry run of a trainer config


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
    n, weight_bytes = shard_count(c), PRECISIONS[c.precision].weights
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
        notes.append(f"multi-GPU: torchrun --nproc_per_node {launcher.gpus} -m twlib.train.sft --config CONFIG "
                     "(FSDP2 over the same rows and loss as twlib.train.sft; see docs/full_scale.md)")
    return ["\nnotes:", *(f"  - {n}" for n in notes)] if notes else []


def _is_pgrpo_config(config_path) -> bool:
    """A P-GRPO config (twlib.train.pgrpo.PGRPOConfig) rather than an SFT one: it has rollout fields."""
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
    lines += ["\nlaunch:", f"  torchrun --nproc_per_node {min(launcher.gpus, 8)} -m twlib.train.pgrpo_fsdp --config "
              f"{config_path} --rollout {'vllm' if launcher.gpus > 1 else 'hf'}",
              "\nnotes:", "  - FSDP2 trainer + one rollout engine per rank, weights synced after every step "
              "(twlib.train.pgrpo_fsdp; docs/full_scale.md section 3); one process: python -m twlib pgrpo"]
    if cfg.kl_coef > 0:  # the frozen reference is a sharded copy of the model in the trainer's storage dtype
        ref_bytes = plan.params * (2 if plan.config.precision == "bf16" else 4) / plan.config.gpus
        lines.append(f"  - kl_coef {cfg.kl_coef:g}: the frozen reference model adds its shards, "
                     f"{ref_bytes / GIB:.2f} GiB per GPU (not in the totals above), and one forward per micro-batch")
    return "\n".join(lines), plan


def dry_run_plan(config_path, overrides=()) -> tuple[str, Plan]:
    """(report, plan) of a twlib.train.sft or twlib.train.pgrpo config (with `--set KEY=VALUE` overrides); raises
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
    """The dry-run report of a twlib.train.sft or twlib.train.pgrpo config (see dry_run_plan)."""
    return dry_run_plan(config_path, overrides)[0]


def add_dry_run_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--dry-run` for the trainers' command lines (twlib sft / pgrpo / distributed / distributed_pgrpo)."""
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config (with --set), build the model on the meta device, print the "
                             "sharding plan and memory estimate, and exit (twlib.infra.plan)")
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
    parser.add_argument("--dry-run", metavar="CONFIG", help="validate a twlib.train.sft YAML config, print its sharding "
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
        prog="python -m twlib plan", description=__doc__.split("\n")[0],
        epilog="All numbers are estimates; the assumptions are the fields of PlanConfig, Throughput and "
               "Schedule in twlib/infra/plan.py."))
    return main_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
