"""The main job with other training seeds: does every claim hold on each, with a margin?

    .venv/bin/python scripts/seeds.py --seeds 1 2 [--runs runs/seeds] [--out assets/results/seeds.csv]
    .venv/bin/python scripts/seeds.py --collect 0=runs/tiny 1=runs/seeds/seed1 2=runs/seeds/seed2

Each seed runs `python -m twlib pipeline --seed N --out RUNS/seedN` (every SFT stage and P-GRPO with
seed N: model init is the shipped base, so the seed sets the data order, the rollout sampling and the
RNG; the held-out problems are the same), one after another so that wall clock is measured alone on
the machine. Resumable like the pipeline. Then one row per seed goes to `--out`: the verdicts of
`claims.json` and the numbers behind them, recomputed from the run's per-problem rows (`eval_*.csv`,
`wall_*.csv`) by `twlib.claims`, so the table cannot disagree with the rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def seed_row(seed: int, run: Path) -> dict:
    """One seed's claims and the numbers behind them, from the run's per-problem rows."""
    from twlib.claims import accuracy, judge, mean_speedup, multi_group_parallel_rate
    from twlib.eval import read_rows

    rows = {name: read_rows(run / f"eval_{name}.csv") for name in ("parallel", "pgrpo", "sequential")}
    wall = (read_rows(run / "wall_pgrpo.csv"), read_rows(run / "wall_sequential.csv"))
    ceiling = json.loads((run / "claims.json").read_text())["oracle_ceiling"]
    claims = judge(rows["pgrpo"], rows["sequential"], ceiling, sft=rows["parallel"], wall=wall)
    seq = rows["sequential"]
    out = {"seed": seed, "run": str(run), "problems": len(seq), "oracle_ceiling": round(ceiling, 4)}
    for name in ("parallel", "pgrpo", "sequential"):
        out[f"accuracy_{name}"] = round(accuracy(rows[name]), 2)
    for name in ("parallel", "pgrpo"):
        out[f"speedup_{name}"] = round(mean_speedup(rows[name], seq), 4)
        out[f"multi_group_parallel_{name}"] = round(multi_group_parallel_rate(rows[name]), 2)
    out["wall_clock_speedup"] = round(claims[1].measured["wall-clock speed-up"], 4)
    for claim, key in zip(claims, ("C1", "C2", "C3")):
        out[key] = claim.verdict
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    parser.add_argument("--runs", default="runs/seeds")
    parser.add_argument("--collect", nargs="*", default=[], metavar="SEED=RUN",
                        help="finished runs to tabulate as well (e.g. 0=runs/tiny, the main job)")
    parser.add_argument("--out", default=str(ROOT / "assets" / "results" / "seeds.csv"))
    args = parser.parse_args(argv)
    runs = {}
    for item in args.collect:
        seed, _, run = item.partition("=")
        runs[int(seed)] = Path(run)
    for seed in args.seeds:
        run = Path(args.runs) / f"seed{seed}"
        subprocess.run([sys.executable, "-m", "twlib", "pipeline", "--seed", str(seed), "--out", str(run)],
                       check=True)
        runs[seed] = run
    table = [seed_row(seed, run) for seed, run in sorted(runs.items())]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    for row in table:
        print(" ".join(f"{k}={v}" for k, v in row.items() if k != "run"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
