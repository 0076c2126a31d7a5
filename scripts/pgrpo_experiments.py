"""The P-GRPO experiment of the tiny task and its ablations; the table and curves in `assets/pgrpo/`.

    .venv/bin/python scripts/pgrpo_experiments.py [--reuse pgrpo=runs/tiny/pgrpo] [--out assets/pgrpo]

Runs, each from the shipped stage-1 SFT checkpoints (`assets/checkpoints/tiny-parallel`: both modes
solved, a block on ~10% of the multi-group problems; `tiny-sequential`), or the two models given:
1. P-GRPO, the paper's reward and advantages          (configs/tiny-pgrpo.yaml; the main job's stage)
2. the same with std-normalised advantages            (configs/tiny-pgrpo-std.yaml; the paper's ablation)
3. the same without the acceleration term, rho = 0    (configs/tiny-pgrpo-rho0.yaml; the control)
4. GRPO on the sequential baseline                    (configs/tiny-grpo-sequential.yaml)
5. the learning-rate sweep: run 1 at lr 3e-5 and 3e-4 (the main job uses 1e-4)
then evaluates the two SFT models and the RL models greedily on the held-out split (the same 500
problems as the main job) and writes `results.csv` (accuracy, parallel rate on multi-group problems,
token latency, mean speed-up over the sequential SFT model, minutes) and `metrics-<run>.csv` (the
per-step curves: reward, zero-spread groups, accuracy, parallel rate, eta, critical path). Each run
resumes if interrupted; a finished run is not retrained; `--reuse NAME=DIR` takes a finished run's
`DIR/final` and `DIR/metrics.csv` instead (the main job's P-GRPO run is run 1).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"pgrpo": "tiny-pgrpo.yaml", "pgrpo-std": "tiny-pgrpo-std.yaml", "pgrpo-rho0": "tiny-pgrpo-rho0.yaml",
        "grpo-sequential": "tiny-grpo-sequential.yaml", "pgrpo-lr3e-5": "tiny-pgrpo.yaml",
        "pgrpo-lr3e-4": "tiny-pgrpo.yaml"}
SWEEP = {"pgrpo-lr3e-5": ["lr=3e-5"], "pgrpo-lr3e-4": ["lr=3e-4"]}  # the learning-rate sweep around 1e-4


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
    parser.add_argument("--reuse", nargs="*", default=[], metavar="NAME=DIR", help="a finished run to take as is")
    parser.add_argument("--parallel-model", default=str(ROOT / "assets" / "checkpoints" / "tiny-parallel"),
                        help="the SFT model P-GRPO starts from")
    parser.add_argument("--sequential-model", default=str(ROOT / "assets" / "checkpoints" / "tiny-sequential"),
                        help="the SFT model sequential GRPO starts from, and the speed-up's reference")
    args = parser.parse_args(argv)

    import json
    import time

    from twlib.claims import multi_group_parallel_rate
    from twlib.eval import compare, summarize
    from twlib.train.pgrpo import load_pgrpo_config, train
    from twlib.train.sft import eval_problems, load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    finals, minutes = {}, {}
    reuse = dict(item.split("=", 1) for item in args.reuse)
    for name in args.only:
        if name in reuse:
            run = Path(reuse[name])
            shutil.copy(run / "metrics.csv", out / f"metrics-{name}.csv")
            finals[name] = (str(run / "final"), name != "grpo-sequential")
            summary = run / "train_summary.json"
            if summary.is_file():
                minutes[name] = json.loads(summary.read_text())["train_s"] / 60
            continue
        start = args.sequential_model if name == "grpo-sequential" else args.parallel_model
        overrides = [f"model={start}", f"out_dir={args.runs}/tiny-{name}", "resume=true", "progress=false"]
        if args.steps:
            overrides.append(f"steps={args.steps}")
        overrides += SWEEP.get(name, [])
        config = load_pgrpo_config(ROOT / "configs" / RUNS[name], overrides)
        final = Path(config.out_dir) / "final"
        if not final.is_dir():
            start_s = time.perf_counter()
            train(config, source=f"configs/{RUNS[name]}")
            minutes[name] = (time.perf_counter() - start_s) / 60
        shutil.copy(Path(config.out_dir) / "metrics.csv", out / f"metrics-{name}.csv")
        finals[name] = (str(final), config.mode == "parallel")

    problems = eval_problems(load_config(ROOT / "configs" / "tiny-parallel.yaml"))[: args.n_eval]
    models = {"sft-parallel": (args.parallel_model, True), "sft-sequential": (args.sequential_model, False),
              **finals}
    rows = {name: evaluate(path, parallel, problems) for name, (path, parallel) in models.items()}
    table = []
    for name, result in rows.items():
        s = summarize(result)
        c = compare(result, rows["sft-sequential"])
        table.append({"model": name, "problems": s["problems"], "accuracy": round(100 * s["accuracy"], 2),
                      "format_valid": round(100 * s["format_valid"], 2),
                      "parallel_rate": round(100 * s["parallel_rate"], 2),
                      "multi_group_parallel": round(multi_group_parallel_rate(result), 2),
                      "mean_eta": round(s["mean_eta"], 4),
                      "token_latency": round(s["mean_token_latency"], 2),
                      "total_tokens": round(s["mean_total_tokens"], 2),
                      "speedup_vs_sft_sequential": round(c["speedup"]["mean"], 4),
                      "speedup_correct_mean": round(c["speedup_correct"]["mean"], 4),
                      "train_min": round(minutes[name], 2) if name in minutes else ""})
        print(f"{name:<16} acc {table[-1]['accuracy']:5.1f}%  parallel k>1 {table[-1]['multi_group_parallel']:5.1f}%  "
              f"latency {table[-1]['token_latency']:6.1f}  speed-up {table[-1]['speedup_vs_sft_sequential']:.3f}x")
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(f"wrote {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
