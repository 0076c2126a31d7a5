"""Decoding benchmark: the same problems decoded four ways in one run, one problem at a time.

    .venv/bin/python benchmarks/decode.py [--parallel assets/checkpoints/tiny-pgrpo]
        [--sequential assets/checkpoints/tiny-sequential] [--n 100] [--seed 1] [--out assets/benchmarks/decode.json]

1. sequential model, ordinary decoding;
2. parallel model, state machine, threads batched with a forked KV cache (the default);
3. parallel model, threads decoded one after another (prefix cache still reused);
4. parallel model, threads one after another, each re-prefilling the shared prefix (no prefix cache).
For each: wall time, generated tokens, prefill tokens, decode steps, accuracy, token-latency speed-up
(mean over problems of sequential tokens / critical path) and wall-clock speed-up vs way 1, and their
ratio (1.0 is the limit: the state machine cannot beat its critical path).
`--out FILE` writes every printed number, the command, date, machine and load average as JSON (result_file.py).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from result_file import ResultFile, repo_path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", default=str(ROOT / "assets/checkpoints/tiny-pgrpo"))
    parser.add_argument("--sequential", default=str(ROOT / "assets/checkpoints/tiny-sequential"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--out", default=None, help="JSON result file (README renders assets/benchmarks/decode.json)")
    args = parser.parse_args(argv)
    recorder = ResultFile("decode", argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, sequential_decoder
    from twlib.eval import evaluate, summarize
    from twlib.tasks import generate

    tok = AutoTokenizer.from_pretrained(args.parallel)
    problems = generate("groupsum", args.n, seed=args.seed)
    par_model = AutoModelForCausalLM.from_pretrained(args.parallel).eval()
    seq_model = AutoModelForCausalLM.from_pretrained(args.sequential).eval()
    ways = {
        "1 sequential model": (seq_model, False, "batched", True),
        "2 threads batched + KV fork": (par_model, True, "batched", True),
        "3 threads one after another": (par_model, True, "serial", True),
        "4 serial, prefix re-prefilled": (par_model, True, "serial", False),
    }
    rows, baseline = [], None
    for name, (model, parallel, mode, prefix_cache) in ways.items():
        engine = HFEngine(model, tok, prefix_cache=prefix_cache)
        config = DecodeConfig(max_new_tokens=args.max_new_tokens, thread_mode=mode)
        decoder = ParallelDecoder(engine, tok, config) if parallel else sequential_decoder(engine, tok, config)
        evaluate(decoder, problems[:3], tok, progress=False)  # warm-up
        engine.reset()
        results = evaluate(decoder, problems, tok, progress=False)
        s = summarize(results)
        if baseline is None:
            baseline = results
        token = statistics.fmean(b.total / max(r.longest, 1) for b, r in zip(baseline, results))
        wall = sum(b.seconds for b in baseline) / s["seconds"]
        rows.append((name, s["seconds"], engine.stats["generated_tokens"], engine.stats["prefill_tokens"],
                     engine.stats["decode_steps"], s["accuracy"], token, wall, wall / token))
    print(f"{args.n} problems, batch size 1, {Path(args.parallel).name} vs {Path(args.sequential).name}")
    print(f"{'way':<32} {'wall s':>7} {'generated':>10} {'prefill':>8} {'steps':>7} {'acc':>6} "
          f"{'token x':>8} {'wall x':>7} {'wall/token':>11}")
    for name, seconds, gen, pre, steps, acc, token, wall, ratio in rows:
        print(f"{name:<32} {seconds:>7.1f} {gen:>10,} {pre:>8,} {steps:>7,} {100 * acc:>5.1f}% "
              f"{token:>7.2f}x {wall:>6.2f}x {ratio:>11.2f}")
    keys = ("way", "wall_s", "generated_tokens", "prefill_tokens", "decode_steps", "accuracy", "token_latency_x",
            "wall_clock_x", "wall_per_token")
    recorder.save(args.out, rows=[dict(zip(keys, row)) for row in rows],
                  setup={"parallel": repo_path(args.parallel), "sequential": repo_path(args.sequential), "n": args.n,
                         "seed": args.seed, "max_new_tokens": args.max_new_tokens, "task": "groupsum", "batch_size": 1,
                         "engine_threads": engine.num_threads})  # HFEngine's torch threads while it decodes


if __name__ == "__main__":
    main()
