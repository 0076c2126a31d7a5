"""twlib.train.sft: the loss is the packed trie loss, training learns, resume is exact, checkpoints are atomic,
config errors name the field and the file, the CLI runs end to end, LoRA trains adapters only, and the
sequential / causal modes build chains."""

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from twlib import checkpoint
from twlib.train import sft
from twlib.cli import main as cli_main
from twlib.format import engine_calls
from twlib.models import build_model
from twlib.train.sft import ConfigError, DataError, SFTConfig, load_config, train
from twlib.tasks import generate
from twlib.infra.problems import save_parquet
from twlib.tokenizer import build_tokenizer
from twlib.trie import IGNORE, sequence_logprobs, tokenize_calls

ROOT = Path(__file__).resolve().parent.parent
# Short problems (2-3 groups of 2-4 items) keep every test to a few seconds on 2 CPU cores.
SMALL_TASK = {"max_groups": 3, "group_weights": None, "min_items": 2, "max_items": 4}


def config(tmp_path, name="run", **overrides) -> SFTConfig:
    # threads=1: tiny matrices gain little from a second thread, and on a shared 2-core machine two
    # threads spin on a busy core (3x slower measured); train() restores the thread count afterwards.
    fields = dict(model="tiny", threads=1, n_train=6, n_eval=4, task_options=dict(SMALL_TASK), max_steps=4,
                  tokens_per_batch=512, rows_per_micro_batch=1, grad_accum=2, lr=3e-3, warmup=0.2,
                  log_every=100, progress=False, out_dir=str(tmp_path / name))
    fields.update(overrides)
    return SFTConfig(**fields)


def read_metrics(out_dir) -> list[dict]:
    with open(Path(out_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ----------------------------------------------------------------------------------------------------
# Training


def test_loss_decreases_when_overfitting(tmp_path):
    cfg = config(tmp_path, n_train=4, max_steps=20, rows_per_micro_batch=4, grad_accum=1, warmup=0.0)
    result = train(cfg, quiet=True)
    losses = [float(r["loss"]) for r in read_metrics(cfg.out_dir)]
    assert len(losses) == 20 and result.steps == 20
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses
    assert result.tokens_per_s > 0 and result.final_loss == pytest.approx(losses[-1], abs=1e-6)
    assert (Path(cfg.out_dir) / "final" / "train_config.yaml").is_file()


def test_parallel_loss_equals_mean_over_calls_run_alone(tmp_path, tok):
    """One optimizer step over every row (accumulated over micro-batches): its loss is the mean over all
    completion tokens of -log p computed by running each state-machine call alone (plain forward)."""
    cfg = config(tmp_path, n_train=5, max_steps=1, rows_per_micro_batch=1, grad_accum=16,
                 tokens_per_batch=400)
    problems = sft.load_problems(cfg)
    assert sum(p.is_parallel for p in problems) >= 2
    result = train(cfg, quiet=True)
    assert result.rows > 1  # several rows, several micro-batches: the normaliser spans them all
    model = build_model("tiny", tok, seed=cfg.seed)  # the run's initial weights (same seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for p in problems:
            for context, completion in tokenize_calls(engine_calls(p.parallel, p.prompt), tok):
                total -= float(sequence_logprobs(model, context, completion).double().sum())
                count += len(completion)
    metrics = read_metrics(cfg.out_dir)[0]
    assert int(metrics["trained_tokens"]) == count
    assert result.final_loss == pytest.approx(total / count, rel=1e-5)


def test_exact_resume_after_interruption(tmp_path):
    common = dict(n_train=8, max_steps=12, checkpoint_every=2)
    full = train(config(tmp_path, "full", **common), quiet=True)

    class Interrupt(Exception):
        pass

    def stop_at_5(step, row):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config(tmp_path, "cut", **common), on_step=stop_at_5, quiet=True)
    state = sft.load_checkpoint_state(sft.find_checkpoint(tmp_path / "cut"))["trainer"]
    assert state["step"] == 4  # the last checkpoint before the interruption; step 5 is redone
    resumed = train(config(tmp_path, "cut", resume=True, **common), quiet=True)
    a, b = weights(full.model), weights(resumed.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_full, rows_cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in rows_cut] == [str(i) for i in range(1, 13)]
    assert [r["loss"] for r in rows_cut] == [r["loss"] for r in rows_full]


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    """A crash inside the save, after the new checkpoint is fully written to its temporary directory,
    leaves the previous checkpoint in place and loadable; resuming from it finishes the run."""
    cfg = config(tmp_path, max_steps=6, checkpoint_every=2)
    real_swap, calls = checkpoint.swap_into_place, []

    def crash_on_second_save(tmp, final, old):
        calls.append(tmp)
        if len(calls) == 2:
            assert (tmp / "model" / "model.safetensors").is_file() and (tmp / "optimizer.pt").is_file()
            raise OSError("simulated crash during checkpoint save")
        real_swap(tmp, final, old)

    monkeypatch.setattr(checkpoint, "swap_into_place", crash_on_second_save)
    with pytest.raises(OSError, match="simulated crash"):
        train(cfg, quiet=True)
    monkeypatch.setattr(checkpoint, "swap_into_place", real_swap)

    path = sft.find_checkpoint(cfg.out_dir)
    assert path == Path(cfg.out_dir) / "checkpoint"
    assert sft.load_checkpoint_state(path)["trainer"]["step"] == 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(path / "model"))
    AutoTokenizer.from_pretrained(str(path / "model"))
    result = train(dataclasses.replace(cfg, resume=True), quiet=True)
    assert result.steps == 6 and not (Path(cfg.out_dir) / ".checkpoint.tmp").exists()


def test_resume_refuses_different_rows(tmp_path):
    cfg = config(tmp_path, max_steps=2, checkpoint_every=1)
    train(cfg, quiet=True)
    with pytest.raises(DataError, match="trained on different rows"):
        train(dataclasses.replace(cfg, resume=True, n_train=7, max_steps=4), quiet=True)


def test_crash_between_renames_falls_back_to_previous(tmp_path, monkeypatch):
    out = tmp_path / "run"
    for name, step in (("checkpoint", 2), (".checkpoint.tmp", 4)):
        (out / name).mkdir(parents=True)
        (out / name / "trainer_state.json").write_text(f'{{"step": {step}}}')
    real_replace, calls = os.replace, []

    def crash_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash between renames")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_second_rename)
    with pytest.raises(OSError):
        checkpoint.swap_into_place(out / ".checkpoint.tmp", out / "checkpoint", out / "checkpoint.old")
    found = sft.find_checkpoint(out)
    assert found == out / "checkpoint.old" and '"step": 2' in (found / "trainer_state.json").read_text()


def test_lora_trains_adapters_only(tmp_path, tok):
    cfg = config(tmp_path, lora=True, lora_rank=4, max_steps=2, checkpoint_every=2, lr=1e-2)
    result = train(cfg, quiet=True)
    ckpt = sft.find_checkpoint(cfg.out_dir)
    assert (ckpt / "model" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    adapter = load_file(str(ckpt / "model" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0: it trained
    # Optimizer state covers exactly the adapter tensors.
    optimizer = sft.load_checkpoint_state(ckpt)["optimizer"]
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(adapter)
    # The merged final model differs from the base only in LoRA target matrices.
    base = weights(build_model("tiny", tok, seed=cfg.seed))
    merged = weights(result.model)
    targets = tuple(cfg.lora_targets)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.split(".")[-2] in targets for k in changed)
    assert (Path(cfg.out_dir) / "final" / "adapter" / "adapter_config.json").is_file()


def test_eval_hook_runs_in_eval_mode_and_never_changes_training(tmp_path):
    """The hook may consume RNG (here: torch.rand) without changing training, even with LoRA dropout."""
    seen = []

    def hook(model, tokenizer, step):
        seen.append((step, model.training, torch.is_grad_enabled()))
        torch.rand(1000)
        return {"probe": float(step)}

    common = dict(lora=True, lora_dropout=0.2, max_steps=3)
    plain = train(config(tmp_path, "plain", **common), quiet=True)
    hooked = train(config(tmp_path, "hooked", eval_every=2, eval_hook=hook, **common), quiet=True)
    assert seen == [(2, False, False), (3, False, False)]
    a, b = weights(plain.model), weights(hooked.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(tmp_path / "hooked" / "eval.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["2", "3"]


# ----------------------------------------------------------------------------------------------------
# Rows


@pytest.mark.parametrize("mode", ["sequential", "causal"])
def test_sequential_and_causal_modes_build_chains(mode, tok):
    problems = generate("groupsum", 6, seed=3)
    assert any(p.is_parallel for p in problems)
    ids, tries = sft.build_trajectories(problems, tok, mode)
    rows = sft.build_rows(ids, tries, 1024)
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1]):
            sample = int(rows.sample_ids[r, i])
            if sample < 0:
                continue
            first = i == 0 or int(rows.sample_ids[r, i - 1]) != sample
            assert int(rows.parents[r, i]) == (-1 if first else i - 1)
    for p, t in zip(problems, tries):
        text = p.sequential if mode == "sequential" else p.parallel
        prompt = tok.encode(p.prompt, add_special_tokens=False)
        want = prompt + tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        assert t.input_ids[0].tolist() == want
        trained = (t.labels[0] != IGNORE).nonzero().squeeze(-1).tolist()
        assert trained == list(range(len(prompt), len(want)))  # every response token, no prompt token


def test_parallel_mode_builds_trees(tok):
    problems = [p for p in generate("groupsum", 10, seed=3) if p.is_parallel]
    _, tries = sft.build_trajectories(problems, tok, "parallel")
    for t in tries:
        parents = t.parents[0].tolist()
        assert any(parents[i] != i - 1 for i in range(1, len(parents)))  # branches: not a chain


def test_lr_schedule():
    f = [sft.lr_factor(s, 20, 4, 0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert f[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[4:], f[5:]))
    assert sft.lr_factor(0, 5, 0, 0.0) == 1.0


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_config_errors_name_the_field_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: tiny\nlrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown field 'lrr' \(did you mean 'lr'\?\)"):
        load_config(path)
    path.write_text("mode: tree\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: field 'mode'.*'parallel'"):
        load_config(path)
    path.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: field 'lr': expected a number"):
        load_config(path)
    path.write_text("betas: [0.9]\n")
    with pytest.raises(ConfigError, match=r"field 'betas'"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)
    path.write_text("lr: 1e-3\nbetas: [0.9, 0.99]\nmax_steps: 7\n")
    cfg = load_config(path, ["lr=2e-4", "data=null", "lora=true", "lora_targets=q_proj,v_proj"])
    assert (cfg.lr, cfg.betas, cfg.max_steps, cfg.data, cfg.lora) == (2e-4, (0.9, 0.99), 7, None, True)
    assert cfg.lora_targets == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"--set warmpu=0\.1: unknown field 'warmpu' \(did you mean 'warmup'"):
        load_config(path, ["warmpu=0.1"])
    with pytest.raises(ConfigError, match=r"field 'warmup'"):
        load_config(path, ["warmup=1.5"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    for c in [ROOT / "configs" / f"tiny-{stage}.yaml" for stage in ("base", "parallel", "sequential", "causal")]:
        assert load_config(c).out_dir.startswith("runs/")


def test_launch_section_and_retired_fields(tmp_path):
    """`launch:` is a typed section (errors name it and the field); a retired field loads only at its old
    value, so the shipped checkpoints' saved configs keep loading."""
    path = tmp_path / "run.yaml"
    path.write_text("launch:\n  gpus: 2\n  sharding: fsdp\n  logits: twlib\n")
    launch = load_config(path).launch
    assert (launch.gpus, launch.sharding, launch.logits, launch.logits_chunk) == (2, "fsdp", "kept", 4096)
    assert load_config(path, ["launch={gpus: 4}"]).launch.gpus == 4
    for text, match in (("launch:\n  gpus: two\n", r"run\.yaml \(launch\): field 'gpus': expected an integer"),
                        ("launch:\n  shards: 2\n", r"run\.yaml \(launch\): unknown field 'shards'"),
                        ("launch:\n  sharding: zero9\n", r"run\.yaml \(launch\): field 'sharding'"),
                        ("launch: 3\n", r"field 'launch': expected a mapping"),
                        ("item_tokens: true\n", r"field 'item_tokens' was removed")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_config(path)
    for stage in ("base", "parallel", "sequential", "causal"):
        saved = ROOT / "assets" / "checkpoints" / f"tiny-{stage}" / "train_config.yaml"
        assert "item_tokens: false" in saved.read_text() and load_config(saved).mode in ("parallel", "sequential", "causal")


def test_bad_data(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet.*field 'data' of my\.yaml"):
        sft.load_problems(config(tmp_path, data=str(tmp_path / "missing.parquet")), source="my.yaml")
    empty = tmp_path / "empty.parquet"
    save_parquet([], empty)
    with pytest.raises(DataError, match="empty"):
        sft.load_problems(config(tmp_path, data=str(empty)))
    problems = generate("groupsum", 4, seed=1, config=sft.get_task_config("groupsum", SMALL_TASK))
    broken = [dataclasses.replace(p, parallel=p.parallel.replace("</Thread>", "", 1)) if p.is_parallel
              else dataclasses.replace(p, parallel=p.parallel + "<Thread>") for p in problems[:2]]
    with pytest.warns(UserWarning, match=rf"skipped 2 of 4 .*{broken[0].id}"):
        ids, tries = sft.build_trajectories(broken + problems[2:], tok, "parallel")
    assert ids == [p.id for p in problems[2:]]
    with pytest.raises(DataError, match="every trajectory failed to parse"):
        sft.build_trajectories(broken, tok, "causal")
    ids, tries = sft.build_trajectories(problems, tok, "parallel")
    first = next(i for i in range(4) if tries[i].shape[1] > 100)
    with pytest.raises(DataError, match=rf"problem {ids[first]}: .* more than tokens_per_batch=100; raise"):
        sft.build_rows(ids, tries, 100)


# ----------------------------------------------------------------------------------------------------
# Command line


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sft", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--set" in out and "--resume" in out
    done = subprocess.run([sys.executable, "-m", "twlib", "sft", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0 and "--config" in done.stdout


def test_cli_runs_a_shipped_config_end_to_end(tmp_path, capsys):
    out = tmp_path / "base"
    rc = cli_main(["sft", "--config", str(ROOT / "configs" / "tiny-base.yaml"), "--set", "max_steps=2",
                   "--set", f"out_dir={out}", "--set", "n_train=12", "--set", "rows_per_micro_batch=1",
                   "--set", "progress=false"])
    assert rc == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert len(read_metrics(out)) == 2
    saved = yaml.safe_load((out / "final" / "train_config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["mode"] == "sequential" and saved["model"] == "tiny"
    # The final directory is a starting point for the next stage (model + tokenizer load from it).
    cfg = config(tmp_path, "next", model=str(out / "final"), max_steps=1)
    result = train(cfg, quiet=True)
    assert result.steps == 1
    assert cli_main(["sft", "--config", str(ROOT / "configs" / "tiny-base.yaml"), "--set", "bogus=1"]) == 2
    assert "unknown field 'bogus'" in capsys.readouterr().err


def test_sequential_accuracy_runs(tok):
    model = build_model("tiny", tok, seed=0)
    problems = generate("groupsum", 3, seed=5)
    accuracy, texts = sft.sequential_accuracy(model, tok, problems, max_new_tokens=8, return_texts=True)
    assert accuracy == 0.0 and len(texts) == 3
