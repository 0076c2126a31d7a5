"""The longer tiny recipe's table, from the runs of `scripts/long_recipe.sh`, into `assets/long/`.

    .venv/bin/python scripts/long_recipe_report.py [--runs runs/long] [--out assets/long]

Reads each stage's `eval.csv` (500 held-out problems, greedy) and `result.json` (training), prints the table
with accuracy per number of groups k, and writes `results.csv`, the per-problem `eval_<stage>.csv` and
`training.json`. Speed-ups are against the sequential model of the same recipe, as in the demo's table.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# stage -> the table's row name
STAGES = {"parallel2": "parallel (trie SFT, 2 + 3 epochs)", "parallel": "parallel (trie SFT, 2 epochs)",
          "sequential": "sequential baseline", "base-long2": "base (1.5 + 2 + 2 epochs)"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/long")
    parser.add_argument("--out", default=str(ROOT / "assets" / "long"))
    args = parser.parse_args(argv)

    from twlib.eval import accuracy_by_k, compare, read_rows, summarize

    runs, out = Path(args.runs), Path(args.out)
    missing = [f"{runs / s / 'eval.csv'}" for s in STAGES if not (runs / s / "eval.csv").is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run `bash scripts/long_recipe.sh {runs}` first")
    out.mkdir(parents=True, exist_ok=True)
    evals = {s: read_rows(runs / s / "eval.csv") for s in STAGES}
    training = {}
    for stage in ("base-long", "base-long2", "sequential", "parallel", "parallel2"):
        result = json.loads((runs / stage / "result.json").read_text())
        training[stage] = {"steps": result.get("steps"), "final_loss": result.get("final_loss"),
                           "train_min": round(result.get("train_s", 0) / 60, 2)}
    table = []
    for stage, name in STAGES.items():
        rows, s = evals[stage], summarize(evals[stage])
        c = compare(rows, evals["sequential"])
        by_k = accuracy_by_k(rows)
        table.append({"stage": stage, "model": name, "problems": s["problems"],
                      "accuracy": round(100 * s["accuracy"], 2), "format_valid": round(100 * s["format_valid"], 2),
                      "parallel_rate": round(100 * s["parallel_rate"], 2),
                      "token_latency": round(s["mean_token_latency"], 2),
                      "total_tokens": round(s["mean_total_tokens"], 2),
                      "speedup_mean": round(c["speedup"]["mean"], 4), "speedup_max": round(c["speedup"]["max"], 4),
                      "speedup_correct_mean": round(c["speedup_correct"]["mean"], 4),
                      "correct_by_k": " ".join(f"k{k}:{a}/{n}" for k, (a, n) in by_k.items())})
        shutil.copy(runs / stage / "eval.csv", out / f"eval_{stage}.csv")
        t = table[-1]
        print(f"{name:<36} acc {t['accuracy']:5.1f}%  format {t['format_valid']:5.1f}%  parallel "
              f"{t['parallel_rate']:5.1f}%  latency {t['token_latency']:6.1f}  speed-up {t['speedup_mean']:.2f}x  "
              f"{t['correct_by_k']}")
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    (out / "training.json").write_text(json.dumps(training, indent=1) + "\n")
    for stage, t in training.items():
        print(f"train {stage:<11} {t['steps']} steps, final loss {t['final_loss']:.2g}, {t['train_min']:.1f} min")
    print(f"wrote {out}/results.csv, eval_*.csv, training.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
