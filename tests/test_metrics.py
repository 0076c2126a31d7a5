"""twlib.metrics: metrics.csv plus optional TensorBoard event files, read back with TensorBoard's reader."""

import csv

import pytest

from twlib.config import ConfigError
from twlib.metrics import TENSORBOARD_DIR, MetricsLog

FIELDS = ["step", "loss", "lr", "note"]


def scalars(out_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out_dir / TENSORBOARD_DIR))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_rows_go_to_the_csv_and_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLog(tmp_path, FIELDS, tensorboard=True) as log:
        for step in (1, 2, 3):
            log.write({"step": step, "loss": 1.0 / step, "lr": 0.1, "note": "text is not a scalar"})
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert scalars(tmp_path, "loss") == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "lr"]


def test_a_resumed_run_rewrites_the_steps_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLog(tmp_path, FIELDS, tensorboard=True) as log:
        for step in (1, 2, 3):  # steps 2 and 3 were lost with the crash (checkpoint at step 1)
            log.write({"step": step, "loss": float(step), "lr": 0.1, "note": ""})
    with MetricsLog(tmp_path, FIELDS, start_step=1, tensorboard=True) as log:
        for step in (2, 3):
            log.write({"step": step, "loss": 10.0 * step, "lr": 0.1, "note": ""})
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "1.0"), ("2", "20.0"), ("3", "30.0")]
    assert scalars(tmp_path, "loss") == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_a_fresh_run_starts_a_new_csv_and_other_ranks_write_nothing(tmp_path):
    with MetricsLog(tmp_path, FIELDS) as log:
        log.write({"step": 1, "loss": 1.0, "lr": 0.1, "note": ""})
    with MetricsLog(tmp_path, FIELDS) as log:
        log.write({"step": 1, "loss": 5.0, "lr": 0.1, "note": ""})
    assert [r["loss"] for r in csv.DictReader((tmp_path / "metrics.csv").open())] == ["5.0"]
    other = tmp_path / "rank1"
    with MetricsLog(other, FIELDS, tensorboard=True, enabled=False) as log:
        log.write({"step": 1, "loss": 1.0, "lr": 0.1, "note": ""})
    assert not other.exists()
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_asking_for_tensorboard_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        MetricsLog(tmp_path, FIELDS, tensorboard=True)


def test_the_sft_trainer_logs_its_rows_to_tensorboard(tmp_path):
    """`tensorboard: true` in an SFT run: every metrics.csv row's loss is a TensorBoard scalar at its step."""
    pytest.importorskip("tensorboard")
    from test_sft import config

    from twlib.train.sft import train

    train(config(tmp_path, tensorboard=True), quiet=True)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(rows) == 4
    assert scalars(tmp_path / "run", "loss") == [(int(r["step"]), round(float(r["loss"]), 6)) for r in rows]
    assert [s for s, _ in scalars(tmp_path / "run", "lr")] == [1, 2, 3, 4]


def test_the_pgrpo_trainer_logs_its_rows_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from test_pgrpo import _config

    from twlib.train import pgrpo

    pgrpo.train(_config(tmp_path, steps=2, tensorboard=True), quiet=True)
    out = next(p.parent for p in tmp_path.rglob("metrics.csv"))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [s for s, _ in scalars(out, "reward")] == [int(r["step"]) for r in rows] == [1, 2]


def test_the_distributed_pgrpo_trainer_logs_its_rows_through_metrics_log(tmp_path):
    """The FSDP loop (1 rank, in process) writes its rows through MetricsLog: csv and TensorBoard agree."""
    pytest.importorskip("tensorboard")
    from test_distributed_pgrpo import config

    from twlib.train import pgrpo_fsdp

    out = tmp_path / "run"
    pgrpo_fsdp.train(config(out, steps=2, prompts_per_step=2, checkpoint_every=0, tensorboard=True), quiet=True)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [s for s, _ in scalars(out, "reward")] == [int(r["step"]) for r in rows] == [1, 2]
    assert scalars(out, "loss") == [(int(r["step"]), round(float(r["loss"]), 6)) for r in rows]
