"""The tiny end-to-end pipeline (the main job): data, base model, three SFTs, decoding, evaluation.

    python -m twlib demo                 # everything from scratch (~30 min on 2 CPU cores), resumable
    python -m twlib demo --from-assets   # evaluate the shipped checkpoints (under a minute)
    python -m twlib demo --from-assets --long   # the longer recipe's shipped models (scripts/long_recipe.sh)

Stages, mirroring the paper at toy scale:
0. data: the tiny task's train/eval splits (Parquet) and the oracle ceiling of perfect trajectories;
1. base: a sequential reasoner trained from scratch (`configs/tiny-base.yaml`, the analogue of Qwen3);
2. parallel: trie SFT of the base on parallel trajectories (`configs/tiny-parallel.yaml`);
3. sequential: the baseline, fine-tuned from the same base on the same problems, sequential form;
4. causal: the leakage ablation, the parallel text trained as one causal sequence;
5. evaluation: every model on the held-out split (greedy; problems batched for accuracy and tokens),
   then the parallel and sequential models one problem at a time for wall clock (the paper's setting).

Design choices
- Every stage writes into `out/<stage>/` and is skipped when its `final/` exists, and SFT resumes from
  its last checkpoint, so an interrupted run continues where it stopped (`--fresh` starts over).
- The stage configs are the YAML files in `configs/`; the pipeline only points their `model` and
  `out_dir` into its own folder, so `python -m twlib sft --config ...` reproduces any single stage.
- Numbers are printed next to the paper's (spec section 7); the per-problem rows and the summary land
  in CSV files under `out/`.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("base", "parallel", "sequential", "causal")
PAPER = {  # spec section 7 (Qwen3-8B, averages over six benchmarks; wall clock on 50 MATH500 problems)
    "accuracy_sequential": 72.2, "accuracy_parallel": 71.9, "latency_sequential": 15.1e3,
    "latency_parallel": 13.2e3, "mean_speedup": 1.22, "wall_clock_speedup": 1.14,
}


@dataclass
class PipelineConfig:
    out: str = "runs/tiny"
    configs: str = str(ROOT / "configs")
    n_eval: int = 500
    wall_problems: int = 100
    eval_batch: int = 32
    max_new_tokens: int = 512
    from_assets: bool = False
    long: bool = False  # with from_assets: the longer recipe's models (assets/checkpoints/tiny-long-*)
    assets: str = str(ROOT / "assets" / "checkpoints")
    fresh: bool = False
    progress: bool | None = None
    overrides: tuple[str, ...] = ()  # `key=value` applied to every stage config (e.g. max_steps=2 in tests)
    pgrpo: bool = False  # also run P-GRPO on the parallel model (configs/tiny-pgrpo.yaml, ~6 min) and evaluate it
    pgrpo_overrides: tuple[str, ...] = ()  # `key=value` for the P-GRPO config

    def __post_init__(self):
        if self.long and not self.from_assets:
            raise ValueError("--long evaluates the longer recipe's shipped models and needs --from-assets; "
                             "to train that recipe run `bash scripts/long_recipe.sh`")


def _say(text: str) -> None:
    print(text, flush=True)


def train_stage(stage: str, cfg: PipelineConfig) -> dict:
    """Run (or skip, if done) one SFT stage; returns its training summary."""
    from twlib.sft import load_config, train

    out = Path(cfg.out) / stage
    final = out / "final"
    summary_path = out / "train_summary.json"
    if final.is_dir() and summary_path.is_file():
        _say(f"[{stage}] done already ({final}); delete it to retrain")
        return json.loads(summary_path.read_text())
    overrides = [f"out_dir={out}", "resume=true"]
    if stage != "base":
        overrides.append(f"model={Path(cfg.out) / 'base' / 'final'}")
    if cfg.progress is not None:
        overrides.append(f"progress={str(cfg.progress).lower()}")
    overrides += list(cfg.overrides)
    config = load_config(Path(cfg.configs) / f"tiny-{stage}.yaml", overrides)
    _say(f"[{stage}] training: mode={config.mode}, model={config.model}, out={out}")
    result = train(config, source=f"configs/tiny-{stage}.yaml")
    summary = {k: v for k, v in result.to_dict().items() if isinstance(v, (int, float, str))}
    summary_path.write_text(json.dumps(summary, indent=1))
    _say(f"[{stage}] {result.steps} steps, final loss {result.final_loss:.4f}, {result.train_s / 60:.1f} min, "
         f"{result.tokens_per_s:,.0f} tokens/s")
    return summary


def train_pgrpo(cfg: PipelineConfig) -> dict:
    """P-GRPO on the trie-SFT model (configs/tiny-pgrpo.yaml), skipped when done; returns its summary."""
    from twlib.pgrpo import load_pgrpo_config, train

    out = Path(cfg.out) / "pgrpo"
    summary_path = out / "train_summary.json"
    if (out / "final").is_dir() and summary_path.is_file():
        _say(f"[pgrpo] done already ({out / 'final'}); delete it to retrain")
        return json.loads(summary_path.read_text())
    overrides = [f"out_dir={out}", "resume=true", f"model={Path(cfg.out) / 'parallel' / 'final'}"]
    if cfg.progress is not None:
        overrides.append(f"progress={str(cfg.progress).lower()}")
    config = load_pgrpo_config(Path(cfg.configs) / "tiny-pgrpo.yaml", overrides + list(cfg.pgrpo_overrides))
    _say(f"[pgrpo] training: {config.steps} steps of {config.prompts_per_step} x {config.rollouts_per_prompt} rollouts")
    result = train(config, source="configs/tiny-pgrpo.yaml")
    summary = {"steps": result.steps, "train_s": result.wall_s, "first_reward": result.first.get("reward"),
               "last_reward": result.last.get("reward")}
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def evaluate_models(models: dict[str, str], problems, cfg: PipelineConfig) -> dict:
    """Greedy decoding of every model on `problems`; the parallel/sequential pair also at batch size 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, sequential_decoder
    from twlib.eval import evaluate, summarize, write_rows

    decode_config = DecodeConfig(max_new_tokens=cfg.max_new_tokens)
    out = Path(cfg.out)
    results, wall = {}, {}
    for name, path in models.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        engine = HFEngine(model, tokenizer)
        parallel = name in ("parallel", "causal", "pgrpo")
        decoder = (ParallelDecoder(engine, tokenizer, decode_config) if parallel
                   else sequential_decoder(engine, tokenizer, decode_config))
        start = time.perf_counter()
        rows = evaluate(decoder, problems, tokenizer, batch_size=cfg.eval_batch, progress=bool(cfg.progress))
        s = summarize(rows)
        _say(f"[eval] {name:<10} accuracy {100 * s['accuracy']:5.1f}%  format {100 * s['format_valid']:5.1f}%  "
             f"parallel {100 * s['parallel_rate']:5.1f}%  latency {s['mean_token_latency']:6.1f}  "
             f"({time.perf_counter() - start:.0f} s)")
        write_rows(out / f"eval_{name}.csv", rows)
        results[name] = rows
        if name in ("parallel", "sequential") and cfg.wall_problems:
            subset = problems[: cfg.wall_problems]
            evaluate(decoder, subset[:3], tokenizer, progress=False)  # warm-up
            timed = evaluate(decoder, subset, tokenizer, batch_size=1, progress=bool(cfg.progress))
            write_rows(out / f"wall_{name}.csv", timed)
            wall[name] = timed
    return {"rows": results, "wall": wall}


def results_table(evals: dict, training: dict) -> list[dict]:
    from twlib.eval import compare, summarize

    rows, seq = [], evals["rows"].get("sequential")
    for name, result in evals["rows"].items():
        s = summarize(result)
        row = {"model": name, "accuracy": 100 * s["accuracy"], "format_valid": 100 * s["format_valid"],
               "parallel_rate": 100 * s["parallel_rate"], "mean_eta": s["mean_eta"],
               "token_latency": s["mean_token_latency"], "total_tokens": s["mean_total_tokens"]}
        if seq is not None:
            c = compare(result, seq)
            row.update({"speedup_mean": c["speedup"]["mean"], "speedup_median": c["speedup"]["median"],
                        "speedup_max": c["speedup"]["max"], "speedup_correct_mean": c["speedup_correct"]["mean"]})
        if name in evals["wall"]:
            row["wall_s_per_problem"] = statistics.fmean(r.seconds for r in evals["wall"][name])
        if name in training:
            row["train_min"] = training[name].get("train_s", 0) / 60
        rows.append(row)
    if "parallel" in evals["wall"] and "sequential" in evals["wall"]:
        c = compare(evals["wall"]["parallel"], evals["wall"]["sequential"])
        for row in rows:
            if row["model"] == "parallel":
                row["wall_speedup"] = c["wall_clock_speedup"]
                row["wall_over_token"] = c["wall_over_token"]
    return rows


def print_table(rows: list[dict]) -> None:
    cols = [("model", "{:<11}"), ("accuracy", "{:>6.1f}%"), ("format_valid", "{:>6.1f}%"),
            ("parallel_rate", "{:>6.1f}%"), ("token_latency", "{:>8.1f}"), ("total_tokens", "{:>7.1f}"),
            ("speedup_mean", "{:>6.2f}x"), ("speedup_max", "{:>6.2f}x"), ("wall_s_per_problem", "{:>7.3f}"),
            ("wall_speedup", "{:>6.2f}x"), ("train_min", "{:>5.1f}")]
    heads = ["model", "acc", "format", "par", "latency", "total", "speed", "max", "s/prob", "wall", "min"]
    widths = [11, 7, 7, 7, 8, 7, 7, 7, 7, 7, 5]
    _say(" ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(heads, widths))))
    for row in rows:
        cells = []
        for (key, fmt), w in zip(cols, widths):
            cells.append(fmt.format(row[key]) if key in row else "-".rjust(w))
        _say(" ".join(cells))
    _say(f"paper (Qwen3-8B, 6 benchmarks): accuracy {PAPER['accuracy_parallel']}% vs {PAPER['accuracy_sequential']}% "
         f"sequential, token latency {PAPER['latency_parallel']:,.0f} vs {PAPER['latency_sequential']:,.0f}, "
         f"mean speed-up {PAPER['mean_speedup']}x, wall clock {PAPER['wall_clock_speedup']}x (4 GPUs, 50 MATH500)")


def write_table(path: Path, rows: list[dict]) -> None:
    import csv

    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "model", k))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


def run(cfg: PipelineConfig) -> list[dict]:
    from twlib.sft import eval_problems, load_config
    from twlib.tasks import format_ceiling, oracle_ceiling

    out = Path(cfg.out)
    if cfg.fresh and out.exists() and not cfg.from_assets:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base_config = load_config(Path(cfg.configs) / "tiny-base.yaml", list(cfg.overrides))
    problems = eval_problems(base_config)[: cfg.n_eval]
    _say(f"== data: {len(problems)} held-out {base_config.task} problems (seed {base_config.data_seed})")
    from twlib.sft import load_tokenizer

    _say(format_ceiling(oracle_ceiling(problems, tokenizer=load_tokenizer(base_config.model, base_config.item_tokens))))
    training: dict = {}
    if cfg.from_assets:
        assets = Path(cfg.assets)
        prefix = "tiny-long-" if cfg.long else "tiny-"
        models = {name: str(assets / f"{prefix}{name}") for name in ("parallel", "sequential")
                  if (assets / f"{prefix}{name}").is_dir()}
        if len(models) < 2:
            raise FileNotFoundError(f"shipped checkpoints {prefix}parallel and {prefix}sequential not found under {assets}")
        summary = assets / "train_summary.json"  # the demo recipe's training times
        if summary.is_file() and not cfg.long:
            training = json.loads(summary.read_text())
    else:
        for stage in STAGES:
            training[stage] = train_stage(stage, cfg)
        models = {name: str(out / name / "final") for name in ("parallel", "sequential", "causal", "base")}
        if cfg.pgrpo:
            training["pgrpo"] = train_pgrpo(cfg)
            models["pgrpo"] = str(out / "pgrpo" / "final")
    _say("== evaluation (greedy)")
    evals = evaluate_models(models, problems, cfg)
    rows = results_table(evals, training)
    write_table(out / "results.csv", rows)
    _say("== results")
    print_table(rows)
    _say(f"wrote {out / 'results.csv'}; total {(time.perf_counter() - started) / 60:.1f} min")
    return rows
