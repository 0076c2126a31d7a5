"""The claims table follows from the per-problem rows, and each rule can fail."""

import pytest

from twlib.claims import ClaimRules, claim_table, judge, multi_group_parallel_rate, wall_clock_speedup
from twlib.eval import ProblemResult


def row(i, k, correct, parallel, total, longest, seconds=1.0):
    return ProblemResult(id=f"p{i}", k=k, answer="x", predicted="x" if correct else "y", correct=correct,
                         valid=True, parallel=parallel, finished=True, flags="", total=total, longest=longest,
                         eta=1 - longest / total, threads=2 if parallel else 0, blocks=int(parallel),
                         seconds=seconds, text="")


def models(n=100, par_correct=97, seq_correct=97, par_longest=120, sft_parallel=50):
    sequential = [row(i, 1 + i % 5, i < seq_correct, False, 200, 200, 0.6) for i in range(n)]
    final = [row(i, 1 + i % 5, i < par_correct, i % 5 != 0, 240 if i % 5 else 200, par_longest if i % 5 else 200, 0.4)
             for i in range(n)]
    multi = [i for i in range(n) if i % 5 != 0]
    half = set(multi[: len(multi) * sft_parallel // 100])
    sft = [row(i, 1 + i % 5, i < par_correct, i in half, 240 if i in half else 200, par_longest if i in half else 200)
           for i in range(n)]
    return final, sequential, sft


def test_all_three_reproduced_and_printed():
    final, seq, sft = models()
    claims = judge(final, seq, ceiling=1.55, sft=sft, wall=(final, seq))
    assert [c.passed for c in claims] == [True, True, True]
    assert claims[1].measured["mean speed-up"] == pytest.approx(0.8 * 200 / 120 + 0.2)
    assert claims[1].measured["wall-clock speed-up"] == pytest.approx(1.5)
    assert claims[2].measured["multi-group parallel gain (points)"] == pytest.approx(50.0)
    text = claim_table(claims)
    assert "C1 parity  reproduced" in text and "rules:" in text and ">= 1.4x" in text


def test_each_rule_can_fail():
    final, seq, sft = models(par_correct=94, seq_correct=94)  # below 95%
    assert judge(final, seq, 1.55, sft, (final, seq))[0].passed is False
    final, seq, sft = models(par_correct=97, seq_correct=99)  # 2 points below sequential
    assert judge(final, seq, 1.55, sft, (final, seq))[0].passed is False
    final, seq, sft = models()
    assert judge(final, seq, 2.0, sft, (final, seq))[1].passed is False  # 1.53x < 90% of a 2.0x ceiling
    slow = [row(r.id[1:], r.k, r.correct, r.parallel, r.total, r.longest, 0.55) for r in final]
    assert judge(final, seq, 1.55, sft, (slow, seq))[1].passed is False  # wall clock 1.09x
    final, seq, sft = models(sft_parallel=95)  # RL added too little parallelism (+5 points, +0.03x)
    assert judge(final, seq, 1.55, sft, (final, seq))[2].passed is False
    worse = [row(r.id[1:], r.k, r.correct and i < 95, r.parallel, r.total, r.longest) for i, r in enumerate(final)]
    assert judge(worse, seq, 1.55, sft, (worse, seq))[2].passed is False  # 2 points below its SFT model


def test_missing_parts_are_not_judged_and_rules_are_settable():
    final, seq, _ = models()
    claims = judge(final, seq, 1.6)
    assert [c.passed for c in claims] == [True, None, None] and "not judged" in claim_table(claims)
    strict = ClaimRules(min_accuracy=99.0)
    assert judge(final, seq, 1.6, rules=strict)[0].passed is False


def test_helpers():
    final, seq, sft = models(sft_parallel=25)
    assert multi_group_parallel_rate(final) == 100.0 and multi_group_parallel_rate(sft) == 25.0
    with pytest.raises(ValueError, match="same problems"):
        wall_clock_speedup(final[:3], seq[1:4])
