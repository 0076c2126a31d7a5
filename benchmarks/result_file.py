"""A benchmark's result file: every number it prints, plus how, when and on what machine it was measured.

    recorder = ResultFile("decode", argv)   # at the start: command line, date, machine, load before
    ...                                      # the benchmark runs and prints its table
    recorder.save(args.out, rows=[...], setup={...})   # load after, then one JSON file

Design choices:
- JSON, one file per benchmark run (assets/benchmarks/NAME.json): rows are a list of dicts, one per printed
  table row, under the printed column's meaning; `setup` holds the run's fixed facts (models, n, ...).
- The 1-minute load average is read before and after the run (`os.getloadavg()`): the lab's machine is
  shared, and a reader needs to know how busy it was to judge a wall-clock number.
- Paths inside the repository are written relative to it, so a file carries no machine-specific path.
- scripts/readme_tables.py renders README's benchmark section from these files (no number typed by hand).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def repo_path(path) -> str:
    """`path` relative to the repository when it lies inside it (no machine path in a committed file)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def load_1min() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_count": os.cpu_count(), "usable_cpus": usable, "cpu_model": cpu_model(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "niceness": os.nice(0) if hasattr(os, "nice") else None}


class ResultFile:
    def __init__(self, benchmark: str, argv=None):
        args = sys.argv[1:] if argv is None else list(argv)
        self.record = {"benchmark": benchmark,
                       "command": shlex.join([f"benchmarks/{benchmark}.py", *(repo_path(a) if os.sep in a else a
                                                                             for a in args)]),
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "machine": machine(), "load_1min_before": load_1min()}

    def save(self, path, rows: list[dict], **extra) -> None:
        """Write the file; `extra` holds the run's other printed numbers and its fixed facts."""
        if path is None:
            return
        self.record.update(extra, rows=rows, load_1min_after=load_1min())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.record, indent=1) + "\n")
        print(f"wrote {path}")
