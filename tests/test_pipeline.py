"""The main job end to end on a tiny configuration: every stage trains a few steps, decodes, evaluates."""

import csv

import pytest

from twlib.pipeline import PipelineConfig, run


@pytest.mark.slow
def test_pipeline_end_to_end_tiny(tmp_path, capsys):
    overrides = ("model=tiny", "max_steps=2", "n_train=16", "n_eval=8", "checkpoint_every=1", "log_every=1")
    cfg = PipelineConfig(out=str(tmp_path / "run"), n_eval=6, wall_problems=2, eval_batch=3,
                         max_new_tokens=48, progress=False, overrides=overrides, pgrpo=True,
                         pgrpo_overrides=("steps=1", "prompts_per_step=1", "rollouts_per_prompt=2",
                                          "max_new_tokens=48", "max_thread_tokens=24", "n_train=16"))
    rows = run(cfg)
    assert [r["model"] for r in rows] == ["parallel", "sequential", "causal", "base", "pgrpo"]
    for stage in ("base", "parallel", "sequential", "causal"):
        assert (tmp_path / "run" / stage / "final" / "config.json").is_file()
    table = list(csv.DictReader((tmp_path / "run" / "results.csv").open()))
    assert len(table) == 5 and all(0 <= float(r["accuracy"]) <= 100 for r in table)
    out = capsys.readouterr().out
    assert "paper (Qwen3-8B" in out
    # a second run skips every finished stage
    run(cfg)
    assert capsys.readouterr().out.count("done already") == 5


def test_from_assets_evaluates_the_shipped_checkpoints(tmp_path, capsys):
    """`python -m twlib pipeline --from-assets`: no training, the shipped models decode and match their CSV."""
    from twlib.cli import main

    assert main(["pipeline", "--from-assets", "--out", str(tmp_path), "--n-eval", "12", "--wall-problems", "2"]) == 0
    table = {r["model"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert set(table) == {"parallel", "sequential"}
    assert float(table["parallel"]["parallel_rate"]) > 50 and float(table["sequential"]["parallel_rate"]) == 0
    assert float(table["parallel"]["token_latency"]) < float(table["sequential"]["token_latency"])
    # the shipped per-problem rows were produced by these very checkpoints: the first 12 decode identically
    from pathlib import Path

    from twlib.eval import read_rows

    assets = Path(__file__).resolve().parent.parent / "assets" / "results"
    for name in ("parallel", "sequential"):
        ours = read_rows(tmp_path / f"eval_{name}.csv")
        theirs = read_rows(assets / f"eval_{name}.csv")[:12]
        assert [r.text for r in ours] == [r.text for r in theirs]
    assert "done already" not in capsys.readouterr().out


def test_from_assets_long_evaluates_the_longer_recipes_models(tmp_path, capsys):
    """`--from-assets --long`: the tiny-long-* checkpoints, which reproduce assets/long's per-problem rows."""
    from pathlib import Path

    from twlib.cli import main
    from twlib.eval import read_rows

    assert main(["pipeline", "--from-assets", "--long", "--out", str(tmp_path), "--n-eval", "12",
                 "--wall-problems", "2"]) == 0
    table = {r["model"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert float(table["parallel"]["accuracy"]) > 90 and float(table["sequential"]["accuracy"]) > 90
    assert "train_min" not in table["parallel"]  # the demo recipe's training times do not apply
    assets = Path(__file__).resolve().parent.parent / "assets" / "long"
    for name, stage in (("parallel", "parallel2"), ("sequential", "sequential")):
        ours = read_rows(tmp_path / f"eval_{name}.csv")
        assert [r.text for r in ours] == [r.text for r in read_rows(assets / f"eval_{stage}.csv")[:12]]
    # --long trains nothing: without --from-assets it is refused with the way to train it
    capsys.readouterr()
    assert main(["pipeline", "--long", "--out", str(tmp_path / "x")]) == 2
    assert "scripts/long_recipe.sh" in capsys.readouterr().err
