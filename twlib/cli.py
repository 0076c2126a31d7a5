"""Command line: `python -m twlib COMMAND` (or the `twlib` script).

    python -m twlib demo [--out runs/demo] [--n-train 2000] [--n-eval 500] [--seed 0]
    python -m twlib pipeline [--out runs/tiny] [--fresh] [--from-assets] [--set key=value ...]
    python -m twlib sft --config configs/tiny-parallel.yaml [--set key=value ...] [--resume]
    python -m twlib eval --model runs/tiny-base/final [--parallel] [--n 100]
    python -m twlib data --task groupsum --n-train 2000 --n-eval 500 --out data/ [--chat-template TOKENIZER]
    python -m twlib prompts --jsonl rl.jsonl --out pool.parquet [--chat-template TOKENIZER]
    python -m twlib prepare-model --model Qwen/Qwen3-8B --out models/Qwen3-8B-threadweaver
    python -m twlib serve --model DIR [--allow-weight-updates DIR]   (twlib.infra.server)
    python -m twlib --version

Design choices
- The demo is the project's main job: it runs every stage that exists, prints what a learner should look
  at, and writes its tables as CSV next to the data, so numbers in the README can be re-derived.
- Same code as the notebooks: every number comes from twlib functions (tasks, format, trie).
- `--help` and `--version` import no torch: commands whose arguments live in a torch-importing module
  (sft, pgrpo, plan, prepare-model) build their sub-parser only when they run; serve, rewrite and arc
  hand their whole command line to their module.
"""

from __future__ import annotations

import argparse
import sys
import csv
import statistics
import time
from pathlib import Path


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def build_data(task: str, n_train: int, n_eval: int, seed: int, out: Path, chat_tokenizer=None) -> tuple[list, list]:
    from twlib.tasks import make_splits
    from twlib.infra.problems import save_parquet

    train, evals = make_splits(task, n_train, n_eval, seed)
    if chat_tokenizer is not None:  # prompts and responses as the chat template renders them
        from twlib.tokenizer import chat_problems

        train, evals = chat_problems(train, chat_tokenizer), chat_problems(evals, chat_tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    save_parquet(train, out / f"{task}-train.parquet")
    save_parquet(evals, out / f"{task}-eval.parquet")
    return train, evals


def trie_stats(problems, tokenizer, budgets=(1024, 4096)) -> tuple[list[dict], dict]:
    """Per problem: calls, tokens of the calls run separately, trie tokens, trained tokens, sequential tokens."""
    from twlib.format import engine_calls
    from twlib.trie import collate, pack, tokenize_calls

    rows, tries = [], []
    for p in problems:
        pairs = tokenize_calls(engine_calls(p.parallel, p.prompt), tokenizer)
        packed = pack(pairs)
        tries.append(packed)
        seq = len(tokenizer.encode(p.prompt + p.sequential, add_special_tokens=False)) + 1
        rows.append({
            "id": p.id, "k": p.meta.get("k"), "calls": len(pairs),
            "separate_tokens": sum(len(c) + len(d) for c, d in pairs),
            "trie_tokens": packed.shape[1], "trained_tokens": packed.num_trained, "sequential_tokens": seq,
        })
    summary = {
        "problems": len(rows),
        "mean_calls": statistics.fmean(r["calls"] for r in rows),
        "separate_over_trie": sum(r["separate_tokens"] for r in rows) / sum(r["trie_tokens"] for r in rows),
        "trie_over_sequential": sum(r["trie_tokens"] for r in rows) / sum(r["sequential_tokens"] for r in rows),
    }
    for budget in budgets:
        batch = collate(tries, max_tokens=budget)
        summary[f"rows@{budget}"] = batch.shape[0]
        summary[f"fill@{budget}"] = batch.num_tokens / (batch.shape[0] * budget)
    return rows, summary


def demo(args) -> int:
    from twlib.eval import format_ceiling, oracle_ceiling
    from twlib.tokenizer import build_tokenizer

    out = Path(args.out)
    start = time.perf_counter()
    print(f"== 1. data: the tiny task (groupsum) and the multiplication task, seed {args.seed}")
    train, evals = build_data("groupsum", args.n_train, args.n_eval, args.seed, out / "data")
    mult_train, mult_eval = build_data("multiply", max(args.n_train // 10, 10), max(args.n_eval // 5, 10),
                                       args.seed, out / "data")
    print(f"groupsum: {len(train)} train / {len(evals)} eval; multiply: {len(mult_train)} / {len(mult_eval)}"
          f" -> {out / 'data'}")
    example = next(p for p in evals if p.meta.get("k") == 2)
    print("\nexample question:", example.question)
    print("parallel response:\n" + example.parallel)

    print("\n== 2. oracle ceiling: perfect trajectories, response tokens (tags = 1 token)")
    ceiling = oracle_ceiling(evals)
    print(format_ceiling(ceiling))
    mult = oracle_ceiling(mult_eval)
    print(f"multiply (characters): self-parallelism {mult['self_parallelism']:.3f}, "
          f"speed-up {mult['speedup']:.3f}")
    _write_csv(out / "ceiling.csv", [
        {"task": "groupsum", "k": k, **{m: round(v, 4) if isinstance(v, float) else v for m, v in r.items()}}
        for k, r in list(ceiling["per_size"].items()) + [("all", ceiling)] if r.get("n")
        for r in [{key: r[key] for key in ("n", "frac_parallel", "self_parallelism", "speedup",
                                             "mean_seq_tokens", "mean_longest")}]
    ])

    print("\n== 3. tries: the state machine's calls packed into one row per trajectory")
    tokenizer = build_tokenizer()
    rows, summary = trie_stats(train, tokenizer)
    _write_csv(out / "trie_stats.csv", rows)
    print(f"calls per trajectory       {summary['mean_calls']:.2f}")
    print(f"tokens if every call ran separately / trie tokens   {summary['separate_over_trie']:.2f}x")
    print(f"trie tokens / sequential trajectory tokens          {summary['trie_over_sequential']:.2f}x")
    for budget in (1024, 4096):
        print(f"rows of {budget:>4} tokens: {summary[f'rows@{budget}']:>5} ({100 * summary[f'fill@{budget}']:.1f}% filled)")
    print(f"\nwrote {out / 'ceiling.csv'} and {out / 'trie_stats.csv'} in {time.perf_counter() - start:.1f} s")
    print("next: notebooks/01_trajectory_format and 02_trie_masking (python3 lab.py lab);")
    print("      the whole tiny pipeline (base model, trie SFT, baselines, evaluation): python -m twlib pipeline")
    return 0


def data(args) -> int:
    try:
        chat = _chat_tokenizer(args.chat_template) if args.chat_template else None
        train, evals = build_data(args.task, args.n_train, args.n_eval, args.seed, Path(args.out), chat)
    except (OSError, ValueError) as e:
        print(f"twlib data: {e}", file=sys.stderr)
        return 2
    print(f"{args.task}: {len(train)} train / {len(evals)} eval -> {args.out}"
          + (f" (chat template of {args.chat_template})" if args.chat_template else ""))
    return 0


def prompts(args) -> int:
    from twlib.infra.problems import problems_from_jsonl, save_parquet

    try:
        if args.chat_template and args.template != "{prompt}":
            raise ValueError("--template and --chat-template exclude each other (the chat template wraps the prompt)")
        problems = problems_from_jsonl(args.jsonl, args.prompt_field, args.answer_field, args.task,
                                       args.template.replace("\\n", "\n"), args.id_field)
        if args.chat_template:
            from twlib.tokenizer import chat_problems

            problems = chat_problems(problems, _chat_tokenizer(args.chat_template))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_parquet(problems, args.out)
    print(f"{len(problems)} prompts ({args.task}) -> {args.out}")
    return 0


def evaluate_command(args) -> int:
    """Greedy evaluation of one checkpoint on the held-out split of the tiny task."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, sequential_decoder
    from twlib.eval import accuracy_by_k, evaluate, summarize, write_rows
    from twlib.train.sft import eval_problems, load_config

    from twlib.hub import ModelNotFound, resolve_model

    try:
        path = resolve_model(args.model)
    except ModelNotFound as e:
        print(f"twlib eval: {e}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    problems = eval_problems(load_config(args.config))[: args.n]
    if args.url:  # decode through a completions server (vllm serve, SGLang, llama.cpp) instead
        from twlib.engines import engine_for_server

        local = args.server_kind not in ("vllm", "sglang")
        engine = engine_for_server(args.url, args.server_kind, tokenizer,
                                   model.config.max_position_embeddings if local else None)
    else:
        engine = HFEngine(model, tokenizer)
    config = DecodeConfig(max_new_tokens=args.max_new_tokens)
    decoder = ParallelDecoder(engine, tokenizer, config) if args.parallel else sequential_decoder(engine, tokenizer, config)
    rows = evaluate(decoder, problems, tokenizer, batch_size=args.batch_size)
    s = summarize(rows)
    print(f"{args.model}: {s['problems']} problems, accuracy {100 * s['accuracy']:.1f}%, format valid "
          f"{100 * s['format_valid']:.1f}%, parallel {100 * s['parallel_rate']:.1f}%, token latency "
          f"{s['mean_token_latency']:.1f}, total tokens {s['mean_total_tokens']:.1f}, {s['seconds']:.1f} s")
    for k, (right, total) in accuracy_by_k(rows).items():
        print(f"  k={k}: {right}/{total} correct")
    if args.out:
        write_rows(args.out, rows)
    return 0


def pipeline(args) -> int:
    from twlib.pipeline import PipelineConfig, run

    quick = args.from_assets
    n_eval = args.n_eval if args.n_eval is not None else 500
    wall = args.wall_problems if args.wall_problems is not None else (50 if quick else 100)
    cfg = PipelineConfig(out=args.out, fresh=args.fresh, from_assets=args.from_assets, n_eval=n_eval,
                         wall_problems=wall, seed=args.seed, overrides=tuple(args.set),
                         pgrpo_overrides=tuple(args.set_pgrpo))
    command = "python -m twlib pipeline" + (" --from-assets" if quick else "") + (
        f" --seed {args.seed}" if args.seed is not None else "") + f" --out {args.out}"
    try:
        run(cfg, command=command)
    except FileNotFoundError as e:  # a missing base or shipped checkpoint: say which, no traceback
        print(f"twlib pipeline: {e}", file=sys.stderr)
        return 2
    return 0


def sft(args) -> int:
    from twlib.train.sft import main_args

    return main_args(args)


def plan(args) -> int:
    from twlib.infra.planner import main_args

    return main_args(args)


def pgrpo(args) -> int:
    from twlib.train.pgrpo import main_args

    return main_args(args)


def prepare_model(args) -> int:
    from twlib.prepare import main_args

    return main_args(args)


def _chat_tokenizer(name: str):
    """The tokenizer whose chat template renders prompts (--chat-template): a folder or a cached hub id."""
    from transformers import AutoTokenizer

    from twlib.hub import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(name, need="tokenizer"))


# Commands whose arguments live in their own module (importing it imports torch): their sub-parser is only
# built when that command runs, so `python -m twlib --help` and `--version` stay fast.
LAZY = {
    "sft": ("twlib.train.sft", "supervised fine-tuning from a YAML config (twlib.train.sft)",
            "Trie SFT (mode parallel), the sequential baseline or the leakage ablation (mode causal); see "
            "twlib/train/sft.py and configs/tiny-*.yaml", sft),
    "pgrpo": ("twlib.train.pgrpo", "P-GRPO (or GRPO for the sequential baseline) from a YAML config (twlib.train.pgrpo)",
              "Parallelization-aware GRPO on sampled state-machine rollouts; see twlib/train/pgrpo.py and "
              "configs/tiny-pgrpo*.yaml", pgrpo),
    "plan": ("twlib.infra.planner", "memory/time/cost plan for Qwen3 SFT and RL; --dry-run CONFIG (twlib.infra.plan)", None, plan),
    "prepare-model": ("twlib.prepare", "add the thread tags to a real model as single tokens (resized, "
                      "initialised embeddings) into a new folder (twlib.prepare)", None, prepare_model),
}
# Commands whose whole argument parsing belongs to another module's main(argv).
FORWARDED = {
    "rewrite": ("data generation stage 1: rewrite sequential traces with a strong model", "twlib.infra.rewrite"),
    "arc": ("data generation arc: seed SFT, self-training, second SFT (twlib.infra.arc)", "twlib.infra.rewrite"),
    "serve": ("serve a checkpoint as /v1/completions (teaching stand-in for vLLM; twlib.infra.server)", "twlib.infra.server"),
}


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv=None) -> int:
    from twlib import __version__

    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    if command in FORWARDED and argv and argv[0] == command:
        import importlib

        module = importlib.import_module(FORWARDED[command][1])
        return module.main(argv) if command != "serve" else module.main(argv[1:], prog="twlib serve")

    parser = argparse.ArgumentParser(prog="twlib", description="ThreadWeaver Lab")
    parser.add_argument("--version", action="version", version=f"twlib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the main job: data, oracle ceiling, trie statistics")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=demo)
    p = sub.add_parser("data", help="generate a task's train/eval splits as Parquet")
    p.add_argument("--task", default="groupsum")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="data")
    p.add_argument("--chat-template", default=None, metavar="TOKENIZER",
                   help="render prompts and responses with this tokenizer's chat template (a folder or a cached "
                        "hub id, e.g. a prepared Qwen3); default: the raw question as the prompt")
    p.set_defaults(fn=data)
    p = sub.add_parser("prompts", help="a prompt pool (P-GRPO `data`) from a JSON-lines file of problem + answer")
    p.add_argument("--jsonl", required=True, help='one record per line, e.g. {"problem": ..., "answer": ...}')
    p.add_argument("--out", required=True, help="Parquet to write (twlib.infra.problems.save_parquet)")
    p.add_argument("--prompt-field", default="problem")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--id-field", default=None)
    p.add_argument("--task", default="math", help="grader: math (math-verify), groupsum, multiply")
    p.add_argument("--template", default="{prompt}", help="wraps the prompt text; \\n is a newline")
    p.add_argument("--chat-template", default=None, metavar="TOKENIZER",
                   help="prompt = the user turn + assistant header rendered by this tokenizer's chat template "
                        "(a folder or a cached hub id), as the reference data is; instead of --template")
    p.set_defaults(fn=prompts)
    p = sub.add_parser("eval", help="greedy evaluation of a checkpoint on the tiny task's held-out split")
    p.add_argument("--model", required=True, help="a directory written by save_pretrained (e.g. runs/x/final) "
                                                  "or a hub id in the Hugging Face cache")
    p.add_argument("--parallel", action="store_true", help="decode with the 5-phase state machine")
    p.add_argument("--config", default="configs/tiny-base.yaml", help="stage config that defines the split")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--out", default=None, help="CSV of per-problem results")
    p.add_argument("--url", default=None, help="decode through a completions server (vllm serve, SGLang, llama.cpp)")
    p.add_argument("--server-kind", default="vllm", choices=["vllm", "sglang", "llama-server", "llama-cpp-python"])
    p.set_defaults(fn=evaluate_command)
    p = sub.add_parser("pipeline", help="the main job: from the shipped base, trie SFT, baselines, P-GRPO, "
                                        "evaluation and the paper's three claims")
    p.add_argument("--out", default="runs/tiny")
    p.add_argument("--fresh", action="store_true", help="delete OUT and start over (default: resume)")
    p.add_argument("--from-assets", action="store_true", help="evaluate the shipped final models only")
    p.add_argument("--seed", type=int, default=None, help="training seed of every stage (default: the configs')")
    p.add_argument("--n-eval", type=int, default=None, help="held-out problems evaluated (default 500)")
    p.add_argument("--wall-problems", type=int, default=None,
                   help="problems timed one at a time (default 100; 50 with --from-assets)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every SFT stage config, e.g. --set max_steps=50")
    p.add_argument("--set-pgrpo", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the P-GRPO config, e.g. --set-pgrpo steps=10")
    p.set_defaults(fn=pipeline)
    for name, (module, text, description, fn) in LAZY.items():
        p = sub.add_parser(name, help=text, description=description or text)
        if name == command:  # only the command that runs imports its module
            import importlib

            importlib.import_module(module).add_arguments(p)
        p.set_defaults(fn=fn)
    for name, (text, _) in FORWARDED.items():
        sub.add_parser(name, help=text)  # listed in --help; the arguments belong to the module
    args = parser.parse_args(argv)
    return args.fn(args)
