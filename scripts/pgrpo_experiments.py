"""The P-GRPO experiments of the tiny task, and the table/curves committed to `assets/pgrpo/`.

    .venv/bin/python scripts/pgrpo_experiments.py [--steps 40] [--n-eval 500] [--out assets/pgrpo]
    .venv/bin/python scripts/pgrpo_experiments.py --parallel-model runs/long/parallel/final \
        --sequential-model runs/long/sequential/final --runs runs/long/rl --out assets/pgrpo-long \
        --only pgrpo pgrpo-std          # assets/pgrpo-long/ (after scripts/long_recipe.sh)

Runs, from the shipped SFT checkpoints (`assets/checkpoints/tiny-parallel`, `tiny-sequential`; or the
two models given):
1. P-GRPO on the parallel model          (configs/tiny-pgrpo.yaml)
2. the same with std normalisation       (configs/tiny-pgrpo-std.yaml)
3. GRPO on the sequential baseline       (configs/tiny-grpo-sequential.yaml)
then evaluates the two SFT models and the three RL models greedily on the held-out split (the same 500
problems as the SFT table) and writes `results.csv` (accuracy, token latency, mean speed-up over the
sequential SFT model, ...) and `metrics-<run>.csv` (the per-step diagnostics). Each run resumes if
interrupted; a finished run is not retrained.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"pgrpo": "tiny-pgrpo.yaml", "pgrpo-std": "tiny-pgrpo-std.yaml", "grpo-sequential": "tiny-grpo-sequential.yaml"}


def evaluate(path: str, parallel: bool, problems, batch_size: int = 50):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, sequential_decoder
    from twlib.eval import evaluate as run_eval

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    engine = HFEngine(model, tok)
    config = DecodeConfig(max_new_tokens=512)
    decoder = ParallelDecoder(engine, tok, config) if parallel else sequential_decoder(engine, tok, config)
    return run_eval(decoder, problems, tok, batch_size=batch_size, progress=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="override every run's steps")
    parser.add_argument("--n-eval", type=int, default=500)
    parser.add_argument("--runs", default="runs", help="where the RL runs write (out_dir = RUNS/tiny-<name>)")
    parser.add_argument("--out", default=str(ROOT / "assets" / "pgrpo"))
    parser.add_argument("--only", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--parallel-model", default=str(ROOT / "assets" / "checkpoints" / "tiny-parallel"),
                        help="the SFT model P-GRPO starts from")
    parser.add_argument("--sequential-model", default=str(ROOT / "assets" / "checkpoints" / "tiny-sequential"),
                        help="the SFT model sequential GRPO starts from, and the speed-up's reference")
    args = parser.parse_args(argv)

    from twlib.eval import compare, summarize
    from twlib.pgrpo import load_pgrpo_config, train
    from twlib.sft import eval_problems, load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    finals = {}
    for name in args.only:
        start = args.sequential_model if name == "grpo-sequential" else args.parallel_model
        overrides = [f"model={start}", f"out_dir={args.runs}/tiny-{name}", "resume=true", "progress=false"]
        if args.steps:
            overrides.append(f"steps={args.steps}")
        config = load_pgrpo_config(ROOT / "configs" / RUNS[name], overrides)
        final = Path(config.out_dir) / "final"
        if not final.is_dir():
            train(config, source=f"configs/{RUNS[name]}")
        shutil.copy(Path(config.out_dir) / "metrics.csv", out / f"metrics-{name}.csv")
        finals[name] = (str(final), config.mode == "parallel")

    problems = eval_problems(load_config(ROOT / "configs" / "tiny-base.yaml"))[: args.n_eval]
    models = {"sft-parallel": (args.parallel_model, True), "sft-sequential": (args.sequential_model, False),
              **finals}
    rows = {name: evaluate(path, parallel, problems) for name, (path, parallel) in models.items()}
    table = []
    for name, result in rows.items():
        s = summarize(result)
        c = compare(result, rows["sft-sequential"])
        table.append({"model": name, "problems": s["problems"], "accuracy": round(100 * s["accuracy"], 2),
                      "format_valid": round(100 * s["format_valid"], 2),
                      "parallel_rate": round(100 * s["parallel_rate"], 2), "mean_eta": round(s["mean_eta"], 4),
                      "token_latency": round(s["mean_token_latency"], 2),
                      "total_tokens": round(s["mean_total_tokens"], 2),
                      "speedup_vs_sft_sequential": round(c["speedup"]["mean"], 4),
                      "speedup_correct_mean": round(c["speedup_correct"]["mean"], 4)})
        print(f"{name:<16} acc {table[-1]['accuracy']:5.1f}%  parallel {table[-1]['parallel_rate']:5.1f}%  "
              f"latency {table[-1]['token_latency']:6.1f}  speed-up {table[-1]['speedup_vs_sft_sequential']:.3f}x")
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(f"wrote {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
