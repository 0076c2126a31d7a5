"""The paper's three claims, judged from per-problem rows by rules printed with the verdict.

    C1 parity   the parallel model is as accurate as the sequential one
    C2 speed    its critical path is much shorter (tokens and wall clock), close to the task's ceiling
    C3 RL       P-GRPO with the acceleration reward makes the model more parallel at equal accuracy

Design choices
- Every number in a verdict is recomputed here from `twlib.eval.ProblemResult` rows (the CSV files a
  run writes), never passed in by hand, so a table and its rows cannot disagree.
- The thresholds are a dataclass (`ClaimRules`) and are printed under the table, so a reader sees what
  "reproduced" means; the defaults are the project's (issue 12), chosen to leave a margin against float
  rounding on another CPU, not the paper's values (its model and benchmarks are different).
- Accuracies are compared in percentage points; speed-ups are means of per-problem ratios
  (sequential model's tokens / parallel model's critical path, `twlib.eval.speedups`), as in the paper.
- "Parallel rate on multi-group problems" counts problems whose answer needs 2+ groups (`k >= 2`): the
  only ones with something to parallelise.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Sequence

from twlib.eval import ProblemResult, speedups

__all__ = ["ClaimRules", "Claim", "judge", "claim_table", "multi_group_parallel_rate", "wall_clock_speedup"]


@dataclass(frozen=True)
class ClaimRules:
    """Thresholds of the three claims (percentages in points, speed-ups as factors)."""

    min_accuracy: float = 95.0        # C1: parallel accuracy at least this
    max_accuracy_gap: float = 1.0     # C1: and no more than this below the sequential model
    min_speedup: float = 1.4          # C2: mean token-latency speed-up at least this
    min_ceiling_fraction: float = 0.9  # C2: and at least this fraction of the oracle ceiling
    min_wall_speedup: float = 1.25    # C2: wall-clock speed-up at batch 1 at least this
    min_speedup_gain: float = 0.15    # C3: P-GRPO raises the mean speed-up by this much ...
    min_parallel_gain: float = 30.0   # C3: ... or the parallel rate on multi-group problems by this many points
    max_rl_accuracy_drop: float = 1.0  # C3: with accuracy no more than this below its starting model

    def text(self) -> list[str]:
        return [
            f"C1 parity: parallel accuracy >= {self.min_accuracy:g}% and no more than {self.max_accuracy_gap:g} "
            "point below the sequential model",
            f"C2 speed: mean token-latency speed-up >= {self.min_speedup:g}x and >= "
            f"{100 * self.min_ceiling_fraction:g}% of the oracle ceiling; wall-clock speed-up at batch 1 "
            f">= {self.min_wall_speedup:g}x",
            f"C3 RL: P-GRPO raises the mean speed-up by >= {self.min_speedup_gain:g}x or the parallel rate on "
            f"multi-group problems by >= {self.min_parallel_gain:g} points over its starting model, with "
            f"accuracy no more than {self.max_rl_accuracy_drop:g} point lower",
        ]


@dataclass
class Claim:
    name: str
    passed: bool | None  # None: not judged (a model or a measurement is missing)
    measured: dict = field(default_factory=dict)
    why: str = ""

    @property
    def verdict(self) -> str:
        return {True: "reproduced", False: "NOT reproduced", None: "not judged"}[self.passed]


def accuracy(rows: Sequence[ProblemResult]) -> float:
    return 100 * sum(r.correct for r in rows) / len(rows)


def mean_speedup(parallel: Sequence[ProblemResult], sequential: Sequence[ProblemResult]) -> float:
    return statistics.fmean(speedups(parallel, sequential))


def multi_group_parallel_rate(rows: Sequence[ProblemResult]) -> float:
    """Percentage of the problems with k >= 2 whose response has at least one block."""
    multi = [r for r in rows if (r.k or 0) >= 2]
    return 100 * sum(r.parallel for r in multi) / len(multi) if multi else float("nan")


def wall_clock_speedup(parallel: Sequence[ProblemResult], sequential: Sequence[ProblemResult]) -> float:
    """Total sequential seconds / total parallel seconds, on the same problems (batch 1)."""
    if [r.id for r in parallel] != [r.id for r in sequential]:
        raise ValueError("wall-clock rows must cover the same problems in the same order")
    return sum(r.seconds for r in sequential) / max(sum(r.seconds for r in parallel), 1e-9)


def judge(final: Sequence[ProblemResult], sequential: Sequence[ProblemResult], ceiling: float,
          sft: Sequence[ProblemResult] | None = None, wall: tuple | None = None,
          rules: ClaimRules = ClaimRules()) -> list[Claim]:
    """C1, C2 on the final parallel model vs the sequential one; C3 on the step from `sft` to `final`.

    `ceiling`: the oracle's mean speed-up on the same problems (`twlib.eval.oracle_ceiling`).
    `wall`: (parallel rows, sequential rows) decoded one problem at a time, or None.
    """
    acc_p, acc_s = accuracy(final), accuracy(sequential)
    c1 = Claim("C1 parity", acc_p >= rules.min_accuracy and acc_p >= acc_s - rules.max_accuracy_gap,
               {"parallel accuracy %": acc_p, "sequential accuracy %": acc_s})
    up = mean_speedup(final, sequential)
    measured = {"mean speed-up": up, "oracle ceiling": ceiling, "of ceiling %": 100 * up / ceiling}
    passed = up >= rules.min_speedup and up >= rules.min_ceiling_fraction * ceiling
    if wall is None:
        c2 = Claim("C2 speed", None, measured, "no wall-clock measurement")
    else:
        measured["wall-clock speed-up"] = wall_clock_speedup(*wall)
        c2 = Claim("C2 speed", passed and measured["wall-clock speed-up"] >= rules.min_wall_speedup, measured)
    if sft is None:
        c3 = Claim("C3 RL", None, {}, "no P-GRPO run")
    else:
        gain = up - mean_speedup(sft, sequential)
        par_gain = multi_group_parallel_rate(final) - multi_group_parallel_rate(sft)
        drop = accuracy(sft) - acc_p
        c3 = Claim("C3 RL", (gain >= rules.min_speedup_gain or par_gain >= rules.min_parallel_gain)
                   and drop <= rules.max_rl_accuracy_drop,
                   {"speed-up gain": gain, "multi-group parallel gain (points)": par_gain,
                    "accuracy change (points)": -drop})
    return [c1, c2, c3]


def claim_table(claims: Sequence[Claim], rules: ClaimRules = ClaimRules(), paper: dict | None = None) -> str:
    """The verdicts, what was measured, and the rules, as plain text."""
    lines = []
    for c in claims:
        values = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in c.measured.items())
        lines.append(f"{c.name:<10} {c.verdict:<15} {values}{'  (' + c.why + ')' if c.why else ''}")
    if paper:
        lines.append("paper (Qwen3-8B): " + ", ".join(f"{k} {v}" for k, v in paper.items()))
    lines.append("rules:")
    lines += [f"  {t}" for t in rules.text()]
    return "\n".join(lines)
