"""The main job runs end to end on a small configuration and writes its tables."""

import csv

from twlib.cli import main
from twlib.infra.problems import load_parquet


def test_demo_small(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--n-train", "60", "--n-eval", "40"]) == 0
    out = capsys.readouterr().out
    assert "oracle ceiling" in out and "calls per trajectory" in out
    rows = list(csv.DictReader((tmp_path / "ceiling.csv").open()))
    assert rows[-1]["k"] == "all" and int(rows[-1]["n"]) == 40
    stats = list(csv.DictReader((tmp_path / "trie_stats.csv").open()))
    assert len(stats) == 60
    assert all(int(r["trie_tokens"]) <= int(r["separate_tokens"]) for r in stats)
    assert len(load_parquet(tmp_path / "data" / "groupsum-train.parquet")) == 60


def test_data_command(tmp_path):
    assert main(["data", "--task", "multiply", "--n-train", "5", "--n-eval", "3", "--out", str(tmp_path)]) == 0
    assert len(load_parquet(tmp_path / "multiply-eval.parquet")) == 3


def test_eval_command_on_the_toy_checkpoint(tmp_path, capsys):
    from pathlib import Path

    toy = Path(__file__).resolve().parent.parent / "assets" / "checkpoints" / "toy-parallel"
    out = tmp_path / "rows.csv"
    assert main(["eval", "--model", str(toy), "--parallel", "--n", "4", "--batch-size", "2",
                 "--max-new-tokens", "64", "--out", str(out)]) == 0
    assert "4 problems, accuracy" in capsys.readouterr().out
    assert len(list(csv.DictReader(out.open()))) == 4
