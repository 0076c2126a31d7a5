"""Rewards for P-GRPO: correctness plus an acceleration bonus that is paid only when the answer is right.

    r(y) = R_correct(y) + 1[correct] * R_accel(y)

Design choices
- Correctness is the task's grader: `twlib.tasks.grade` for the synthetic tasks (exact match of the last
  `\\boxed{}` after `</think>`, commas stripped for `multiply`); `task="math"` uses `math-verify` on the last
  `\\boxed{}` of the answer part (after `</think>`), as the reference's MATH grader does. Missing, unclosed
  or garbage answers score as incorrect; nothing here ever raises on model output.
- Three acceleration forms, selected by name, because the paper, its code and its README disagree
  (spec section 5; the project default is the paper's):
      "paper"   (Eq. 7)       R_accel = min(rho * eta, rho_clip)          eta = 1 - L/T
      "code"    (reference)   R_accel = rho * min(eta, rho_clip)
      "readme"  (RL README)   R_accel = rho * min(T/L - 1, rho_clip)      T/L = self-parallelism
  with rho = 0.5 and rho_clip = 0.2 by default; T = total response tokens, L = critical path (response
  tokens only: `twlib.format.path_stats`, see the spec's Decision in section 3).
- Incorrect answers get `incorrect_reward`: 0 (paper, README) by default, -1 (reference code) selectable.
- A sequential trajectory has L = T, eta = 0: every form gives it no bonus, so the bonus rewards
  parallelism only, never shortness (a short sequential answer earns exactly 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twlib.format import PathStats, path_stats

ACCELERATION_FORMS = ("paper", "code", "readme", "none")


@dataclass(frozen=True)
class RewardConfig:
    task: str = "groupsum"  # "groupsum" | "multiply" | "math"
    acceleration: str = "paper"  # one of ACCELERATION_FORMS
    rho: float = 0.5
    rho_clip: float = 0.2
    correct_reward: float = 1.0
    incorrect_reward: float = 0.0  # the reference code uses -1.0

    def __post_init__(self):
        if self.acceleration not in ACCELERATION_FORMS:
            raise ValueError(f"RewardConfig.acceleration must be one of {ACCELERATION_FORMS}, "
                             f"got {self.acceleration!r}")
        if self.rho < 0 or self.rho_clip < 0:
            raise ValueError("RewardConfig.rho and rho_clip must be >= 0")


@dataclass(frozen=True)
class Reward:
    total: float
    correct: bool
    acceleration: float  # the bonus actually paid (0 when incorrect)
    eta: float
    self_parallelism: float  # T/L (not a speed-up: that is eval.compare's T_seq/L)


def acceleration_reward(stats: PathStats, form: str = "paper", rho: float = 0.5, rho_clip: float = 0.2) -> float:
    """The acceleration bonus of one trajectory (before the correctness gate)."""
    if form == "paper":
        # Eq. 7: min(rho * eta, rho_clip)
        return min(rho * stats.eta, rho_clip)
    if form == "code":
        # reference code: rho * min(eta, rho_clip)
        return rho * min(stats.eta, rho_clip)
    if form == "readme":
        # RL README: factor * min(acceleration_ratio - 1, clip_max), acceleration ratio = T / L
        return rho * min(stats.self_parallelism - 1.0, rho_clip)
    if form == "none":
        return 0.0
    raise ValueError(f"unknown acceleration form {form!r}: expected one of {ACCELERATION_FORMS}")


def _last_boxed_after_think(text: str) -> str | None:
    from twlib.tasks import extract_answer

    return extract_answer(text)


def math_correct(response: Any, answer: Any) -> bool:
    """`math-verify` on the last `\\boxed{}` after `</think>` against the ground truth. Never raises."""
    try:
        got = _last_boxed_after_think(response)
        if got is None or answer is None:
            return False
        from math_verify import parse, verify

        gold = parse(f"${answer}$")
        pred = parse(f"${got}$")
        return bool(gold) and bool(pred) and bool(verify(gold, pred))
    except ImportError as e:  # the grader itself is missing: that is a set-up error, say so
        raise ImportError("task='math' needs math-verify, the `math` extra: pip install -e \".[math]\" "
                          "(or pip install 'math-verify>=0.7')") from e
    except Exception:  # noqa: BLE001 - model output must never crash a training step
        return False


def is_correct(response: Any, answer: Any, task: str) -> bool:
    if task == "math":
        return math_correct(response, answer)
    from twlib.tasks import grade

    return grade(response, answer, task=task)


def score(response: str, answer: Any, config: RewardConfig = RewardConfig(), stats: PathStats | None = None,
          tokenizer=None) -> Reward:
    """Reward of one rollout. `stats` defaults to `path_stats(response)` (token counts need `tokenizer`)."""
    if stats is None:
        stats = path_stats(response, tokenizer) if tokenizer is not None else path_stats(response)
    correct = is_correct(response, answer, config.task)
    bonus = acceleration_reward(stats, config.acceleration, config.rho, config.rho_clip) if correct else 0.0
    total = (config.correct_reward + bonus) if correct else config.incorrect_reward
    return Reward(total=float(total), correct=bool(correct), acceleration=float(bonus),
                  eta=float(stats.eta), self_parallelism=float(stats.self_parallelism))
