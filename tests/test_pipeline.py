"""The main job: its stages on a tiny configuration, the shipped models against their shipped rows, and the
claims table against the rows it was computed from."""

import csv
import json
from pathlib import Path

import pytest

from twlib.claims import judge
from twlib.eval import read_rows
from twlib.pipeline import ASSET_NAMES, FORCED, FORCED_PREFIX, PipelineConfig, run

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "assets" / "results"


@pytest.mark.slow
def test_pipeline_end_to_end_tiny(tmp_path, capsys):
    """Every stage of the main job from the shipped base: a few steps each, then evaluation and claims."""
    overrides = ("max_steps=2", "n_train=16", "checkpoint_every=1", "log_every=1")
    cfg = PipelineConfig(out=str(tmp_path / "run"), n_eval=6, wall_problems=2, eval_batch=3,
                         max_new_tokens=48, progress=False, overrides=overrides,
                         pgrpo_overrides=("steps=1", "prompts_per_step=1", "rollouts_per_prompt=2",
                                          "max_new_tokens=48", "max_thread_tokens=24", "n_train=16"))
    rows = run(cfg)
    assert [r["model"] for r in rows] == ["base", "parallel", "pgrpo", "sequential", "causal", "parallel_forced",
                                          "causal_forced"]
    for stage in ("parallel", "sequential", "causal", "pgrpo"):
        assert (tmp_path / "run" / stage / "final" / "config.json").is_file()
    table = list(csv.DictReader((tmp_path / "run" / "results.csv").open()))
    assert len(table) == 7 and all(0 <= float(r["accuracy"]) <= 100 for r in table)
    claims = json.loads((tmp_path / "run" / "claims.json").read_text())
    assert [c["name"] for c in claims["claims"]] == ["C1 parity", "C2 speed", "C3 RL"]
    out = capsys.readouterr().out
    assert "the paper's claims" in out and "rules:" in out and "/work/" not in out
    # the saved stage configs name the base by a relative path (no machine-specific folder)
    assert "model: assets/checkpoints/tiny-base" in (tmp_path / "run" / "parallel" / "final" / "train_config.yaml").read_text()
    # a second run skips every finished stage
    run(cfg)
    assert capsys.readouterr().out.count("done already") == 4


def test_pipeline_without_a_base_says_where_it_ships(tmp_path):
    cfg = PipelineConfig(out=str(tmp_path / "x"), base=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="assets/checkpoints/tiny-base"):
        run(cfg)


def test_from_assets_reproduces_the_shipped_rows(tmp_path, capsys):
    """`python -m twlib pipeline --from-assets`: the shipped models decode exactly their shipped rows."""
    from twlib.cli import main

    assert main(["pipeline", "--from-assets", "--out", str(tmp_path), "--n-eval", "12", "--wall-problems", "2"]) == 0
    table = {r["model"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert set(table) == set(ASSET_NAMES) | set(FORCED)
    for name in [*ASSET_NAMES, *FORCED]:
        ours = read_rows(tmp_path / f"eval_{name}.csv")
        theirs = read_rows(RESULTS / f"eval_{name}.csv")[:12]
        assert [r.id for r in ours] == [r.id for r in theirs]
        assert [r.text for r in ours] == [r.text for r in theirs], name
    assert "done already" not in capsys.readouterr().out
    forced = read_rows(tmp_path / "eval_parallel_forced.csv")
    assert all(r.text.startswith(FORCED_PREFIX) for r in forced)


def test_shipped_claims_follow_from_the_shipped_rows():
    """assets/results/claims.json is what twlib.claims computes from the shipped per-problem rows."""
    shipped = json.loads((RESULTS / "claims.json").read_text())
    rows = {name: read_rows(RESULTS / f"eval_{name}.csv") for name in ("parallel", "pgrpo", "sequential")}
    wall = (read_rows(RESULTS / "wall_pgrpo.csv"), read_rows(RESULTS / "wall_sequential.csv"))
    assert len(rows["pgrpo"]) == 500 and len(wall[0]) == 100
    claims = judge(rows["pgrpo"], rows["sequential"], shipped["oracle_ceiling"], sft=rows["parallel"], wall=wall)
    for ours, theirs in zip(claims, shipped["claims"]):
        assert ours.verdict == theirs["verdict"]
        assert ours.measured == pytest.approx(theirs["measured"])
    assert shipped["command"].startswith("python -m twlib pipeline")
    # the results table is the same rows' summary
    table = {r["model"]: r for r in csv.DictReader((RESULTS / "results.csv").open())}
    for name, result in rows.items():
        assert float(table[name]["accuracy"]) == pytest.approx(100 * sum(r.correct for r in result) / len(result), abs=1e-3)


def test_shipped_seed_table_follows_from_its_runs_rows():
    """assets/results/seeds.csv: every seed's verdicts recomputed from the rows shipped for that seed."""
    from helpers import load_script

    seeds = load_script("seeds")
    table = list(csv.DictReader((RESULTS / "seeds.csv").open()))
    assert len(table) >= 3
    for row in table:
        run = RESULTS if row["seed"] == "0" else RESULTS / "seeds" / f"seed{row['seed']}"
        ours = seeds.seed_row(int(row["seed"]), run)
        for key in ("C1", "C2", "C3", "accuracy_pgrpo", "accuracy_sequential", "speedup_pgrpo", "wall_clock_speedup"):
            assert str(ours[key]) == row[key], (row["seed"], key)
