"""twlib.eval: grading, summaries and the paper's speed-up definitions, on oracle-decoded problems."""

import pytest

from twlib.decoding import DecodeConfig, ParallelDecoder, sequential_decoder
from twlib.eval import ProblemResult, accuracy_by_k, compare, evaluate, pareto_figure, read_rows, speedup_histogram, summarize, write_rows
from twlib.format import path_stats
from twlib.tasks import generate
from twlib.tokenizer import build_tokenizer
from test_decoding import OracleEngine, oracle_for


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    problems = generate("groupsum", 24, seed=9)
    par_table, seq_table = {}, {}
    for p in problems:  # two oracle "models": one answers with the parallel, one with the sequential form
        par_table.update(oracle_for(p.parallel, p.prompt, tok)[0].table)
        seq_table.update(oracle_for(p.sequential, p.prompt, tok)[0].table)
    config = DecodeConfig(max_new_tokens=5000)
    par = evaluate(ParallelDecoder(OracleEngine(par_table), tok, config), problems, tok, progress=False)
    seq = evaluate(sequential_decoder(OracleEngine(seq_table), tok, config), problems, tok, progress=False)
    return tok, problems, par, seq


def test_perfect_trajectories_score_perfectly(setup):
    tok, problems, par, seq = setup
    s = summarize(par)
    assert s["accuracy"] == 1.0 and s["format_valid"] == 1.0 and s["flagged"] == 0.0
    assert s["parallel_rate"] == pytest.approx(sum(p.parallel != p.sequential for p in problems) / len(problems))
    assert summarize(seq)["parallel_rate"] == 0.0


def test_speedup_is_a_mean_of_per_problem_ratios(setup):
    tok, problems, par, seq = setup
    c = compare(par, seq)
    want = [path_stats(p.sequential).total / path_stats(p.parallel).longest for p in problems]
    assert c["speedup"]["mean"] == pytest.approx(sum(want) / len(want))
    assert c["speedup"]["max"] == pytest.approx(max(want))
    assert c["speedup_correct"]["mean"] == pytest.approx(c["speedup"]["mean"])  # all correct
    assert c["accuracy_parallel"] == c["accuracy_sequential"] == 1.0


def test_wrong_answers_are_graded_wrong(setup):
    tok, problems, par, seq = setup
    wrong = [p.__class__(**{**p.__dict__, "answer": p.answer[:-1] + str((int(p.answer[-1]) + 1) % 10)}) for p in problems[:5]]
    table = {}
    for p in problems[:5]:
        table.update(oracle_for(p.parallel, p.prompt, tok)[0].table)
    rows = evaluate(ParallelDecoder(OracleEngine(table), tok, DecodeConfig(max_new_tokens=5000)), wrong, tok,
                    progress=False)
    assert summarize(rows)["accuracy"] == 0.0


def test_rows_round_trip_and_figures(setup, tmp_path):
    tok, problems, par, seq = setup
    write_rows(tmp_path / "rows.csv", par)
    assert read_rows(tmp_path / "rows.csv") == par
    assert len(speedup_histogram(par, seq).data) == 2
    assert len(pareto_figure({"a": (1, 2)}, {"b": (3, 4)}).data) == 2
    with pytest.raises(ValueError):
        compare(par[:3], seq[1:4])


def test_accuracy_by_k_counts_per_number_of_groups():
    def row(k, correct):
        return ProblemResult(id="p", k=k, answer="", predicted=None, correct=correct, valid=True, parallel=False,
                             finished=True, flags="", total=1, longest=1, eta=0.0, threads=0, blocks=0,
                             seconds=0.0, text="")

    rows = [row(3, True), row(1, False), row(3, False), row(1, True), row(None, True), row(3, True)]
    assert accuracy_by_k(rows) == {1: (1, 2), 3: (2, 3), None: (1, 1)}
    assert list(accuracy_by_k(rows)) == [1, 3, None]  # in order of k, problems without k last


def test_math_problems_are_graded_with_math_verify():
    """`task: math` rows go to math-verify (twlib.rewards.is_correct): 0.5 is right for \\frac{1}{2}, which exact
    match would reject, and 0.25 is wrong."""
    from twlib.tasks import Problem

    tok = build_tokenizer()
    rows = []
    for boxed in ("0.5", "0.25"):
        response = f"<think>\nhalf of it\n</think>\n\n\\boxed{{{boxed}}}"
        p = Problem(f"half-{boxed}", "math", "3/6 in lowest terms?", "3/6 in lowest terms?\n", response, response,
                    "\\frac{1}{2}")
        decoder = sequential_decoder(oracle_for(response, p.prompt, tok)[0], tok, DecodeConfig(max_new_tokens=500))
        rows += evaluate(decoder, [p], tok, progress=False)
    assert [(r.predicted, r.correct) for r in rows] == [("0.5", True), ("0.25", False)]


def test_command_line_errors_name_the_problem(tmp_path, capsys):
    from twlib.eval import main

    assert main(["--model", str(tmp_path), "--data", str(tmp_path / "missing.parquet")]) == 2
    assert "missing.parquet: no such file" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--data", str(tmp_path / "x.parquet"), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
