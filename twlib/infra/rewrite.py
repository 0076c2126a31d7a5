"""Stage 1 of data generation as a run: many samples through the five steps of `twlib.datagen`, on a thread pool.

    python -m twlib.infra.rewrite rewrite --url http://127.0.0.1:8000 --model NAME --data traces.parquet --out runs/rewrite
    python -m twlib.infra.rewrite arc --out runs/arc --model runs/tiny/base/final      (twlib.infra.arc)

Design choices
- Resume: samples already in accepted.jsonl or rejected.jsonl are skipped; transport failures go to
  errors.jsonl and are retried by the next run. The response cache (twlib.infra.chat) means a rerun sends
  no request twice.
- Bounded concurrency: a thread pool; one sample's five steps run in order on one worker. A summary.json
  with counts, rejection reasons per step, usage and cost.
- `GroupSumRewriter` is a scripted strong model for the groupsum task (tests, notebook 04, offline demos);
  `trajectory_html` shows a trajectory's threads side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from twlib.datagen import (EDIT_SYSTEM, MARK_SYSTEM, OUTLINE_SYSTEM, FilterConfig, StepError, Trace, apply_edits,
                           assemble, edit_messages, extract_threads, format_filter, mark_messages, outline_messages,
                           parse_edits, parse_marks, parse_outlines, split_trace, with_outlines)
from twlib.engines import EngineError
from twlib.format import FormatError, parse
from twlib.infra.arc import ArcConfig, run_arc
from twlib.infra.chat import ChatClient, ChatConfig, ResponseCache, end_with_newline, read_jsonl
from twlib.rewards import is_correct
from twlib.tasks import Problem, extract_answer

__all__ = ["RewriteConfig", "SampleResult", "rewrite_sample", "run_stage1", "load_accepted", "GroupSumRewriter",
           "trajectory_html", "main"]


# ----------------------------------------------------------------------------------------------------
# Stage 1: one sample, then many


@dataclass
class RewriteConfig:
    """Stage 1. Output files in `out_dir`: accepted.jsonl (Problems with the new `.parallel`),
    rejected.jsonl (id, step, kind, reason), errors.jsonl (transport failures: retried next run),
    cache.jsonl (or `cache_path`), summary.json."""

    out_dir: str = "runs/rewrite"
    concurrency: int = 4
    max_thread_share: float = 0.75
    max_edit_change: float = 0.3
    max_outline_chars: int = 120
    gap: str = ""  # between `n:` and an outline/thread: "" for groupsum, " " for prose
    check_input: bool = True  # reject traces that are already parallel or whose answer is wrong
    use_cache: bool = True
    cache_path: str | None = None
    filter: FilterConfig = field(default_factory=FilterConfig)
    count_tokens: Callable[[str], int] | None = field(default=None, repr=False)  # None: count_units


@dataclass
class SampleResult:
    id: str
    status: str  # "accepted" | "rejected" | "error"
    step: str = ""
    kind: str = ""
    reason: str = ""
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)
    requests: int = 0  # chat requests sent (cache misses)
    cache_hits: int = 0
    prompt_tokens: int = 0  # of the requests sent
    completion_tokens: int = 0
    seconds: float = 0.0

    def record(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "problem"}
        if self.problem is not None:
            out["problem"] = asdict(self.problem)
        return out


class _Asker:
    """One sample's access to the strong model: cache first, then the client; counts what it spends."""

    def __init__(self, client, cache: ResponseCache | None, result: SampleResult):
        self.client, self.cache, self.result = client, cache, result

    def __call__(self, messages: list[dict]) -> str:
        key = ResponseCache.key(self.client.body(messages)) if self.cache is not None else None
        reply = self.cache.get(key) if key is not None else None
        if reply is not None:
            self.result.cache_hits += 1
            return reply.content
        self.result.requests += 1
        reply = self.client.chat(messages)
        self.result.prompt_tokens += reply.prompt_tokens
        self.result.completion_tokens += reply.completion_tokens
        if key is not None:
            self.cache.put(key, self.client.model, reply)
        return reply.content


def _check_input(problem: Problem, trace: Trace) -> None:
    text = problem.sequential
    try:
        if parse(text).blocks:
            raise StepError("input", "already_parallel", "the trace already has a <Parallel> block")
    except FormatError as e:
        raise StepError("input", "format", f"the trace does not parse: {e}")
    if not is_correct(text, problem.answer, problem.task):
        raise StepError("input", "wrong_answer", f"the trace's answer {extract_answer(text)!r} is not "
                        f"{problem.answer!r} (only correct traces are rewritten)")


def _rewrite(problem: Problem, ask: Callable[[list[dict]], str], config: RewriteConfig, result: SampleResult) -> str:
    trace = split_trace(problem.sequential)
    if config.check_input:
        _check_input(problem, trace)
    marks = parse_marks(ask(mark_messages(problem.question, trace)), len(trace.lines))
    draft, result.notes = extract_threads(trace, marks, config.max_thread_share, config.count_tokens)
    edits = parse_edits(ask(edit_messages(problem.question, draft)), draft)
    draft = apply_edits(draft, edits, config.max_edit_change)
    reply = ask(outline_messages(problem.question, draft, config.max_outline_chars))
    draft = with_outlines(draft, parse_outlines(reply, draft, config.max_outline_chars))
    candidate = assemble(trace, draft, config.gap)
    reasons = format_filter(candidate, problem.sequential, problem.answer, problem.task, config.filter, problem.prompt)
    if reasons:
        kinds = sorted({r.split(":", 1)[0] for r in reasons})
        raise StepError("filter", "+".join(kinds), "; ".join(reasons))
    return candidate


def rewrite_sample(problem: Problem, client, config: RewriteConfig = RewriteConfig(),
                   cache: ResponseCache | None = None) -> SampleResult:
    """The five steps on one sample. Never raises: a StepError is a rejection (step, kind, reason); a
    transport failure (EngineError) or an unexpected exception is an error, retried by the next run."""
    result = SampleResult(problem.id, "error")
    ask = _Asker(client, cache, result)
    began = time.perf_counter()
    try:
        candidate = _rewrite(problem, ask, config, result)
        meta = {**problem.meta, "datagen": {"model": client.model, "dropped_blocks": result.notes}}
        result.status, result.problem = "accepted", dataclasses.replace(problem, parallel=candidate, meta=meta)
    except StepError as e:
        result.status, result.step, result.kind, result.reason = "rejected", e.step, e.kind, e.reason
    except EngineError as e:
        result.step, result.kind, result.reason = _current_step(result), "http", f"{type(e).__name__}: {e}"
    except Exception as e:  # a bug must not end the run; it is reported and the sample retried next time
        result.step, result.kind, result.reason = _current_step(result), "exception", f"{type(e).__name__}: {e}"
    result.seconds = time.perf_counter() - began
    return result


def _current_step(result: SampleResult) -> str:
    """The LLM step a transport failure happened in: the (n+1)-th request of a sample is step n+1."""
    asked = result.requests + result.cache_hits
    return ("mark", "edit", "outline")[min(max(asked - 1, 0), 2)]


def _finished_ids(out: Path) -> set[str]:
    return {r["id"] for name in ("accepted.jsonl", "rejected.jsonl") for r in read_jsonl(out / name) if "id" in r}


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _summary(results: Sequence[SampleResult], skipped: int, total: int, client, config_price, seconds: float,
             interrupted: bool, out: Path) -> dict:
    by_step: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for r in results:
        if r.status != "accepted":
            by_step[r.step] = by_step.get(r.step, 0) + 1
            by_kind[f"{r.status}:{r.step}/{r.kind}"] = by_kind.get(f"{r.status}:{r.step}/{r.kind}", 0) + 1
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    price_in, price_out = config_price
    accepted_all = len(read_jsonl(out / "accepted.jsonl"))
    rejected_all = len(read_jsonl(out / "rejected.jsonl"))
    return {
        "this_run": {
            "samples": total, "skipped_done": skipped, "processed": len(results),
            "accepted": sum(r.status == "accepted" for r in results),
            "rejected": sum(r.status == "rejected" for r in results),
            "errors": sum(r.status == "error" for r in results),
            "not_accepted_by_step": dict(sorted(by_step.items())), "reasons": dict(sorted(by_kind.items())),
            # requests = cache misses of this run; http_attempts = the client's attempts so far (retries included)
            "requests": sum(r.requests for r in results), "http_attempts": getattr(client, "attempts", None),
            "cache_hits": sum(r.cache_hits for r in results),
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "cost": prompt_tokens * price_in / 1e6 + completion_tokens * price_out / 1e6,
            "seconds": round(seconds, 3), "interrupted": interrupted,
        },
        "overall": {"accepted": accepted_all, "rejected": rejected_all,
                    "acceptance_rate": accepted_all / max(accepted_all + rejected_all, 1)},
    }


def run_stage1(problems: Sequence[Problem], client, config: RewriteConfig = RewriteConfig(),
               on_result: Callable[[SampleResult], None] | None = None, quiet: bool = True) -> dict:
    """Rewrite `problems` (their `.sequential` traces) with `client` (a ChatClient or FunctionChat).

    Resumable: samples already accepted or rejected in `out_dir` are skipped; with the cache on, no request
    is ever sent twice. `on_result` runs in the calling thread after each sample is written (raising from it
    stops the run there, as an interruption would). Returns the summary (also written to summary.json).
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("accepted.jsonl", "rejected.jsonl", "errors.jsonl"):
        end_with_newline(out / name)
    done = _finished_ids(out)
    unique = list({p.id: p for p in problems}.values())
    todo = [p for p in unique if p.id not in done]
    cache = ResponseCache(config.cache_path or out / "cache.jsonl") if config.use_cache else None
    price = (getattr(getattr(client, "config", None), "price_input_per_1m", 0.0),
             getattr(getattr(client, "config", None), "price_output_per_1m", 0.0))
    results: list[SampleResult] = []
    began, interrupted = time.perf_counter(), True
    pool = ThreadPoolExecutor(max(1, config.concurrency), thread_name_prefix="twlab-datagen")
    try:
        futures = [pool.submit(rewrite_sample, p, client, config, cache) for p in todo]
        for future in as_completed(futures):
            result = future.result()
            name = {"accepted": "accepted.jsonl", "rejected": "rejected.jsonl"}.get(result.status, "errors.jsonl")
            _append(out / name, result.record())
            results.append(result)
            if not quiet:
                print(f"[{len(results)}/{len(todo)}] {result.id}: {result.status} {result.step} {result.reason}"[:160],
                      flush=True)
            if on_result is not None:
                on_result(result)
        interrupted = False
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # samples in flight finish; their replies are cached
        summary = _summary(results, len(unique) - len(todo), len(unique), client, price,
                           time.perf_counter() - began, interrupted, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def load_accepted(out_dir) -> list[Problem]:
    """The accepted samples of a stage-1 run, as Problems (`.parallel` = the rewritten trajectory)."""
    return [Problem(**r["problem"]) for r in read_jsonl(Path(out_dir) / "accepted.jsonl") if "problem" in r]


# ----------------------------------------------------------------------------------------------------
# A scripted strong model for the groupsum task (tests, notebook 04, offline demos)


_NUMBERED = re.compile(r"(?m)^\s*(\d+) \| (.*)$")
_THREAD_HEADER = re.compile(r"(?m)^### Block (\d+) / Thread (\d+)\n")


def draft_threads(user: str) -> dict[int, list[str]]:
    """The threads of a rendered draft (`render_draft`), by block number."""
    heads = list(_THREAD_HEADER.finditer(user))
    blocks: dict[int, list[str]] = {}
    for h, nxt in zip(heads, heads[1:] + [None]):
        end = nxt.start() if nxt else len(user)
        body = user[h.end():end]
        cut = re.search(r"(?m)^--- shared text ---$|\n\nEach outline:", body)
        blocks.setdefault(int(h.group(1)), []).append((body[:cut.start()] if cut else body).rstrip("\n"))
    return blocks


class GroupSumRewriter:
    """Answers the three LLM steps correctly for groupsum traces, by reading the prompt: one thread per
    group (a group runs from its `X:` line to its `X=d` line), no edits, the group names as outlines
    (`A`, as the task's own parallel form). The result equals the task's parallel trajectory."""

    def __call__(self, messages: list[dict]) -> str:
        system, user = messages[0]["content"], messages[-1]["content"]
        if system == MARK_SYSTEM:
            return json.dumps(self.marks(user))
        if system == EDIT_SYSTEM:
            return json.dumps({"edits": []})
        if system == OUTLINE_SYSTEM:
            return json.dumps({"blocks": [{"outlines": ["".join(re.findall(r"(?m)^([A-Z]):", t)) for t in threads]}
                                          for _, threads in sorted(draft_threads(user).items())]})
        return "I do not know this step."

    @staticmethod
    def marks(user: str) -> dict:
        starts, ranges = None, []
        for number, text in _NUMBERED.findall(user):
            if re.match(r"[A-Z]:", text):
                starts = int(number)
            elif re.match(r"[A-Z]=\d", text) and starts is not None:
                ranges.append([starts, int(number)])
                starts = None
        return {"blocks": [{"threads": ranges}] if len(ranges) >= 2 else []}


# ----------------------------------------------------------------------------------------------------
# A trajectory viewer: threads side by side, one colour per thread

THREAD_COLOURS = ("#dbeafe", "#dcfce7", "#fef3c7", "#fce7f3", "#ede9fe", "#ffedd5", "#cffafe", "#f1f5f9")


def _pre(text: str, style: str = "") -> str:
    return (f"<pre style='margin:0;padding:4px 6px;white-space:pre-wrap;font-size:12px;{style}'>"
            f"{html.escape(text)}</pre>")


def trajectory_html(text: str, title: str = "") -> str:
    """HTML of a trajectory: shared text in grey, each block's threads side by side in columns, one colour
    per thread number, its outline on top. A text that does not parse is shown raw with the error."""
    head = f"<div style='font-weight:bold;margin:4px 0'>{html.escape(title)}</div>" if title else ""
    try:
        trajectory = parse(text)
    except FormatError as e:
        return (f"<div style='font-family:monospace'>{head}<div style='color:#b91c1c'>format error: "
                f"{html.escape(str(e))}</div>{_pre(text, 'background:#fee2e2')}</div>")
    parts = [head]
    for seg in trajectory.segments:
        if isinstance(seg, str):
            parts.append(_pre(seg, "color:#334155;background:#f8fafc"))
            continue
        columns = []
        for i, (outline, thread) in enumerate(zip(seg.outlines, seg.threads)):
            colour = THREAD_COLOURS[i % len(THREAD_COLOURS)]
            columns.append(f"<div style='flex:1;min-width:0;background:{colour};border-radius:4px'>"
                           f"<div style='font-size:11px;font-weight:bold;padding:2px 6px'>thread {i + 1}: "
                           f"{html.escape(outline.strip())}</div>{_pre(thread)}</div>")
        parts.append("<div style='display:flex;gap:6px;margin:4px 0;border-left:3px solid #64748b;padding-left:4px'>"
                     + "".join(columns) + "</div>")
    return "<div style='font-family:monospace'>" + "".join(parts) + "</div>"


# ----------------------------------------------------------------------------------------------------
# Command line


def _rewrite_command(args) -> int:
    from twlib.infra.problems import load_parquet

    problems = load_parquet(args.data)[: args.limit]
    chat = ChatConfig(base_url=args.url, model=args.model, api_key_env=args.api_key_env,
                      price_input_per_1m=args.price_in, price_output_per_1m=args.price_out,
                      temperature=None if args.temperature < 0 else args.temperature)
    config = RewriteConfig(out_dir=args.out, concurrency=args.concurrency, gap=args.gap)
    summary = run_stage1(problems, ChatClient(chat), config, quiet=False)
    print(json.dumps(summary, indent=1))
    return 0


def _arc_command(args) -> int:
    config = ArcConfig(out=args.out, model=args.model, n_seed=args.n_seed, n_pool=args.n_pool, n_eval=args.n_eval,
                       mix_seed=args.mix_seed)
    config.sft1["epochs"], config.sft2["epochs"] = args.sft1_epochs, args.sft2_epochs
    config.self_train = dataclasses.replace(config.self_train, temperature=args.temperature,
                                            samples_per_prompt=args.samples_per_prompt,
                                            require_correct=args.keep == "correct")
    run_arc(config)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twlib.infra.rewrite", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rewrite", help="stage 1: rewrite sequential traces with a strong model (chat endpoint)")
    p.add_argument("--url", required=True, help="base URL of an OpenAI-compatible server (…/v1/chat/completions)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="Parquet of Problems (twlib.infra.problems.save_parquet); .sequential is rewritten")
    p.add_argument("--out", default="runs/rewrite")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--api-key-env", default=None, help="name of the environment variable holding the API key")
    p.add_argument("--price-in", type=float, default=0.0, help="price per 1M prompt tokens")
    p.add_argument("--price-out", type=float, default=0.0, help="price per 1M completion tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="< 0: do not send one (model default)")
    p.add_argument("--gap", default="", help="text between 'n:' and outlines/threads (' ' for prose)")
    p.set_defaults(fn=_rewrite_command)
    p = sub.add_parser("arc", help="first SFT, self-training, second SFT on the tiny task (resumable)")
    p.add_argument("--out", default="runs/arc")
    p.add_argument("--model", default="assets/checkpoints/tiny-base", help="start model (a sequential base)")
    p.add_argument("--n-seed", type=int, default=1000)
    p.add_argument("--n-pool", type=int, default=20000)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--sft1-epochs", type=float, default=8)
    p.add_argument("--sft2-epochs", type=float, default=1)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--mix-seed", action="store_true", help="train the second SFT on kept + seed trajectories")
    p.add_argument("--keep", choices=["correct", "format"], default="correct",
                   help="self-training keeps format-valid AND correct trajectories (the paper), or format-valid "
                        "ones only (for a model that solves almost nothing)")
    p.set_defaults(fn=_arc_command)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
