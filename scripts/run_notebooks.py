"""Execute notebooks headless, top to bottom, the way CI does: one fresh kernel per notebook.

    python scripts/run_notebooks.py                      # every notebook, full configuration
    python scripts/run_notebooks.py --small 03 05        # TWLAB_SMALL=1 (CPU minutes), notebooks 03 and 05
    python scripts/run_notebooks.py --out executed/ 07   # keep the executed copy (outputs included)
    python scripts/run_notebooks.py --small --times assets/notebook_times.csv   # record each time (README)

Teachers can run it before a lab to check that every notebook runs on the class machines.

Design choices
- Progress goes to stderr when each cell starts and ends, with its time, so a notebook that stops
  somewhere says where.
- `--cell-timeout` bounds one cell (nbclient raises). A hang outside any cell (kernel start or shutdown)
  is not bounded by that: the caller bounds the whole run (tests/test_notebooks.py runs each notebook in its
  own process, with a timeout), and SIGUSR1 makes this process print every thread's stack (faulthandler)
  before it is killed. (A timed dump, `faulthandler.dump_traceback_later`, once crashed this process
  with SIGSEGV when it fired during a kernel start, so the dump is on request only.)
- A cell error prints the cell number and the error's name and value; the exit status is 1. A cell past
  its timeout, or a kernel that died, exits with 3 (HUNG), so a caller can tell a hang from a failure.
- `--times CSV` records each notebook that ran cleanly: its wall time from kernel start to shutdown, the
  configuration, the machine's CPU count and its load average as the run ended (other work slows a run); a notebook's row for that configuration is replaced, the
  others are kept. README's notebook table is rendered from that file (scripts/readme_tables.py).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import faulthandler
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
HUNG = 3  # exit status: a cell timed out or the kernel died


def find(names: list[str]) -> list[Path]:
    """Notebook paths from names: a path, a stem, or its number prefix ('03')."""
    everything = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return everything
    paths = []
    for name in names:
        if Path(name).is_file():
            paths.append(Path(name))
            continue
        matches = [p for p in everything if p.stem == name or p.stem.startswith(name + "_")]
        if len(matches) != 1:
            raise SystemExit(f"no single notebook matches {name!r}: expected a path, a stem or a number "
                             f"among {[p.stem for p in everything]}")
        paths.append(matches[0])
    return paths


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def execute(path: Path, cell_timeout: int, out: Path | None = None) -> str:
    """Run one notebook in a fresh kernel; write the executed copy to `out`.

    Returns "ok", "error" (a cell raised) or "hang" (a cell ran past `cell_timeout`, or the kernel died).
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    began, cell_began, current = time.perf_counter(), [0.0], [None]

    def on_start(cell, cell_index):  # nbclient calls this for markdown cells too
        if cell_index not in code:
            return
        cell_began[0], current[0] = time.perf_counter(), cell_index
        log(f"{path.stem}: cell {cell_index} ({code.index(cell_index) + 1}/{len(code)} code) started")

    def on_executed(cell, cell_index, execute_reply):  # on_cell_complete fires when the request is sent
        if cell_index in code:
            log(f"{path.stem}: cell {cell_index} done in {time.perf_counter() - cell_began[0]:.1f} s")

    client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_start=on_start, on_cell_executed=on_executed)
    log(f"{path.stem}: starting a kernel")
    status = "ok"
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        status = "error" if isinstance(e, CellExecutionError) else "hang"
        log(f"{path.stem}: cell {current[0]} failed ({type(e).__name__}):\n{str(e)[-3000:]}")
    log(f"{path.stem}: {'executed' if status == 'ok' else 'FAILED'} in {time.perf_counter() - began:.1f} s")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
    return status


TIME_FIELDS = ("notebook", "config", "seconds", "cpu_cores", "load_1min", "measured")


def load_average() -> str:
    """The 1-minute load average now ("" where the system has none): other work slows a run."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""


def record_times(path: Path, seconds: dict[str, float], config: str, loads: dict[str, str] | None = None) -> None:
    """Write each notebook's time into the CSV at `path`, replacing its earlier row for `config`."""
    rows = []
    if path.is_file():
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if not (r["config"] == config and r["notebook"] in seconds)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    rows += [{"notebook": name, "config": config, "seconds": f"{s:.1f}", "cpu_cores": cores,
              "load_1min": (loads or {}).get(name, ""), "measured": today}
             for name, s in seconds.items()]
    rows.sort(key=lambda r: (r["notebook"], r["config"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, TIME_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="paths, stems or numbers (default: every notebook)")
    parser.add_argument("--small", action="store_true", help="TWLAB_SMALL=1: the small CPU configuration")
    parser.add_argument("--out", type=Path, help="folder for the executed copies")
    parser.add_argument("--cell-timeout", type=int, default=900, help="seconds one cell may run (900)")
    parser.add_argument("--times", type=Path, help="CSV to record each clean run's wall time in")
    args = parser.parse_args(argv)
    paths = find(args.notebooks)
    if args.small:
        os.environ["TWLAB_SMALL"] = "1"
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is it stuck?
    results, seconds, loads = {}, {}, {}
    for p in paths:
        began = time.perf_counter()
        results[p.stem] = execute(p, args.cell_timeout, args.out / p.name if args.out else None)
        if results[p.stem] == "ok":
            seconds[p.stem], loads[p.stem] = time.perf_counter() - began, load_average()
    if args.times and seconds:
        record_times(args.times, seconds, "small" if args.small else "full", loads)
    failed = [name for name, status in results.items() if status != "ok"]
    if failed:
        log(f"failed: {', '.join(failed)}")
    if "error" in results.values():
        return 1
    return HUNG if failed else 0


if __name__ == "__main__":
    sys.exit(main())
