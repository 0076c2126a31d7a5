"""The longer tiny recipe (scripts/long_recipe.sh, README "A longer recipe"): its shipped table and models.

The table in assets/long/results.csv must follow from the shipped per-problem rows, and the shipped
checkpoints must reproduce those rows (greedy decoding is deterministic), so every number in the README's
table can be traced to a model in the repository.
"""

import csv
import subprocess
from pathlib import Path

import pytest

from twlib.eval import accuracy_by_k, compare, read_rows, summarize

ROOT = Path(__file__).resolve().parent.parent
LONG = ROOT / "assets" / "long"


def table():
    return {r["stage"]: r for r in csv.DictReader((LONG / "results.csv").open())}


def test_long_table_follows_from_its_rows():
    rows = table()
    assert set(rows) == {"parallel2", "parallel", "sequential", "base-long2"}
    seq = read_rows(LONG / "eval_sequential.csv")
    for stage, row in rows.items():
        results = read_rows(LONG / f"eval_{stage}.csv")
        s, c = summarize(results), compare(results, seq)
        assert int(row["problems"]) == s["problems"] == 500
        assert float(row["accuracy"]) == pytest.approx(100 * s["accuracy"], abs=0.01)
        assert float(row["parallel_rate"]) == pytest.approx(100 * s["parallel_rate"], abs=0.01)
        assert float(row["token_latency"]) == pytest.approx(s["mean_token_latency"], abs=0.01)
        assert float(row["speedup_mean"]) == pytest.approx(c["speedup"]["mean"], abs=1e-4)
        by_k = accuracy_by_k(results)
        assert row["correct_by_k"] == " ".join(f"k{k}:{a}/{n}" for k, (a, n) in by_k.items())
        assert sum(a for a, _ in by_k.values()) == sum(r.correct for r in results)
    # the claims the README makes of this table
    assert float(rows["sequential"]["accuracy"]) > 95 and float(rows["parallel2"]["accuracy"]) > 70
    assert float(rows["parallel2"]["speedup_mean"]) > 1.5


@pytest.mark.parametrize("name,stage,parallel", [("tiny-long-parallel", "parallel2", True),
                                                 ("tiny-long-sequential", "sequential", False)])
def test_shipped_long_checkpoints_reproduce_their_rows(name, stage, parallel):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, sequential_decoder
    from twlib.eval import evaluate
    from twlib.sft import eval_problems, load_config

    path = ROOT / "assets" / "checkpoints" / name
    tok = AutoTokenizer.from_pretrained(path)
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(path).eval(), tok)
    config = DecodeConfig(max_new_tokens=512)
    decoder = ParallelDecoder(engine, tok, config) if parallel else sequential_decoder(engine, tok, config)
    problems = eval_problems(load_config(ROOT / "configs" / "tiny-base.yaml"))[:8]
    ours = evaluate(decoder, problems, tok, batch_size=8, progress=False)
    theirs = read_rows(LONG / f"eval_{stage}.csv")[:8]
    assert [r.text for r in ours] == [r.text for r in theirs]


def test_long_recipe_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "long_recipe.sh")]).returncode == 0
