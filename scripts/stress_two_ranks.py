"""Run the 2-rank gloo worker of tests/test_distributed.py many times and count the runs that fail.

    .venv/bin/python scripts/stress_two_ranks.py --runs 40                  # as shipped: workers end with exit_process
    .venv/bin/python scripts/stress_two_ranks.py --runs 30 --full-teardown  # workers exit through interpreter teardown

Each run is the fixture of tests/test_distributed.py (three FSDP2 SFT runs on 2 CPU ranks, ~10 s). A rank
writes a `done` marker after its work and `destroy_process_group`, so a failure with both markers present
happened during process exit. This is where `twlib.train.fsdp.exit_process` comes from (measured on the
2-core CPU: 1 of 30 runs aborted with SIGABRT in teardown with `--full-teardown`, 0 of 40 without it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def worker(rank: int, world: int, port: int, root: str, full_teardown: bool) -> None:
    import test_distributed

    from twlib.train import fsdp

    exit_process = fsdp.exit_process
    fsdp.exit_process = lambda code=0: None  # write the marker first, then leave as asked
    test_distributed._worker(rank, world, port, root)
    (Path(root) / f"done{rank}").write_text("ok")
    if not full_teardown:
        exit_process()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--full-teardown", action="store_true",
                        help="let workers exit through interpreter teardown (no exit_process)")
    args = parser.parse_args(argv)

    import torch.multiprocessing as mp
    from helpers import free_port

    failures = 0
    for i in range(args.runs):
        root, began = tempfile.mkdtemp(), time.perf_counter()
        try:
            mp.spawn(worker, args=(2, free_port(), root, args.full_teardown), nprocs=2, join=True)
            print(f"run {i + 1}: ok ({time.perf_counter() - began:.1f} s)", flush=True)
        except Exception as e:  # a rank died: say how, and whether both had finished their work
            failures += 1
            done = sorted(p.name for p in Path(root).glob("done*"))
            print(f"run {i + 1}: FAILED {type(e).__name__}: {str(e)[:120]}; markers {done}", flush=True)
    print(f"{failures} of {args.runs} runs failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
