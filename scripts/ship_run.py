"""Copy a finished main-job run into the shipped assets (checkpoints, per-problem rows, curves, claims).

    .venv/bin/python scripts/ship_run.py runs/tiny            # the main job -> assets/checkpoints, assets/results
    .venv/bin/python scripts/ship_run.py runs/seeds/seed1 --rows-only --to assets/results/seeds/seed1

What ships, and from where in RUN:
- `assets/checkpoints/tiny-{parallel,pgrpo,sequential,causal}/`  <- RUN/<stage>/final (1.7 MB each)
- `assets/checkpoints/train_summary.json`                         <- RUN/<stage>/train_summary.json
- `assets/results/`: eval_*.csv, wall_*.csv (per-problem rows), results.csv, claims.json, pipeline.log
  (RUN's files), metrics_<stage>.csv (each stage's training curve)
`--rows-only` copies just the rows and claims (for the seed runs). The log is copied if RUN/pipeline.log
exists (the README's command writes it with `tee`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("parallel", "pgrpo", "sequential", "causal")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--to", default=str(ROOT / "assets" / "results"))
    parser.add_argument("--checkpoints", default=str(ROOT / "assets" / "checkpoints"))
    parser.add_argument("--rows-only", action="store_true")
    args = parser.parse_args(argv)
    run, to = Path(args.run), Path(args.to)
    to.mkdir(parents=True, exist_ok=True)
    names = ["results.csv", "claims.json"] + [p.name for p in run.glob("eval_*.csv")] + [p.name for p in run.glob("wall_*.csv")]
    if (run / "pipeline.log").is_file() and not args.rows_only:
        names.append("pipeline.log")
    for name in names:
        shutil.copy(run / name, to / name)
    if args.rows_only:
        print(f"copied {len(names)} files to {to}")
        return 0
    summaries = {}
    for stage in STAGES:
        src = run / stage
        dst = Path(args.checkpoints) / f"tiny-{stage}"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src / "final", dst)
        shutil.copy(src / "metrics.csv", to / f"metrics_{stage}.csv")
        summaries[stage] = json.loads((src / "train_summary.json").read_text())
    (Path(args.checkpoints) / "train_summary.json").write_text(json.dumps(summaries, indent=1))
    print(f"copied {len(names)} result files to {to} and {len(STAGES)} checkpoints to {args.checkpoints}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
