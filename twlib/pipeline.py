"""The tiny end-to-end pipeline (the main job): from a shipped base model to the paper's three claims.

    python -m twlib pipeline                 # the whole job (~30 min on 2 CPU cores), resumable
    python -m twlib pipeline --from-assets   # evaluate the shipped final models (about a minute)
    python -m twlib pipeline --seed 1 --out runs/tiny-seed1   # the same job with another training seed

Stages, mirroring the paper at toy scale (the paper starts from Qwen3-8B; we start from the shipped
sequential base `assets/checkpoints/tiny-base`, see its model card):
0. data: the held-out split (Parquet-free: generated from the stage configs' seed) and the oracle ceiling;
1. parallel: trie SFT of the base on a mix of parallel and sequential trajectories (`tiny-parallel.yaml`):
   like the paper's first SFT stage, the model then parallelises only some of the time;
2. sequential: the baseline, SFT of the same base on the same problems in sequential form;
3. causal: the leakage ablation, stage 1's text trained as one causal sequence (threads see siblings);
4. pgrpo: P-GRPO from the stage-1 model with the paper's reward (`tiny-pgrpo.yaml`);
5. evaluation: every model greedy on the held-out problems (stage 1 and the ablation also with the
   response forced to open a block: `parallel_forced`, `causal_forced`), then the final (P-GRPO) and the sequential
   model one problem at a time for wall clock (the paper's setting), and the claims table (`twlib.claims`).

Design choices
- Every stage writes into `out/<stage>/` and is skipped when its `final/` exists; SFT and P-GRPO resume
  from their last checkpoint, so an interrupted run continues where it stopped (`--fresh` starts over).
- The stage configs are the YAML files in `configs/`; the pipeline only points `model`, `out_dir` (and,
  with `--seed`, `seed`) into its own folder, so `python -m twlib sft --config ...` reproduces a stage.
- Every number printed is computed from the per-problem rows written beside it (`eval_*.csv`,
  `wall_*.csv`), and the verdicts in `claims.json` are recomputed from those rows by the tests.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SFT_STAGES = ("parallel", "sequential", "causal")
PARALLEL_MODELS = ("parallel", "pgrpo", "causal")  # decoded with the state machine
# Stage 1 and the leakage ablation write a block only now and then (greedy); decoded a second time with
# the response forced to open one, they show how well each solves the parallel form itself.
FORCED = {"parallel_forced": "parallel", "causal_forced": "causal"}
FORCED_PREFIX = "<think>\n<Parallel>\n"
ASSET_NAMES = {"base": "tiny-base", "parallel": "tiny-parallel", "pgrpo": "tiny-pgrpo",
               "sequential": "tiny-sequential", "causal": "tiny-causal"}
PAPER = {  # spec section 7 (Qwen3-8B, averages over six benchmarks; wall clock on 50 MATH500 problems)
    "accuracy_sequential": 72.2, "accuracy_parallel": 71.9, "latency_sequential": 15.1e3,
    "latency_parallel": 13.2e3, "mean_speedup": 1.22, "wall_clock_speedup": 1.14,
}


@dataclass
class PipelineConfig:
    out: str = "runs/tiny"
    configs: str = str(ROOT / "configs")
    base: str = ""  # the model the SFT stages start from ("": the shipped assets/checkpoints/tiny-base)
    assets: str = ""  # where --from-assets finds the shipped models ("": assets/checkpoints)
    n_eval: int = 500
    wall_problems: int = 100
    eval_batch: int = 32
    max_new_tokens: int = 512
    from_assets: bool = False
    fresh: bool = False
    progress: bool | None = None
    seed: int | None = None  # training seed of every stage (None: the configs' own)
    overrides: tuple[str, ...] = ()  # `key=value` applied to every SFT stage config (e.g. max_steps=2 in tests)
    pgrpo_overrides: tuple[str, ...] = ()  # `key=value` for the P-GRPO config

    def __post_init__(self):
        # paths relative to the working directory when they lie below it, so that logs, configs saved
        # with the checkpoints and result files name no machine-specific folder
        self.base = short_path(self.base or ROOT / "assets" / "checkpoints" / "tiny-base")
        self.assets = short_path(self.assets or ROOT / "assets" / "checkpoints")


def short_path(path) -> str:
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _say(text: str) -> None:
    print(text, flush=True)


def _common(cfg: PipelineConfig, out: Path, model: str) -> list[str]:
    overrides = [f"out_dir={out}", "resume=true", f"model={model}"]
    if cfg.progress is not None:
        overrides.append(f"progress={str(cfg.progress).lower()}")
    if cfg.seed is not None:
        overrides.append(f"seed={cfg.seed}")
    return overrides


def train_stage(stage: str, cfg: PipelineConfig) -> dict:
    """Run (or skip, if done) one SFT stage from the base; returns its training summary."""
    from twlib.train.sft import load_config, train

    out = Path(cfg.out) / stage
    summary_path = out / "train_summary.json"
    if (out / "final").is_dir() and summary_path.is_file():
        _say(f"[{stage}] done already ({out / 'final'}); delete it to retrain")
        return json.loads(summary_path.read_text())
    config = load_config(Path(cfg.configs) / f"tiny-{stage}.yaml", _common(cfg, out, cfg.base) + list(cfg.overrides))
    _say(f"[{stage}] training: mode={config.mode}, model={config.model}, out={out}")
    result = train(config, source=f"configs/tiny-{stage}.yaml")
    summary = {k: v for k, v in result.to_dict().items() if isinstance(v, (int, float, str))}
    summary_path.write_text(json.dumps(summary, indent=1))
    _say(f"[{stage}] {result.steps} steps, final loss {result.final_loss:.4f}, {result.train_s / 60:.1f} min, "
         f"{result.tokens_per_s:,.0f} tokens/s")
    return summary


def train_pgrpo(cfg: PipelineConfig) -> dict:
    """P-GRPO on the stage-1 model (configs/tiny-pgrpo.yaml), skipped when done; returns its summary."""
    from twlib.train.pgrpo import load_pgrpo_config, train

    out = Path(cfg.out) / "pgrpo"
    summary_path = out / "train_summary.json"
    if (out / "final").is_dir() and summary_path.is_file():
        _say(f"[pgrpo] done already ({out / 'final'}); delete it to retrain")
        return json.loads(summary_path.read_text())
    overrides = _common(cfg, out, str(Path(cfg.out) / "parallel" / "final")) + list(cfg.pgrpo_overrides)
    config = load_pgrpo_config(Path(cfg.configs) / "tiny-pgrpo.yaml", overrides)
    _say(f"[pgrpo] training: {config.steps} steps of {config.prompts_per_step} x {config.rollouts_per_prompt} "
         f"rollouts, lr {config.lr:g}, out={out}")
    result = train(config, source="configs/tiny-pgrpo.yaml")
    summary = {"steps": result.steps, "train_s": result.wall_s, "first_reward": result.first.get("reward"),
               "last_reward": result.last.get("reward")}
    summary_path.write_text(json.dumps(summary, indent=1))
    _say(f"[pgrpo] {result.steps} steps, {result.wall_s / 60:.1f} min")
    return summary


def held_out(cfg: PipelineConfig):
    """The held-out problems of the stage configs, and the oracle ceiling of their fully parallel forms."""
    from twlib.train.sft import eval_problems, load_config
    from twlib.eval import oracle_ceiling

    config = load_config(Path(cfg.configs) / "tiny-parallel.yaml", list(cfg.overrides))
    problems = eval_problems(config)[: cfg.n_eval]
    # the oracle parallelises every eligible problem, whatever share the SFT data writes in parallel form
    oracle = dataclasses.replace(config, task_options={**config.task_options, "p_parallel": 1.0})
    ceiling = oracle_ceiling(eval_problems(oracle)[: cfg.n_eval])
    return config, problems, ceiling


def evaluate_models(models: dict[str, str], problems, cfg: PipelineConfig, wall_pair=("pgrpo", "sequential")) -> dict:
    """Greedy decoding of every model on `problems`; the `wall_pair` also one problem at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, sequential_decoder
    from twlib.eval import evaluate, summarize, write_rows

    out = Path(cfg.out)
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()  # bars on a terminal
    results, wall = {}, {}
    for name, path in models.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        engine = HFEngine(model, tokenizer)
        decode_config = DecodeConfig(max_new_tokens=cfg.max_new_tokens,
                                     response_prefix=FORCED_PREFIX if name in FORCED else "")
        decoder = (ParallelDecoder(engine, tokenizer, decode_config) if name in PARALLEL_MODELS or name in FORCED
                   else sequential_decoder(engine, tokenizer, decode_config))
        start = time.perf_counter()
        rows = evaluate(decoder, problems, tokenizer, batch_size=cfg.eval_batch, progress=show)
        s = summarize(rows)
        _say(f"[eval] {name:<10} accuracy {100 * s['accuracy']:5.1f}%  format {100 * s['format_valid']:5.1f}%  "
             f"parallel {100 * s['parallel_rate']:5.1f}%  latency {s['mean_token_latency']:6.1f}  "
             f"({time.perf_counter() - start:.0f} s)")
        write_rows(out / f"eval_{name}.csv", rows)
        results[name] = rows
        if name in wall_pair and cfg.wall_problems:
            subset = problems[: cfg.wall_problems]
            evaluate(decoder, subset[:3], tokenizer, progress=False)  # warm-up
            timed = evaluate(decoder, subset, tokenizer, batch_size=1, progress=show)
            write_rows(out / f"wall_{name}.csv", timed)
            wall[name] = timed
    return {"rows": results, "wall": wall}


def results_table(evals: dict, training: dict) -> list[dict]:
    from twlib.claims import multi_group_parallel_rate
    from twlib.eval import compare, summarize

    rows, seq = [], evals["rows"].get("sequential")
    for name, result in evals["rows"].items():
        s = summarize(result)
        row = {"model": name, "accuracy": 100 * s["accuracy"], "format_valid": 100 * s["format_valid"],
               "parallel_rate": 100 * s["parallel_rate"], "multi_group_parallel": multi_group_parallel_rate(result),
               "mean_eta": s["mean_eta"], "token_latency": s["mean_token_latency"],
               "total_tokens": s["mean_total_tokens"]}
        if seq is not None:
            c = compare(result, seq)
            row.update({"speedup_mean": c["speedup"]["mean"], "speedup_median": c["speedup"]["median"],
                        "speedup_max": c["speedup"]["max"], "speedup_correct_mean": c["speedup_correct"]["mean"]})
        if name in evals["wall"]:
            row["wall_s_per_problem"] = statistics.fmean(r.seconds for r in evals["wall"][name])
        if name in training and "train_s" in training[name]:
            row["train_min"] = training[name]["train_s"] / 60
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    cols = [("model", "{:<15}"), ("accuracy", "{:>6.1f}%"), ("format_valid", "{:>6.1f}%"),
            ("multi_group_parallel", "{:>6.1f}%"), ("token_latency", "{:>8.1f}"), ("total_tokens", "{:>7.1f}"),
            ("speedup_mean", "{:>6.2f}x"), ("speedup_max", "{:>6.2f}x"), ("wall_s_per_problem", "{:>7.3f}"),
            ("train_min", "{:>5.1f}")]
    heads = ["model", "acc", "format", "par k>1", "latency", "total", "speed", "max", "s/prob", "min"]
    widths = [15, 7, 7, 7, 8, 7, 7, 7, 7, 5]
    _say(" ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(heads, widths))))
    for row in rows:
        _say(" ".join(fmt.format(row[key]) if key in row else "-".rjust(w) for (key, fmt), w in zip(cols, widths)))


def write_table(path: Path, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "model", k))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


def claims_from(evals: dict, ceiling: float) -> list:
    """The three verdicts from the evaluation rows (the final model is P-GRPO's when it was run)."""
    from twlib.claims import judge

    rows, wall = evals["rows"], evals["wall"]
    final = "pgrpo" if "pgrpo" in rows else "parallel"
    pair = (wall[final], wall["sequential"]) if final in wall and "sequential" in wall else None
    return judge(rows[final], rows["sequential"], ceiling, sft=rows["parallel"] if final == "pgrpo" else None,
                 wall=pair)


def write_claims(path: Path, claims: list, ceiling: float, command: str) -> None:
    from twlib.claims import ClaimRules

    path.write_text(json.dumps({
        "command": command, "oracle_ceiling": ceiling, "rules": ClaimRules().text(),
        "claims": [{"name": c.name, "passed": c.passed, "verdict": c.verdict, "measured": c.measured,
                    "why": c.why} for c in claims]}, indent=1))


class Tee:
    """Print to the console and append to a log file (the run's `pipeline.log`)."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, path.open("a")

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def run(cfg: PipelineConfig, command: str = "python -m twlib pipeline") -> list[dict]:
    """The whole job (see the module docstring); its console output is also appended to `out/pipeline.log`."""
    out = Path(cfg.out)
    if cfg.fresh and out.exists() and not cfg.from_assets:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tee = Tee(sys.stdout, out / "pipeline.log")
    try:
        with contextlib.redirect_stdout(tee):
            return _run(cfg, command, out)
    finally:
        tee.file.close()


def _run(cfg: PipelineConfig, command: str, out: Path) -> list[dict]:
    from twlib.claims import claim_table
    from twlib.eval import format_ceiling

    started = time.perf_counter()
    config, problems, ceiling = held_out(cfg)
    _say(f"== data: {len(problems)} held-out {config.task} problems (seed {config.data_seed}); the oracle's "
         f"fully parallel trajectories:")
    _say(format_ceiling(ceiling))
    training: dict = {}
    assets = Path(cfg.assets)
    if cfg.from_assets:
        models = {name: str(assets / folder) for name, folder in ASSET_NAMES.items()}
        models.update({forced: models[name] for forced, name in FORCED.items()})
        missing = [m for m in models.values() if not Path(m).is_dir()]
        if missing:
            raise FileNotFoundError(f"shipped checkpoints not found: {', '.join(missing)}")
    else:
        if not Path(cfg.base).is_dir():
            raise FileNotFoundError(f"base model {cfg.base} not found: it ships in assets/checkpoints/tiny-base "
                                    "(or train it: bash scripts/train_base.sh)")
        _say(f"== base: {cfg.base} (a shipped sequential model, as the paper starts from Qwen3-8B)")
        for stage in SFT_STAGES:
            training[stage] = train_stage(stage, cfg)
        training["pgrpo"] = train_pgrpo(cfg)
        models = {"base": cfg.base, **{name: str(out / name / "final") for name in ("parallel", "pgrpo",
                                                                                       "sequential", "causal")}}
        models.update({forced: models[name] for forced, name in FORCED.items()})
    _say("== evaluation (greedy)")
    evals = evaluate_models(models, problems, cfg)
    rows = results_table(evals, training)
    write_table(out / "results.csv", rows)
    claims = claims_from(evals, ceiling["speedup"])
    write_claims(out / "claims.json", claims, ceiling["speedup"], command)
    _say("== results")
    print_table(rows)
    _say("== the paper's claims, judged from the rows above")
    _say(claim_table(claims, paper={"accuracy": f"{PAPER['accuracy_parallel']}% vs {PAPER['accuracy_sequential']}%",
                                    "mean speed-up": f"{PAPER['mean_speedup']}x",
                                    "wall clock": f"{PAPER['wall_clock_speedup']}x (4 GPUs, 50 MATH500)",
                                    "RL": "AIME24 74.0 -> 79.9 (self-training -> +P-GRPO)"}))
    _say(f"wrote {out / 'results.csv'} and {out / 'claims.json'}; total {(time.perf_counter() - started) / 60:.1f} min")
    return rows
