"""A run's per-step metrics: `metrics.csv` always, TensorBoard event files when asked (`tensorboard: true`).

    log = MetricsLog(out_dir, fields, start_step=start, tensorboard=config.tensorboard)
    log.write({"step": 1, "loss": 2.3, ...})       # one row per step, flushed: a crash loses nothing
    log.close()
    tensorboard --logdir out_dir/tensorboard       # offline: event files on local disk, no account, no network

Design choices
- The CSV stays the record (the notebooks, the README tables and the tests read it); TensorBoard is a
  view of the same rows for long runs, every numeric field a scalar under its own name, x = `step`.
- Resume: rows after the checkpoint's step are dropped from the CSV (`truncate_metrics`) and TensorBoard
  is told to purge events after that step (`purge_step`), so a resumed run shows one curve, not two.
- Only the main rank writes (`enabled=False` elsewhere): the rows are already all-reduced.
- TensorBoard is an optional package (`pip install tensorboard`, in the lab's install); asking for it
  without the package is a clear error at start, not a failure hours in.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from twlib.checkpoint import truncate_metrics
from twlib.config import ConfigError

METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


def tensorboard_writer(log_dir: Path, purge_step: int | None = None):
    """`torch.utils.tensorboard.SummaryWriter`, or a ConfigError that says what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("tensorboard: true needs the tensorboard package: pip install tensorboard "
                          f"({e})") from None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def scalar(value) -> float | None:
    """A finite number (also from a formatted string such as an lr "1e-04"), else None."""
    if isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class MetricsLog:
    """Append rows to `out_dir/metrics.csv` (header once) and, with `tensorboard`, to event files."""

    def __init__(self, out_dir: str | Path, fields: list[str], start_step: int = 0, tensorboard: bool = False,
                 enabled: bool = True):
        self.fields, self.enabled = list(fields), enabled
        self.file = self.writer = self.board = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        if tensorboard:  # first: a missing package fails before any file is touched
            self.board = tensorboard_writer(out_dir / TENSORBOARD_DIR, purge_step=start_step + 1 if start_step else None)
        self.path = out_dir / METRICS_FILE
        if start_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run: no rows of an earlier one
        truncate_metrics(self.path, start_step, self.fields)
        self.file = self.path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.fields)
        if self.path.stat().st_size == 0:
            self.writer.writeheader()

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.writer.writerow(row)
        self.file.flush()
        if self.board is not None:
            step = int(row["step"])
            for name, value in row.items():
                value = scalar(value)
                if name != "step" and value is not None:
                    self.board.add_scalar(name, value, global_step=step)
            self.board.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.board is not None:
            self.board.close()
            self.board = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
