"""Helpers shared by the multi-process tests (tests/test_distributed*.py)."""

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
