"""scripts/gpu_check.py: its `--cpu-smoke` mode runs every section on CPU at toy sizes (the CI run of the check
that a lent GPU runs at full size) and writes a JSON and a markdown table that hold what was measured.

What the tests check: exit code 0 and no errors; every section measured (FlexAttention rows only build the
BlockMask on CPU: no backward there), with the mask bytes equal to the planner's (dense T^2 bool, BlockMask
4 index + 4 count int32 tensors), positive times and rates, peaks beside the planner's estimates, the state
machine's threads decoded to their budget and the sequential decoder given as many tokens; the markdown
has one table per section; the synthetic trie rows have exactly the asked length and several blocks; bad
arguments exit 2 with a message. With Qwen3's real tokenizer (the `realtok` fixture), the decode section
runs through the chat template and the thread tags added to it.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _module():
    if "gpu_check" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        sys.modules["gpu_check"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def run(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = run("--cpu-smoke", "--out", out, "--budget-s", 200)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_cpu_smoke_measures_every_section(smoke):
    _, result, _ = smoke
    sizes = _module().SMOKE_SIZES
    assert result["mode"] == "cpu-smoke" and result["errors"] == [] and result["skipped"] == []
    attention = result["sections"]["attention"]
    assert [(r["tokens"], r["mask"].split()[0]) for r in attention] == [
        (t, m) for t in sizes.attention_tokens for m in ("block", "dense")]
    for r in attention:
        assert r["mask_bytes"] == r["planned_mask_bytes"] > 0
        if r["mask"].startswith("dense"):
            assert r["first_s"] > 0 and r["pass_s"] > 0
            assert 0.5 < r["peak_gib"] / r["planned_gib"] < 1.5, r  # RSS growth on CPU beside the planner's
        else:
            assert "no backward on CPU" in r["note"]
    [sft] = result["sections"]["sft"]
    assert sft["tokens_per_s"] > 0 and sft["steps"] == sizes.sft_steps and sft["peak_gib"] > 0
    decode = result["sections"]["decode"]
    assert [r["batch"] for r in decode] == list(sizes.decode_batches)
    assert all(r["tokens_per_s"] > 0 for r in decode)
    parallel, sequential = result["sections"]["state_machine"]
    threads = _module().THREADS
    assert parallel["generated"] == threads * sizes.thread_tokens  # every thread ran to its budget
    assert parallel["flags"] == ["thread_unclosed"] * threads and parallel["forced"] > 0
    assert sequential["generated"] == parallel["generated"] and sequential["forced"] == 0
    assert parallel["critical_path"] < parallel["forced"] + parallel["generated"]  # threads are parallel


@pytest.mark.slow
def test_cpu_smoke_markdown_has_a_table_per_section(smoke):
    _, result, text = smoke
    assert text.startswith("# GPU check (cpu-smoke)")
    for section, rows in result["sections"].items():
        block = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
        table = [line for line in block.splitlines() if line.startswith("| ") and "---" not in line]
        assert len(table) == 1 + len(rows), (section, table)  # header + one line per measurement
    assert "## errors" not in text


def test_synthetic_trie_rows_have_the_asked_length_and_blocks():
    module = _module()
    for tokens in (256, 1000, 4096):
        row = module.trie_row(tokens, vocab=151_936, seed=3)
        assert row.shape == (1, tokens)
        assert row.num_tokens > 0.95 * tokens  # little padding
        roots = int((row.parents[0] == -1).sum()) - (tokens - row.num_tokens)
        assert roots == 1  # one trajectory
        branching = int(row.parents[0][row.parents[0] >= 0].bincount().gt(1).sum())
        assert branching >= 2  # blocks of threads fork the trie


def test_bad_arguments_exit_2(tmp_path):
    done = run("--cpu-smoke", "--sections", "attention,bogus", "--out", tmp_path, timeout=120)
    assert done.returncode == 2 and "bogus" in done.stderr
    done = run("--cpu-smoke", "--tokenizer", tmp_path / "nowhere", "--out", tmp_path, timeout=120)
    assert done.returncode == 2 and "no tokenizer.json" in done.stderr


@pytest.mark.slow
def test_decode_section_with_qwen3s_tokenizer(qwen3_tokenizer_dir, tmp_path):
    done = run("--cpu-smoke", "--sections", "decode", "--tokenizer", qwen3_tokenizer_dir, "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert str(qwen3_tokenizer_dir) in result["tokenizer"] and result["errors"] == []
    parallel, sequential = result["sections"]["state_machine"]
    assert parallel["flags"] == ["thread_unclosed"] * _module().THREADS
    assert sequential["generated"] == parallel["generated"] > 0
