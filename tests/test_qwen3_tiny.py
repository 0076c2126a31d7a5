"""The qwen3-tiny tier: every full-scale entry point, end to end on CPU, on Qwen3's real tokenizer (marker `qwen3tiny`).

This checks PLUMBING, NOT LEARNING. The model is Qwen3's architecture (Qwen3ForCausalLM) with Qwen3's real
151,669-token tokenizer and chat template, the 8 thread tags added as single tokens by
`python -m twlib prepare-model --preset qwen3-tiny`, and toy sizes (hidden 32, 2 layers, the tied 151,936-row
embedding: 4.9M parameters) with random weights. It can learn nothing worth measuring; what the tier proves is
that the commands of the Qwen3-8B run (docs/full_scale.md section 10) work together on the real vocabulary,
chat template and data formats, in the order the runbook gives them, from a working folder in which the
configs' relative paths (models/, data/, runs/) resolve:

  prepare-model --preset -> data --chat-template (SFT trajectories) -> prompts --chat-template (math pool)
  -> plan --dry-run and the trainers' --dry-run -> sft (one process) -> torchrun 2 ranks of twlib.train.fsdp
  (FSDP2 on gloo) -> pgrpo (task: math, math-verify), one process and torchrun 2 ranks of
  twlib.train.pgrpo_fsdp -> python -m twlib.eval (state-machine decoding, graded)

Real assertions, each able to fail: the first SFT loss is ln(151,936) (a 151k-way softmax at random init)
and it falls at every step on one repeated batch; the 2-rank loss curve, grad norms and final weights equal
the single process's, and so do the 2-rank P-GRPO run's rollouts; decoded outputs keep the chat prompt as
their context and parse or carry a flag; P-GRPO rows have rewards within [incorrect_reward, 1 + rho_clip];
math-verify grades equivalent forms of the
pool's answers (0.5 for \\frac{1}{2}) that exact match would not; and an update with non-zero advantages
(a stand-in reward: a random model answers nothing right) moves the weights.

The tokenizer comes from `scripts/fetch_qwen3_tokenizer.py` (fixture `qwen3_tokenizer_dir`: skipped locally
without it, a failure under CI=true). Measured on the project's 2-core machine while another job held both
cores: 96 s for the whole file (`pytest -m qwen3tiny --durations=0`).
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_curve, final_weights, read_metrics

pytestmark = [pytest.mark.qwen3tiny, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SFT_CONFIG = ROOT / "configs" / "qwen3-tiny-sft.yaml"
PGRPO_CONFIG = ROOT / "configs" / "qwen3-tiny-pgrpo.yaml"
MATH_JSONL = ROOT / "tests" / "fixtures" / "qwen3_tiny_math.jsonl"
VOCAB_ROWS = 151_936  # Qwen3's padded embedding, kept by the preset
TOKENS = 151_677  # 151,669 + the 8 thread tags
MODEL, SFT_OUT, PGRPO_OUT = "models/qwen3-tiny", "runs/qwen3-tiny-sft", "runs/qwen3-tiny-pgrpo"
DATA = "data/qwen3-tiny"
# Equivalent forms of the math pool's answers (tests/fixtures/qwen3_tiny_math.jsonl) that exact match rejects.
EQUIVALENT = {"half": "0.5", "square": "144", "poly": "1 + 2x + x^2", "root": "2^{1/2}"}
WRONG = {"half": "0.25", "square": "142", "poly": "x^2+1", "root": "2"}


def twlib_cmd(work: Path, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python ARGS` in the working folder (the configs' relative paths resolve there); fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, *map(str, args)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, (f"{' '.join(map(str, args))}: exit {out.returncode}\n--- stdout\n{out.stdout[-4000:]}"
                                 f"\n--- stderr\n{out.stderr[-4000:]}")
    return out


# ----------------------------------------------------------------------------------------------------
# The stages, in the runbook's order (module fixtures: each runs once, later stages build on earlier ones)


@pytest.fixture(scope="module")
def work(tmp_path_factory, qwen3_tokenizer_dir):
    """A working folder with models/qwen3-tiny: `prepare-model --preset qwen3-tiny` (the 8B: --model Qwen/Qwen3-8B)."""
    folder = tmp_path_factory.mktemp("qwen3-tiny")
    out = twlib_cmd(folder, "-m", "twlib", "prepare-model", "--preset", "qwen3-tiny", "--tokenizer",
                    qwen3_tokenizer_dir, "--out", MODEL)
    assert "added <Parallel>=151669" in out.stdout and f"tokenizer {TOKENS} tokens" in out.stdout
    return folder


@pytest.fixture(scope="module")
def data(work):
    """SFT trajectories and the RL prompt pool, both rendered by the prepared model's chat template."""
    twlib_cmd(work, "-m", "twlib", "data", "--task", "multiply", "--n-train", 2, "--n-eval", 2, "--chat-template",
              MODEL, "--out", DATA)
    twlib_cmd(work, "-m", "twlib", "prompts", "--jsonl", MATH_JSONL, "--out", f"{DATA}/math-prompts.parquet",
              "--chat-template", MODEL, "--id-field", "id")
    return work / DATA


@pytest.fixture(scope="module")
def sft_run(work, data):
    twlib_cmd(work, "-m", "twlib", "sft", "--config", SFT_CONFIG)
    return work / SFT_OUT


@pytest.fixture(scope="module")
def two_ranks(work, sft_run):
    """The same config over 2 processes: torchrun + FSDP2 on gloo, memory levers from the launcher block."""
    twlib_cmd(work, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, "-m", "twlib.train.sft",
              "--config", SFT_CONFIG, "--set", "out_dir=runs/qwen3-tiny-sft-2ranks", timeout=420)
    return work / "runs" / "qwen3-tiny-sft-2ranks"


@pytest.fixture(scope="module")
def pgrpo_run(work, sft_run):
    twlib_cmd(work, "-m", "twlib", "pgrpo", "--config", PGRPO_CONFIG)
    return work / PGRPO_OUT


def tokenizer_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------------
# Dry runs (no tokenizer needed: the model is planned from the preset's architecture when not written yet)


@pytest.mark.parametrize("argv", [
    ["plan", "--dry-run", SFT_CONFIG], ["plan", "--dry-run", PGRPO_CONFIG],
    ["sft", "--config", SFT_CONFIG, "--dry-run"], ["pgrpo", "--config", PGRPO_CONFIG, "--dry-run"],
], ids=["plan-sft", "plan-pgrpo", "sft", "pgrpo"])
def test_dry_runs(argv, capsys):
    from twlib.cli import main
    from twlib.models import count_parameters

    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert f"{count_parameters('qwen3-tiny'):,} on the meta device" in out and "(equal)" in out
    assert "qwen3-tiny" in out and "fits" in out and "DOES NOT FIT" not in out
    assert "over 2 GPU(s)" in out  # the launcher block: 2 ranks, FSDP


@pytest.mark.parametrize("module, config", [("twlib.train.sft", SFT_CONFIG),
                                            ("twlib.train.pgrpo_fsdp", PGRPO_CONFIG)])
def test_distributed_dry_runs(module, config, capsys):
    import importlib

    assert importlib.import_module(module).main(["--config", str(config), "--dry-run"]) == 0
    assert "sharding plan (fsdp over 2 GPU(s)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# prepare-model, data, prompts


def test_prepare_model_preset_is_qwen3_with_the_tags(work):
    from transformers import AutoConfig

    from twlib.tokenizer import TAGS, tag_ids

    config = AutoConfig.from_pretrained(str(work / MODEL))
    assert config.architectures == ["Qwen3ForCausalLM"] and config.model_type == "qwen3"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (VOCAB_ROWS, 32, 2)
    assert config.tie_word_embeddings and config.eos_token_id == 151645
    tok = tokenizer_of(work / MODEL)
    assert len(tok) == TOKENS and tok.eos_token == "<|im_end|>"
    ids = tag_ids(tok)
    assert [ids[t] for t in TAGS[2:]] == list(range(151_669, TOKENS)) and ids["<think>"] == 151_667


def test_prepare_model_preset_errors_name_the_problem(work, tmp_path, capsys):
    from twlib.cli import main

    assert main(["prepare-model", "--preset", "qwen3-tiny", "--out", str(tmp_path / "x")]) == 2
    assert "--preset qwen3-tiny needs --tokenizer" in capsys.readouterr().err
    assert main(["prepare-model", "--preset", "qwen3-tiny", "--tokenizer", str(work / MODEL),
                 "--out", str(work / MODEL)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main(["prepare-model", "--preset", "tiny", "--tokenizer", str(work / MODEL), "--out", str(tmp_path / "y")]) == 2
    assert "expected one of qwen3-tiny" in capsys.readouterr().err


def test_data_and_prompts_are_chat_templated(data):
    from twlib.format import parse
    from twlib.infra.problems import load_parquet

    train, pool = load_parquet(data / "multiply-train.parquet"), load_parquet(data / "math-prompts.parquet")
    assert len(train) == 2 and len(load_parquet(data / "multiply-eval.parquet")) == 2
    for p in train + pool:
        assert p.prompt == f"<|im_start|>user\n{p.question}<|im_end|>\n<|im_start|>assistant\n", p.prompt
    for p in train:  # the template's assistant turn: think block, one blank line, the boxed answer
        assert p.parallel.startswith("<think>\n") and "</think>\n\n" in p.parallel and "\\boxed{" in p.parallel
        assert any(not isinstance(s, str) for s in parse(p.parallel).segments)  # a parallel block
    assert [p.id for p in pool] == list(EQUIVALENT) and {p.task for p in pool} == {"math"}
    assert all(p.parallel == p.sequential == "" for p in pool)


def test_math_verify_grades_the_pool(data):
    """The pool's answers reach math-verify: equivalent forms are right, wrong ones are not, and exact match
    would have rejected the equivalent forms (so the grader in use is math-verify, not string equality)."""
    from twlib.rewards import RewardConfig, score
    from twlib.tasks import grade
    from twlib.infra.problems import load_parquet

    config = RewardConfig(task="math")
    for p in load_parquet(data / "math-prompts.parquet"):
        right = f"<think>\nworked it out\n</think>\n\nThe answer is \\boxed{{{EQUIVALENT[p.id]}}}."
        wrong = right.replace(EQUIVALENT[p.id], WRONG[p.id])
        assert score(right, p.answer, config).total == 1.0, (p.id, p.answer)
        assert score(wrong, p.answer, config).total == 0.0, (p.id, p.answer)
        if p.id != "square":
            assert not grade(right, p.answer)


# ----------------------------------------------------------------------------------------------------
# SFT: one process and 2 ranks


def test_sft_loss_starts_at_ln_vocab_and_falls_on_one_repeated_batch(work, sft_run):
    rows = read_metrics(sft_run)
    result = json.loads((sft_run / "result.json").read_text())
    assert (result["rows"], result["trajectories"], result["skipped"], result["steps"]) == (2, 2, 0, 4)
    assert len(rows) == 4
    assert len({(r["tokens"], r["trained_tokens"]) for r in rows}) == 1  # the same 2 rows at every step
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(x) for x in losses) and all(float(r["grad_norm"]) > 0 for r in rows)
    assert abs(losses[0] - math.log(VOCAB_ROWS)) < 0.3, losses  # random init: a uniform 151,936-way guess
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.5, losses
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(str(work / MODEL)).state_dict()
    final = final_weights(sft_run)
    assert not torch.equal(start["model.embed_tokens.weight"], final["model.embed_tokens.weight"])
    assert len(tokenizer_of(sft_run / "final")) == TOKENS


def test_two_ranks_match_one_process(sft_run, two_ranks):
    """torchrun + FSDP2 (gloo), gradient checkpointing and the chunked LM head of the launcher block: the
    single process's loss curve, grad norms and final weights (tests/test_distributed.py's comparison)."""
    assert_same_curve(read_metrics(two_ranks), read_metrics(sft_run))
    result = json.loads((two_ranks / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["launch"]["gradient_checkpointing"] and result["launch"]["logits"] == "chunked"
    assert (two_ranks / "checkpoint" / "dcp" / ".metadata").is_file()
    a, b = final_weights(two_ranks), final_weights(sft_run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Decoding, P-GRPO, evaluation


def test_state_machine_decodes_chat_prompts(work, sft_run, data):
    """ParallelDecoder over HFEngine on the SFT model: the chat-templated prompt is the first call's context,
    the text is the decoded response ids, and every output parses or carries a flag."""
    from transformers import AutoModelForCausalLM

    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder
    from twlib.infra.problems import load_parquet

    tok = tokenizer_of(sft_run / "final")
    model = AutoModelForCausalLM.from_pretrained(str(sft_run / "final"))
    problems = load_parquet(data / "multiply-eval.parquet")
    prompts = [tok.encode(p.prompt, add_special_tokens=False) for p in problems]
    assert all(ids[:3] == tok.encode("<|im_start|>user\n", add_special_tokens=False) for ids in prompts)
    config = DecodeConfig(max_new_tokens=24, max_thread_tokens=8)
    results = ParallelDecoder(HFEngine(model, tok), tok, config).decode(prompts, batch_size=2)
    for ids, r in zip(prompts, results):
        assert r.calls[0].context_ids == ids and r.prompt_ids == ids
        assert r.text == tok.decode(r.response_ids, skip_special_tokens=False)
        assert r.stats.total == len(r.response_ids) <= 24
        assert r.valid or r.flags, r


def test_pgrpo_with_math_verify(pgrpo_run):
    from twlib.train.pgrpo import METRICS_FIELDS, load_pgrpo_config

    config = load_pgrpo_config(PGRPO_CONFIG)
    rows = read_metrics(pgrpo_run)
    assert len(rows) == config.steps == 2 and list(rows[0]) == METRICS_FIELDS
    for r in rows:
        assert config.incorrect_reward <= float(r["reward"]) <= 1 + config.rho_clip
        assert 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["zero_std_groups"]) <= 1
        assert 0 < float(r["total_tokens"]) <= config.max_new_tokens
        assert int(r["completion_tokens"]) > 0 and int(r["trie_tokens"]) > int(r["completion_tokens"])
        assert all(math.isfinite(float(r[k])) for k in ("loss", "grad_norm", "eta", "critical_path"))
    assert (pgrpo_run / "final" / "config.json").is_file()


def test_distributed_pgrpo_two_ranks_match_one_process(work, pgrpo_run):
    """torchrun + twlib.train.pgrpo_fsdp (FSDP2 trainer, an HFEngine per rank): rank r rolls out its own prompt
    groups, each rollout seeded on its own, so the step's rollouts (tokens, rewards, paths) are the single
    process's exactly; losses and weights to 1e-4."""
    twlib_cmd(work, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, "-m",
              "twlib.train.pgrpo_fsdp", "--config", PGRPO_CONFIG, "--rollout", "hf", "--set",
              "out_dir=runs/qwen3-tiny-pgrpo-2ranks", timeout=420)
    out = work / "runs" / "qwen3-tiny-pgrpo-2ranks"
    rows, reference = read_metrics(out), read_metrics(pgrpo_run)
    assert len(rows) == len(reference) == 2
    exact = ("step", "reward", "reward_std", "zero_std_groups", "accuracy", "parallel_rate", "eta", "critical_path",
             "total_tokens", "truncation_rate", "invalid_rate", "trie_tokens", "completion_tokens")
    for r, ref in zip(rows, reference):
        assert {k: r[k] for k in exact} == {k: ref[k] for k in exact}
        for k in ("loss", "grad_norm"):
            assert float(r[k]) == pytest.approx(float(ref[k]), rel=1e-4, abs=1e-7)
    a, b = final_weights(out), final_weights(pgrpo_run)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_pgrpo_update_with_advantages_moves_the_weights(work, sft_run, data, tmp_path):
    """The same config in process with a stand-in reward that differs within groups (response length), so the
    P-GRPO update on the real vocabulary has a non-zero loss and gradient; the weights must move."""
    from twlib.train.pgrpo import load_pgrpo_config, train
    from twlib.rewards import Reward

    def length_reward(text, answer, stats):
        return Reward(total=len(text) / 100, correct=False, acceleration=0.0, eta=stats.eta, self_parallelism=stats.self_parallelism)

    config = load_pgrpo_config(PGRPO_CONFIG, [f"model={sft_run / 'final'}", f"data={data / 'math-prompts.parquet'}",
                                              f"out_dir={tmp_path / 'pgrpo'}", "steps=1"])
    config.reward_fn = length_reward
    result = train(config, quiet=True)
    row = result.last
    assert row["zero_std_groups"] < 1 and row["reward_std"] > 0
    assert row["loss"] != 0 and math.isfinite(row["loss"]) and row["grad_norm"] > 0
    start, end = final_weights(sft_run), final_weights(tmp_path / "pgrpo")
    assert not torch.equal(start["model.embed_tokens.weight"], end["model.embed_tokens.weight"])


def test_final_evaluation_command(work, pgrpo_run, data):
    """`python -m twlib.eval` on the P-GRPO model and the math pool: the runbook's last step (there with
    --url of a vLLM server and the benchmarks)."""
    out_csv = work / PGRPO_OUT / "eval_parallel_math.csv"
    out = twlib_cmd(work, "-m", "twlib.eval", "--model", f"{PGRPO_OUT}/final", "--data", f"{DATA}/math-prompts.parquet",
                    "--parallel", "--max-new-tokens", 24, "--max-thread-tokens", 8, "--batch-size", 4, "--out", out_csv)
    assert "4 problems" in out.stdout and "(parallel)" in out.stdout
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == list(EQUIVALENT)
    for r in rows:
        assert r["valid"] == "True" or r["flags"], r
        assert 0 < int(r["total"]) <= 24 and int(r["longest"]) <= int(r["total"])
        assert r["correct"] in ("True", "False")
