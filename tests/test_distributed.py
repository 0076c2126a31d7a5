"""twlib.train.sft under FSDP2 (twlib.train.fsdp): data-parallel trie SFT reproduces one process, and resumes exactly from DCP checkpoints.

FSDP2 (`torch.distributed.fsdp.fully_shard`) works on CPU with the gloo backend in torch 2.13, so these
tests run the real FSDP2 code path (no DDP fallback): two processes started with `torch.multiprocessing`
on gloo, the tiny preset, a few steps. What they check:
- 2 ranks give the loss curve (and grad norms, and final weights) of the single-process `twlib.train.sft.train`
  to 1e-4 relative per step, with 3 rows per step, so one rank gets 2 rows and the other 1 (+ a filler pass);
  also with activation checkpointing and the chunk-recomputing LM head switched on;
- only rank 0 loads the base model; rank 1 builds it on the meta device and receives its shards;
- a 2-rank run interrupted after step 3 (last checkpoint at step 2) and resumed ends with the same per-step
  losses and the same weights as the uninterrupted 2-rank run;
- 1 rank through the command line (`main`, no torchrun) gives the same curve too;
- the building blocks: row split, micro-batch plan, the two LM-head modes, launch options, and
  twlib.train.sft's new `gradient_checkpointing` field (same losses with and without).
The interruption is an exception raised on every rank after a step (as tests/test_sft.py does); the resumed
run rebuilds model, optimizer and data from scratch and reads its state from the DCP checkpoint on disk.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_same_curve, final_weights, free_port, read_metrics

from twlib import checkpoint
from twlib.train import fsdp, sft
from twlib.format import engine_calls
from twlib.models import build_model
from twlib.train.sft import SFTConfig
from twlib.tokenizer import build_tokenizer
from twlib.trie import IGNORE, collate, pack

ROOT = Path(__file__).resolve().parent.parent
SMALL_TASK = {"max_groups": 3, "group_weights": None, "min_items": 2, "max_items": 4}
BLOCK = ("<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n"
         "<Thread>\n1: x\n</Thread><Thread>\n2: yy\n</Thread>\n</Parallel>\n")
# 3 rows per step over 2 ranks: uneven split; checkpoints every 2 steps; 6 steps (over two epochs).
FIELDS = dict(model="tiny", device="cpu", threads=1, n_train=8, n_eval=4, task_options=SMALL_TASK, max_steps=6,
              tokens_per_batch=512, rows_per_micro_batch=1, grad_accum=3, lr=3e-3, warmup=0.2,
              checkpoint_every=2, log_every=100, progress=False)
INTERRUPT_AT = 3


def config(out_dir, **overrides) -> SFTConfig:
    return SFTConfig(**{**FIELDS, "task_options": dict(SMALL_TASK), "out_dir": str(out_dir), **overrides})


# ----------------------------------------------------------------------------------------------------
# Building blocks (fast)


def test_rank_rows_cover_the_step_once():
    chosen = torch.tensor([7, 3, 9, 1, 4])
    parts = [fsdp.rank_rows(chosen, r, 2) for r in range(2)]
    assert parts[0].tolist() == [7, 9, 4] and parts[1].tolist() == [3, 1]
    assert sorted(torch.cat(parts).tolist()) == sorted(chosen.tolist())


@pytest.mark.parametrize("n_step, world, per_micro", [(3, 2, 1), (5, 2, 2), (1, 2, 1), (8, 4, 2), (2, 1, 4)])
def test_micro_batch_plan_gives_every_rank_the_same_passes(n_step, world, per_micro):
    plans = [fsdp.micro_batch_plan(len(range(r, n_step, world)), n_step, world, per_micro)
             for r in range(world)]
    assert len({len(p) for p in plans}) == 1
    for r, plan in enumerate(plans):
        covered = [i for part in plan if part is not None for i in part]
        assert covered == list(range(len(range(r, n_step, world))))
        assert all(part is None or 1 <= len(part) <= per_micro for part in plan)


def test_kept_and_recomputed_lm_head_give_the_same_loss_and_gradients():
    """TrieLoss's two LM-head modes (`--logits chunked|kept`) through twlib.train.sft.batch_loss, several chunks."""
    tok = build_tokenizer()
    model = build_model("tiny", tok, seed=0)
    rows = collate([pack(engine_calls(BLOCK, "Q\n"), tok), pack([([1, 2, 3], [4, 5]), ([1, 2, 3, 6], [7])])])
    results = {}
    for logits in fsdp.LOGITS:
        model.zero_grad()
        loss, trained = sft.TrieLoss(model, "bool", logits, logits_chunk=7)(rows, 10.0)
        loss.backward()
        results[logits] = loss.detach(), trained, {n: p.grad.clone() for n, p in model.named_parameters()}
    (a, n_a, grads_a), (b, n_b, grads_b) = results["chunked"], results["kept"]
    assert n_a == n_b == int((rows.labels != IGNORE).sum())
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=0, atol=1e-6)


def test_launch_options_follow_the_launch_section_then_the_flags():
    launch = fsdp.launch_options(ROOT / "configs" / "qwen3-8b-sft.yaml")
    assert launch.gradient_checkpointing and launch.offload and launch.logits == "chunked"
    assert launch.logits_chunk == 4096 and launch.max_position_embeddings is None
    launch = fsdp.launch_options(ROOT / "configs" / "qwen3-8b-sft.yaml", offload=False,
                                        max_position_embeddings=131072, logits=None)
    assert not launch.offload and launch.max_position_embeddings == 131072 and launch.logits == "chunked"
    assert fsdp.launch_options(ROOT / "configs" / "tiny-parallel.yaml") == fsdp.Launch()
    with pytest.raises(sft.ConfigError, match="logits"):
        fsdp.launch_options(None, logits="full")


def test_sft_gradient_checkpointing_keeps_the_losses(tmp_path):
    common = dict(max_steps=3, checkpoint_every=0)
    plain = sft.train(config(tmp_path / "plain", **common), quiet=True)
    checkpointed = sft.train(config(tmp_path / "ckpt", gradient_checkpointing=True, **common), quiet=True)
    assert checkpointed.model.model.gradient_checkpointing
    a, b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ckpt")
    for x, y in zip(a, b):
        assert float(y["loss"]) == pytest.approx(float(x["loss"]), rel=1e-6)
    assert plain.steps == checkpointed.steps == 3


# ----------------------------------------------------------------------------------------------------
# End to end: 1 process (sft), 2 processes (FSDP2 on gloo), interruption and resume


class Interrupt(Exception):
    pass


def _worker(rank: int, world: int, port: int, root: str) -> None:
    """One rank: the full run, the same with activation checkpointing + chunked LM head, then a run
    interrupted after step INTERRUPT_AT, then its resumption."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    loads = []  # calls of the base-model loader on this rank
    real_loader = checkpoint.load_base_model
    checkpoint.load_base_model = lambda *args, **kwargs: loads.append(args[0]) or real_loader(*args, **kwargs)
    try:
        result = sft.train(config(Path(root) / "full"), quiet=True)
        (Path(root) / f"load-{rank}.json").write_text(json.dumps({**result.load, "loader_calls": len(loads)}))
        try:  # only rank 0 tries to load these weights, and fails: every rank must hear of it (no hang)
            sft.train(config(Path(root) / "no-weights-run", model=str(Path(root) / "no-weights")), quiet=True)
            raise AssertionError("a model folder without weights trained")
        except sft.ConfigError as e:
            (Path(root) / f"load-error-{rank}.txt").write_text(str(e))
        memory_savers = fsdp.Launch(gradient_checkpointing=True, logits="chunked", logits_chunk=64)
        sft.train(config(Path(root) / "savers", checkpoint_every=0), quiet=True, launch=memory_savers)

        def stop(step, row):
            if step == INTERRUPT_AT:
                raise Interrupt

        try:
            sft.train(config(Path(root) / "cut"), on_step=stop, quiet=True)
            raise AssertionError("the run was not interrupted")
        except Interrupt:
            pass
        trainer = json.loads((Path(root) / "cut" / "checkpoint" / "trainer_state.json").read_text())
        assert trainer["step"] == 2 and trainer["world_size"] == world, trainer
        sft.train(config(Path(root) / "cut", resume=True), quiet=True)
    finally:
        dist.destroy_process_group()
    fsdp.exit_process()  # the results are on disk: skip the teardown race at exit


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    sft.train(config(out), quiet=True)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("two_ranks")
    tok = build_tokenizer()  # a model folder with its config and tokenizer but no weights
    build_model("tiny", tok).save_pretrained(root / "no-weights")
    tok.save_pretrained(root / "no-weights")
    for weights in (root / "no-weights").glob("*.safetensors"):
        weights.unlink()
    mp.spawn(_worker, args=(2, free_port(), str(root)), nprocs=2, join=True)
    return root


@pytest.mark.slow
def test_two_ranks_match_the_single_process_run(single, two_ranks):
    rows, reference = read_metrics(two_ranks / "full"), read_metrics(single)
    assert len(rows) == FIELDS["max_steps"]
    assert_same_curve(rows, reference)
    a, b = final_weights(two_ranks / "full"), final_weights(single)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_only_rank_0_materialises_the_full_model(two_ranks):
    """Rank 1 never loads the base model: its model is on the meta device until sharded and it then holds its
    shards only (half the parameters); rank 0 loads the one full copy. The curve and weights of this run are
    test_two_ranks_match_the_single_process_run's."""
    from twlib.models import count_parameters

    full_bytes = 4 * count_parameters(build_model("tiny", build_tokenizer()))  # fp32, tied weights once
    reports = [json.loads((two_ranks / f"load-{r}.json").read_text()) for r in range(2)]
    assert reports[0]["loader_calls"] == 1 and reports[0]["full_copy_bytes"] == full_bytes
    assert reports[1]["loader_calls"] == 0 and reports[1]["full_copy_bytes"] == 0
    for report in reports:
        assert report["meta_until_shard"]
        assert 0.45 * full_bytes <= report["shard_bytes"] <= 0.55 * full_bytes  # its half of each tensor
    assert reports[0]["shard_bytes"] + reports[1]["shard_bytes"] == full_bytes
    # a load error on rank 0 is raised on rank 1 too, with rank 0's message
    errors = [(two_ranks / f"load-error-{r}.txt").read_text() for r in range(2)]
    assert errors[0] == errors[1] and "no-weights" in errors[0]


@pytest.mark.slow
def test_memory_savers_keep_the_curve(single, two_ranks):
    """FSDP2 + HF activation checkpointing + the chunk-recomputing LM head: same losses as one process."""
    assert_same_curve(read_metrics(two_ranks / "savers"), read_metrics(single))
    result = json.loads((two_ranks / "savers" / "result.json").read_text())
    assert result["launch"]["gradient_checkpointing"] and result["launch"]["logits"] == "chunked"


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(two_ranks):
    cut, full = two_ranks / "cut", two_ranks / "full"
    checkpoint = cut / "checkpoint"
    assert (checkpoint / "dcp" / ".metadata").is_file()
    assert {p.name for p in checkpoint.glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    assert [r["loss"] for r in read_metrics(cut)] == [r["loss"] for r in read_metrics(full)]
    a, b = final_weights(cut), final_weights(full)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_one_process_command_line_matches_the_single_process_run(single, tmp_path):
    path = tmp_path / "tiny.yaml"
    sft.save_config(config(tmp_path / "cli"), path)
    assert sft.main(["--config", str(path), "--fsdp"]) == 0
    assert_same_curve(read_metrics(tmp_path / "cli"), read_metrics(single))
    assert (tmp_path / "cli" / "final" / "config.json").is_file()
    assert not torch.distributed.is_initialized()  # the process group it made is gone


def test_command_line_errors_name_the_field(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: tiny\nlora: true\ndevice: cpu\nn_train: 4\n")
    assert sft.main(["--config", str(path), "--fsdp", "--set", f"out_dir={tmp_path / 'x'}"]) == 2
    assert "lora" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()
