"""The main job end to end on a tiny configuration: every stage trains a few steps, decodes, evaluates."""

import csv

import pytest

from twlib.pipeline import PipelineConfig, run


@pytest.mark.slow
def test_pipeline_end_to_end_tiny(tmp_path, capsys):
    overrides = ("model=tiny", "max_steps=2", "n_train=16", "n_eval=8", "checkpoint_every=1", "log_every=1")
    cfg = PipelineConfig(out=str(tmp_path / "run"), n_eval=6, wall_problems=2, eval_batch=3,
                         max_new_tokens=48, progress=False, overrides=overrides)
    rows = run(cfg)
    assert [r["model"] for r in rows] == ["parallel", "sequential", "causal", "base"]
    for stage in ("base", "parallel", "sequential", "causal"):
        assert (tmp_path / "run" / stage / "final" / "config.json").is_file()
    table = list(csv.DictReader((tmp_path / "run" / "results.csv").open()))
    assert len(table) == 4 and all(0 <= float(r["accuracy"]) <= 100 for r in table)
    out = capsys.readouterr().out
    assert "paper (Qwen3-8B" in out
    # a second run skips every finished stage
    run(cfg)
    assert capsys.readouterr().out.count("done already") == 4
