"""Helpers shared by the multi-process tests (tests/test_distributed*.py, tests/test_qwen3_tiny.py)."""

import csv
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(out_dir) -> list[dict]:
    with open(Path(out_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def final_weights(out_dir) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(Path(out_dir) / "final")).state_dict()


def assert_same_curve(rows, reference, rel=1e-4):
    """Two SFT metrics.csv row lists (e.g. 2 ranks vs 1 process): same steps, token counts and lr, losses and
    grad norms equal to `rel`."""
    import pytest

    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for r, ref in zip(rows, reference):
        assert int(r["trained_tokens"]) == int(ref["trained_tokens"]) and int(r["tokens"]) == int(ref["tokens"])
        assert r["lr"] == ref["lr"]
        assert float(r["loss"]) == pytest.approx(float(ref["loss"]), rel=rel), (r, ref)
        assert float(r["grad_norm"]) == pytest.approx(float(ref["grad_norm"]), rel=rel), (r, ref)


def load_script(name: str):
    """A script of scripts/ (not a package) imported as a module, e.g. load_script("seeds")."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
