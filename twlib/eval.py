"""Evaluation: accuracy, format, critical paths, speed-ups and wall clock, with the paper's figures.

    python -m twlib.eval --model runs/qwen3-8b-pgrpo/final --data data/aime24.parquet --parallel \
        --max-new-tokens 40960 --url http://127.0.0.1:8000 --out runs/qwen3-8b-pgrpo/eval_parallel_aime24.csv

The command line decodes a Parquet of problems (`twlib.infra.problems.save_parquet`: e.g. a benchmark written by
`python -m twlib prompts --jsonl ... --chat-template MODEL`, or `python -m twlib data --chat-template`'s eval
split) with the state machine (`--parallel`) or the sequential decoder, in process (HFEngine) or through a
completions server (`--url`, e.g. `vllm serve`), grades each response with its problem's grader
(`twlib.rewards.is_correct`: math-verify for `task: math`) and writes the per-problem rows. (`python -m twlib
eval` evaluates the generated split of a task config instead.)

Design choices
- Per-problem rows first, summaries second: every number a notebook prints is an aggregate of a table
  that is saved as CSV next to it, so it can be checked and re-plotted.
- Token latency = the critical path L of the response (response tokens only, EOS excluded; spec
  section 3). Speed-up of a parallel model over a sequential one = the mean over problems of
  (sequential model's tokens) / (parallel model's L), the paper's definition (a mean of ratios, not a
  ratio of means). Reported over all problems and over the problems the parallel model got right.
- Wall-clock speed-up = total sequential seconds / total parallel seconds, one problem at a time (batch 1,
  the paper's setting), and its ratio to the token-latency speed-up (1.0 is the limit: the state machine
  cannot beat its critical path).
- `oracle_ceiling`: the same statistics on a task's perfect trajectories (the generator's own sequential
  and parallel responses), the speed-up a model that imitates them exactly would reach (claim C2's bar).
"""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from twlib.tasks import TASKS, Problem, extract_answer


@dataclass
class ProblemResult:
    id: str
    k: int | None
    answer: str
    predicted: str | None
    correct: bool
    valid: bool
    parallel: bool  # the response has at least one block
    finished: bool
    flags: str
    total: int
    longest: int
    eta: float
    threads: int
    blocks: int
    seconds: float
    text: str


def evaluate(decoder, problems, tokenizer, batch_size: int = 1, progress: bool = True) -> list[ProblemResult]:
    """Decode every problem's prompt with `decoder` (a ParallelDecoder or sequential decoder) and grade it with
    its task's grader (`twlib.rewards.is_correct`: exact match for the synthetic tasks, math-verify for math)."""
    from tqdm.auto import tqdm

    from twlib.rewards import is_correct

    prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
    bar = tqdm(total=len(problems), desc="decode", disable=not progress, leave=False)
    results = decoder.decode(prompts, batch_size=batch_size, progress=bar.update)
    bar.close()
    rows = []
    for p, r in zip(problems, results):
        rows.append(ProblemResult(
            id=p.id, k=p.meta.get("k"), answer=p.answer, predicted=extract_answer(r.text),
            correct=is_correct(r.text, p.answer, p.task), valid=r.valid, parallel=r.stats.blocks > 0,
            finished=r.finished, flags=";".join(r.flags), total=r.stats.total, longest=r.stats.longest,
            eta=r.stats.eta, threads=r.stats.threads, blocks=r.stats.blocks, seconds=r.seconds, text=r.text))
    return rows


def summarize(rows: Sequence[ProblemResult]) -> dict:
    n = len(rows)
    return {
        "problems": n,
        "accuracy": sum(r.correct for r in rows) / n,
        "format_valid": sum(r.valid for r in rows) / n,
        "parallel_rate": sum(r.parallel for r in rows) / n,
        "mean_eta": statistics.fmean(r.eta for r in rows),
        "mean_total_tokens": statistics.fmean(r.total for r in rows),
        "mean_token_latency": statistics.fmean(r.longest for r in rows),
        "seconds": sum(r.seconds for r in rows),
        "flagged": sum(bool(r.flags) for r in rows) / n,
    }


def accuracy_by_k(rows: Sequence[ProblemResult]) -> dict:
    """{k: (correct, problems)} per number of groups k (the task's `meta["k"]`), in order of k."""
    out: dict = {}
    for r in rows:
        right, total = out.get(r.k, (0, 0))
        out[r.k] = (right + r.correct, total + 1)
    return dict(sorted(out.items(), key=lambda item: (item[0] is None, item[0] or 0)))


def speedups(parallel: Sequence[ProblemResult], sequential: Sequence[ProblemResult]) -> list[float]:
    """Per problem: sequential model's tokens / parallel model's critical path (same problems, same order)."""
    if [r.id for r in parallel] != [r.id for r in sequential]:
        raise ValueError("parallel and sequential results must cover the same problems in the same order")
    return [s.total / max(p.longest, 1) for p, s in zip(parallel, sequential)]


def compare(parallel: Sequence[ProblemResult], sequential: Sequence[ProblemResult]) -> dict:
    """The paper's comparison table: speed-up distribution (all / correct-only) and wall clock."""
    ups = speedups(parallel, sequential)
    correct = [u for u, p in zip(ups, parallel) if p.correct]

    def dist(values):
        if not values:
            return {"mean": float("nan"), "median": float("nan"), "max": float("nan")}
        return {"mean": statistics.fmean(values), "median": statistics.median(values), "max": max(values)}

    token = dist(ups)
    wall = sum(s.seconds for s in sequential) / max(sum(p.seconds for p in parallel), 1e-9)
    return {
        "speedup": token, "speedup_correct": dist(correct),
        "wall_clock_speedup": wall, "wall_over_token": wall / token["mean"],
        "accuracy_parallel": sum(p.correct for p in parallel) / len(parallel),
        "accuracy_sequential": sum(s.correct for s in sequential) / len(sequential),
    }


def write_rows(path, rows: Sequence[ProblemResult]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def read_rows(path) -> list[ProblemResult]:
    types = ProblemResult.__annotations__
    out = []
    with Path(path).open() as f:
        for row in csv.DictReader(f):
            values = {}
            for key, value in row.items():
                kind = types[key]
                if "bool" in kind:
                    values[key] = value == "True"
                elif kind.startswith("int"):
                    values[key] = int(value) if value not in ("", "None") else None
                elif kind == "float":
                    values[key] = float(value)
                elif "None" in kind:
                    values[key] = None if value == "" else value
                else:
                    values[key] = value
            out.append(ProblemResult(**values))
    return out


# ----------------------------------------------------------------------------------------------------
# Figures (plotly go.Figure: static in executed notebooks, interactive in JupyterLab)


def speedup_histogram(parallel, sequential, title: str = "Speed-up per problem (sequential tokens / critical path)"):
    import plotly.graph_objects as go

    ups = speedups(parallel, sequential)
    fig = go.Figure()
    fig.add_histogram(x=ups, name="all problems", opacity=0.6, xbins={"size": 0.1})
    fig.add_histogram(x=[u for u, p in zip(ups, parallel) if p.correct], name="parallel model correct",
                      opacity=0.6, xbins={"size": 0.1})
    mean = statistics.fmean(ups)
    fig.add_vline(x=mean, line_dash="dash", annotation_text=f"mean {mean:.2f}x")
    fig.add_vline(x=1.0, line_color="gray")
    fig.update_layout(barmode="overlay", title=title, xaxis_title="speed-up", yaxis_title="problems",
                      height=360)
    return fig


def pareto_figure(points: dict[str, tuple[float, float]], paper: dict[str, tuple[float, float]] | None = None):
    """Accuracy (%) vs mean token latency for named models; optional paper points on a second panel."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cols = 2 if paper else 1
    fig = make_subplots(rows=1, cols=cols, subplot_titles=["this reproduction (tiny task)", "paper (AIME24)"][:cols])
    for panel, data in enumerate([points] + ([paper] if paper else []), 1):
        for name, (latency, accuracy) in data.items():
            fig.add_scatter(x=[latency], y=[accuracy], mode="markers+text", text=[name], textposition="top center",
                            marker={"size": 12}, name=name, showlegend=False, row=1, col=panel)
        fig.update_xaxes(title_text="mean token latency (critical path)", row=1, col=panel)
        fig.update_yaxes(title_text="accuracy (%)", row=1, col=panel)
    fig.update_layout(title="Accuracy vs token latency (up and to the left is better)", height=380)
    return fig


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start



# ----------------------------------------------------------------------------------------------------
# The oracle ceiling: critical-path statistics of a task's perfect trajectories

def oracle_ceiling(problems: Sequence[Problem], by: str | None = None, tokenizer=None) -> dict:
    """Critical-path statistics of the perfect trajectories (response tokens only; tags = 1 token).

    - self_parallelism: mean over problems of total / longest of the parallel response.
    - speedup: mean over problems of (sequential response tokens) / (parallel response longest path).
    - per_size: the same per value of `meta[by]` (default: `k` for groupsum, `n_numbers` for multiply),
      with counts, the fraction parallelised and mean token lengths.
    - lengths: mean/max tokens of sequential and parallel responses, and max prompt + response.
    Counts characters (plus one per tag), which is the tiny character-level tokenizer's count, or the
    tokens of `tokenizer` when given (item tokens, a real BPE tokenizer).
    """
    from twlib.format import path_stats as _path_stats

    def path_stats(text):
        return _path_stats(text, tokenizer) if tokenizer is not None else _path_stats(text)

    rows = []
    for p in problems:
        stats = path_stats(p.parallel)
        total, longest = stats.total, stats.longest
        seq = path_stats(p.sequential).total
        key = by or (TASKS[p.task].ceiling_key if p.task in TASKS else None)
        rows.append({
            "size": p.meta.get(key) if key else None,
            "parallel": p.parallel != p.sequential,
            "seq": seq, "total": total, "longest": longest,
            "prompt": path_stats(p.prompt).total,
            "self_par": total / longest if longest else 1.0,
            "speedup": seq / longest if longest else 1.0,
        })

    def summary(rs: list[dict]) -> dict:
        if not rs:
            return {"n": 0}
        return {
            "n": len(rs),
            "frac_parallel": sum(r["parallel"] for r in rs) / len(rs),
            "self_parallelism": statistics.fmean(r["self_par"] for r in rs),
            "speedup": statistics.fmean(r["speedup"] for r in rs),
            "mean_seq_tokens": statistics.fmean(r["seq"] for r in rs),
            "mean_longest": statistics.fmean(r["longest"] for r in rs),
            "mean_parallel_total": statistics.fmean(r["total"] for r in rs),
        }

    out = summary(rows)
    sizes = sorted({r["size"] for r in rows}, key=lambda s: (s is None, s))
    out["per_size"] = {s: summary([r for r in rows if r["size"] == s]) for s in sizes}
    if rows:
        out["lengths"] = {
            "mean_seq": statistics.fmean(r["seq"] for r in rows),
            "max_seq": max(r["seq"] for r in rows),
            "mean_parallel": statistics.fmean(r["total"] for r in rows),
            "max_parallel": max(r["total"] for r in rows),
            "mean_prompt": statistics.fmean(r["prompt"] for r in rows),
            "max_prompt_plus_response": max(r["prompt"] + max(r["seq"], r["total"]) for r in rows),
        }
    return out


def format_ceiling(c: dict, by: str = "k") -> str:
    """A small text table of `oracle_ceiling`'s result."""
    lines = [f"{by:>6} {'n':>6} {'par%':>6} {'self-par':>9} {'speed-up':>9} {'seq tok':>8} {'longest':>8}"]
    for s, r in list(c["per_size"].items()) + [("all", c)]:
        if not r.get("n"):
            continue
        lines.append(f"{str(s):>6} {r['n']:>6} {100 * r['frac_parallel']:>5.0f}% {r['self_parallelism']:>9.3f} "
                     f"{r['speedup']:>9.3f} {r['mean_seq_tokens']:>8.1f} {r['mean_longest']:>8.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line: a Parquet of problems, decoded in process or through a server


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="a save_pretrained folder (e.g. runs/x/final) or a hub id in "
                                                       "the Hugging Face cache; its tokenizer encodes the prompts")
    parser.add_argument("--data", required=True, help="Parquet of problems (twlib.infra.problems.save_parquet): prompt, answer, "
                                                      "task (the grader)")
    parser.add_argument("--parallel", action="store_true", help="decode with the 5-phase state machine")
    parser.add_argument("--n", type=int, default=None, help="the first N problems (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="problems decoded together")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="budget over every call of a response")
    parser.add_argument("--max-thread-tokens", type=int, default=None, help="cap per thread (default: the budget)")
    parser.add_argument("--device", default="auto", help="in-process decoding: auto (cuda if available) | cpu | cuda")
    parser.add_argument("--url", default=None, help="decode through a completions server (vllm serve, SGLang, ...)")
    parser.add_argument("--server-kind", default="vllm", choices=["vllm", "sglang", "llama-server", "llama-cpp-python"])
    parser.add_argument("--out", default=None, help="CSV of the per-problem rows (write_rows)")
    return parser


def main(argv=None) -> int:
    """`python -m twlib.eval`: decode and grade a Parquet of problems; print the summary. Errors: exit code 2."""
    import argparse
    import sys

    args = add_arguments(argparse.ArgumentParser(prog="python -m twlib.eval",
                                                 description="decode and grade a Parquet of problems")).parse_args(argv)
    try:
        rows = run(args)
    except (OSError, ValueError) as e:  # missing model / data, a tokenizer without the tags, bad sizes
        print(f"twlib.eval: {e}", file=sys.stderr)
        return 2
    s = summarize(rows)
    print(f"{args.model} on {args.data} ({'parallel' if args.parallel else 'sequential'}): {s['problems']} problems, "
          f"accuracy {100 * s['accuracy']:.1f}%, format valid {100 * s['format_valid']:.1f}%, parallel "
          f"{100 * s['parallel_rate']:.1f}%, flagged {100 * s['flagged']:.1f}%, token latency "
          f"{s['mean_token_latency']:.1f}, total tokens {s['mean_total_tokens']:.1f}, {s['seconds']:.1f} s"
          + (f" -> {args.out}" if args.out else ""))
    return 0


def run(args) -> list[ProblemResult]:
    """The rows of `main`'s arguments (written to args.out when given)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, sequential_decoder
    from twlib.hub import resolve_model
    from twlib.infra.problems import load_parquet

    for name in ("n", "batch_size", "max_new_tokens", "max_thread_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"--data {args.data}: no such file (write it with `python -m twlib prompts` or "
                                f"`python -m twlib data`)")
    problems = load_parquet(args.data)[: args.n]
    if not problems:
        raise ValueError(f"--data {args.data}: no problems")
    path = resolve_model(args.model, need="tokenizer" if args.url else "weights")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.url:  # the server holds the weights; only the tokenizer is read here
        from twlib.engines import engine_for_server

        engine = engine_for_server(args.url, args.server_kind, tokenizer)
    else:
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        engine = HFEngine(model, tokenizer)
    config = DecodeConfig(max_new_tokens=args.max_new_tokens,
                          max_thread_tokens=args.max_thread_tokens or args.max_new_tokens)
    decoder = (ParallelDecoder(engine, tokenizer, config) if args.parallel
               else sequential_decoder(engine, tokenizer, config))
    rows = evaluate(decoder, problems, tokenizer, batch_size=args.batch_size, progress=False)
    if args.out:
        write_rows(args.out, rows)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
