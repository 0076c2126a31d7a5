"""Stage 2 of data generation, self-training, and the paper's whole arc on the tiny task.

    python -m twlib.infra.rewrite arc --out runs/arc --model assets/checkpoints/tiny-base

Self-training: the SFT model decodes a prompt pool with the 5-phase state machine and keeps the
trajectories that are format-valid and answer-correct; they become the second SFT's data. `run_arc`
plays the arc (first SFT, self-training, second SFT) and scores each SFT on held-out problems.

Deviations from the paper
- Self-training decodes greedily by default (`temperature` is a knob); the paper does not say.
- In `run_arc` the rewritten traces are stood in for by the task generator's parallel trajectories (the
  tiny task has no strong model to rewrite for it); stage 1 itself runs on groupsum traces in the tests
  and notebook 04 with a scripted model (`twlib.infra.rewrite.GroupSumRewriter`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from twlib.datagen import trajectory_stats
from twlib.rewards import is_correct
from twlib.tasks import Problem

__all__ = ["SelfTrainConfig", "SelfTrainResult", "keep_reason", "self_train", "ArcConfig", "run_arc", "format_arc"]


# ----------------------------------------------------------------------------------------------------
# Stage 2: self-training


@dataclass(frozen=True)
class SelfTrainConfig:
    """How the SFT model decodes the prompt pool and what is kept.

    Greedy by default (temperature 0); with temperature > 0 and `samples_per_prompt` > 1 each prompt gets
    several sampled trajectories and at most `keep_per_prompt` distinct kept ones.
    """

    max_new_tokens: int = 512
    max_thread_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    samples_per_prompt: int = 1
    keep_per_prompt: int = 1
    batch_size: int = 16
    require_correct: bool = True
    require_parallel: bool = False
    progress: bool = False


@dataclass
class SelfTrainResult:
    problems: list[Problem]  # kept: `.parallel` is the decoded trajectory
    rows: list[dict]  # one per decoded trajectory: id, kept, reason, valid, correct, parallel, total, longest
    counts: dict
    stats: dict  # trajectory_stats of the kept trajectories
    decoded_stats: dict  # ... of every decoded trajectory
    seconds: float


def keep_reason(problem: Problem, result, config: SelfTrainConfig = SelfTrainConfig()) -> str | None:
    """Why a decoded trajectory (a DecodeResult) is not kept, or None: format first (it must parse, end
    with EOS and carry no decoder flag), then the answer (the problem's grader, `twlib.rewards.is_correct`:
    math-verify for `task: math` prompt pools), then (optionally) parallelism."""
    if not result.valid:
        return "format: does not parse"
    if result.flags or not result.finished:
        return "format: " + (", ".join(result.flags) or "did not end with EOS")
    if config.require_correct and not is_correct(result.text, problem.answer, problem.task):
        return "answer: wrong"
    if config.require_parallel and result.stats.blocks == 0:
        return "sequential: no block"
    return None


def self_train(model, tokenizer, problems: Sequence[Problem], config: SelfTrainConfig = SelfTrainConfig(),
               engine=None) -> SelfTrainResult:
    """Decode `problems` with the parallel state machine; keep format-valid (and answer-correct) trajectories.

    `engine` defaults to an `HFEngine` over `model`; any `twlib.decoding.Engine` works (a server, a script).
    """
    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, SamplingParams

    began = time.perf_counter()
    engine = engine if engine is not None else HFEngine(model, tokenizer)
    sampling = SamplingParams(config.temperature, config.top_p, config.seed)
    decoder = ParallelDecoder(engine, tokenizer, DecodeConfig(max_new_tokens=config.max_new_tokens,
                                                              max_thread_tokens=config.max_thread_tokens,
                                                              sampling=sampling))
    k = config.samples_per_prompt
    jobs = [p for p in problems for _ in range(k)]
    bar = None
    if config.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc="self-train decode")
    results = decoder.decode([tokenizer.encode(p.prompt, add_special_tokens=False) for p in jobs],
                             batch_size=config.batch_size, progress=bar.update if bar else None)
    if bar:
        bar.close()
    kept, rows, kept_texts = [], [], {}
    for p, r in zip(jobs, results):
        reason = keep_reason(p, r, config)
        texts = kept_texts.setdefault(p.id, [])
        if reason is None and (r.text in texts or len(texts) >= config.keep_per_prompt):
            reason = "duplicate" if r.text in texts else "enough kept for this prompt"
        if reason is None:
            texts.append(r.text)
            meta = {**p.meta, "source": "self-train", "sample": len(texts) - 1}
            kept.append(dataclasses.replace(p, parallel=r.text, meta=meta))
        rows.append({"id": p.id, "kept": reason is None, "reason": reason or "", "valid": r.valid,
                     "correct": is_correct(r.text, p.answer, p.task), "parallel": r.stats.blocks > 0,
                     "total": r.stats.total, "longest": r.stats.longest, "text": r.text})
    n = max(len(rows), 1)
    counts = {"prompts": len(problems), "decoded": len(rows), "kept": len(kept),
              "format_valid": sum(r["valid"] for r in rows) / n, "accuracy": sum(r["correct"] for r in rows) / n,
              "parallel_rate": sum(r["parallel"] for r in rows) / n, "yield": len(kept) / n}
    return SelfTrainResult(kept, rows, counts, trajectory_stats([p.parallel for p in kept], tokenizer),
                           trajectory_stats([r["text"] for r in rows], tokenizer), time.perf_counter() - began)


# ----------------------------------------------------------------------------------------------------
# The paper's arc on the tiny task: SFT on a seed set, self-training, SFT on the kept trajectories

PAPER_FORMAT = {"sft1": 56.4, "sft2": 77.0}  # format correctness (%), spec section 7


@dataclass
class ArcConfig:
    """The arc's sizes and steps. Defaults are the full-size run (32 min on 2 CPU cores; assets/arc/); tests shrink them.

    model        the start model: a sequential base (the shipped `assets/checkpoints/tiny-base`), a preset name
                 (`tiny`: from scratch) or any parallel checkpoint
    n_seed       first SFT's data: the task generator's parallel trajectories, standing in for the ~1k
                 rewritten traces (paper: 959)
    n_pool       self-training prompts (paper: 53k) ; n_eval: held-out problems, scored after each SFT
    sft1, sft2   SFTConfig fields for the two SFTs (paper: 8 epochs on the seed set, then 1 epoch on the
                 kept trajectories, continuing from the first SFT's model); `mix_seed` adds the seed set
                 to the second SFT's data
    """

    out: str = "runs/arc"
    model: str = "assets/checkpoints/tiny-base"
    task: str = "groupsum"
    task_options: dict = field(default_factory=dict)
    data_seed: int = 0
    n_seed: int = 1000
    n_pool: int = 20000
    n_eval: int = 500
    sft1: dict = field(default_factory=lambda: {"epochs": 8, "lr": 1e-3, "tokens_per_batch": 1024,
                                                "rows_per_micro_batch": 2, "threads": 1, "checkpoint_every": 100})
    sft2: dict = field(default_factory=lambda: {"epochs": 1, "lr": 5e-4, "tokens_per_batch": 1024,
                                                "rows_per_micro_batch": 2, "threads": 1, "checkpoint_every": 100})
    self_train: SelfTrainConfig = field(default_factory=lambda: SelfTrainConfig(batch_size=32))
    mix_seed: bool = False
    eval_max_new_tokens: int = 512
    eval_batch: int = 32
    quiet: bool = False


def _say(config: ArcConfig, text: str) -> None:
    if not config.quiet:
        print(text, flush=True)


def _arc_data(config: ArcConfig, out: Path) -> dict[str, list[Problem]]:
    from twlib.train.sft import get_task_config
    from twlib.tasks import make_splits
    from twlib.infra.problems import load_parquet, save_parquet

    names = ("seed", "pool", "eval")
    paths = {n: out / "data" / f"{n}.parquet" for n in names}
    if all(p.is_file() for p in paths.values()):
        return {n: load_parquet(p) for n, p in paths.items()}
    task_config = get_task_config(config.task, config.task_options)
    train, evals = make_splits(config.task, config.n_seed + config.n_pool, config.n_eval, config.data_seed, task_config)
    sets = {"seed": train[:config.n_seed], "pool": train[config.n_seed:], "eval": evals}
    paths["seed"].parent.mkdir(parents=True, exist_ok=True)
    for n in names:
        save_parquet(sets[n], paths[n])
    return sets


def _arc_sft(config: ArcConfig, name: str, model: str, data: Path, overrides: dict) -> Path:
    from twlib.train.sft import SFTConfig, train

    out = Path(config.out) / name
    if (out / "final" / "config.json").is_file():
        _say(config, f"[{name}] done already ({out / 'final'})")
        return out / "final"
    fields_ = dict(model=model, data=str(data), n_train=None, mode="parallel", out_dir=str(out), resume=True,
                   progress=False if config.quiet else None)
    fields_.update(overrides)
    _say(config, f"[{name}] trie SFT from {model} on {data}")
    train(SFTConfig(**fields_), quiet=config.quiet, source=f"run_arc {name}")
    return out / "final"


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def _arc_eval(config: ArcConfig, name: str, checkpoint: Path, problems: Sequence[Problem]) -> dict:
    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder
    from twlib.eval import evaluate, summarize

    path = Path(config.out) / f"eval_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tok = _load(checkpoint)
    decoder = ParallelDecoder(HFEngine(model, tok), tok, DecodeConfig(max_new_tokens=config.eval_max_new_tokens))
    rows = evaluate(decoder, problems, tok, batch_size=config.eval_batch, progress=False)
    s = summarize(rows)
    result = {"format_correct": s["format_valid"], "accuracy": s["accuracy"], "parallel_rate": s["parallel_rate"],
              "mean_longest": s["mean_token_latency"], "mean_total": s["mean_total_tokens"], "problems": len(rows)}
    path.write_text(json.dumps(result, indent=1))
    _say(config, f"[eval {name}] format {100 * result['format_correct']:.1f}%, accuracy "
                 f"{100 * result['accuracy']:.1f}%, parallel {100 * result['parallel_rate']:.1f}%")
    return result


def _arc_self_train(config: ArcConfig, checkpoint: Path, pool: Sequence[Problem]) -> dict:
    from twlib.infra.problems import save_parquet

    out = Path(config.out) / "self_train"
    if (out / "summary.json").is_file() and (out / "kept.parquet").is_file():
        return json.loads((out / "summary.json").read_text())
    model, tok = _load(checkpoint)
    _say(config, f"[self-train] decoding {len(pool)} prompts x {config.self_train.samples_per_prompt}")
    result = self_train(model, tok, pool, config.self_train)
    out.mkdir(parents=True, exist_ok=True)
    save_parquet(result.problems, out / "kept.parquet")
    summary = {"counts": result.counts, "stats": result.stats, "decoded_stats": result.decoded_stats,
               "seconds": result.seconds}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _say(config, f"[self-train] kept {result.counts['kept']} of {result.counts['decoded']} "
                 f"(format {100 * result.counts['format_valid']:.1f}%, accuracy {100 * result.counts['accuracy']:.1f}%)")
    return summary


def run_arc(config: ArcConfig = ArcConfig()) -> dict:
    """First SFT on the seed set, self-training on the pool, second SFT on the kept trajectories; format
    correctness and accuracy on held-out problems after each SFT. Every stage is skipped when its output
    exists, so an interrupted arc continues (SFT resumes from its checkpoint). Writes `out/arc.json`."""
    from twlib.infra.problems import load_parquet, save_parquet

    out = Path(config.out)
    sets = _arc_data(config, out)
    seed_stats = trajectory_stats([p.parallel for p in sets["seed"]])
    sft1 = _arc_sft(config, "sft1", config.model, out / "data" / "seed.parquet", config.sft1)
    report = {"seed": {"problems": len(sets["seed"]), "stats": seed_stats},
              "sft1": _arc_eval(config, "sft1", sft1, sets["eval"])}
    report["self_train"] = _arc_self_train(config, sft1, sets["pool"])
    kept = load_parquet(out / "self_train" / "kept.parquet")
    data = out / "self_train" / "kept.parquet"
    if config.mix_seed:
        data = out / "self_train" / "kept_and_seed.parquet"
        save_parquet(kept + list(sets["seed"]), data)
    if kept:
        sft2 = _arc_sft(config, "sft2", str(sft1), data, config.sft2)
        report["sft2"] = _arc_eval(config, "sft2", sft2, sets["eval"])
    else:
        report["sft2"] = {"skipped": "self-training kept no trajectory"}
    report["keep"] = "format+correct" if config.self_train.require_correct else "format"
    report["config"] = {"model": config.model, "n_seed": config.n_seed, "n_pool": config.n_pool,
                        "n_eval": config.n_eval, "sft1_epochs": config.sft1.get("epochs"),
                        "sft2_epochs": config.sft2.get("epochs"), "mix_seed": config.mix_seed}
    report["paper_format_correct"] = PAPER_FORMAT
    (out / "arc.json").write_text(json.dumps(report, indent=1))
    _say(config, format_arc(report))
    return report


def format_arc(report: dict) -> str:
    lines = [f"{'stage':12s} {'format':>8s} {'accuracy':>9s} {'parallel':>9s} {'paper format':>13s}"]
    for stage in ("sft1", "sft2"):
        r = report.get(stage, {})
        if "format_correct" in r:
            lines.append(f"{stage:12s} {100 * r['format_correct']:7.1f}% {100 * r['accuracy']:8.1f}% "
                         f"{100 * r['parallel_rate']:8.1f}% {PAPER_FORMAT[stage]:12.1f}%")
        else:
            lines.append(f"{stage:12s} {r.get('skipped', 'not run')}")
    counts = report.get("self_train", {}).get("counts", {})
    if counts:
        lines.append(f"self-training kept {counts['kept']} of {counts['decoded']} decoded trajectories "
                     f"({report.get('keep', 'format+correct')}; decoded: format {100 * counts['format_valid']:.1f}%, "
                     f"accuracy {100 * counts['accuracy']:.1f}%, parallel {100 * counts['parallel_rate']:.1f}%)")
    return "\n".join(lines)
