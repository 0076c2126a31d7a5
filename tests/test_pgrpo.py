"""twlib.rewards and twlib.train.pgrpo: reward forms, advantages, the packed loss equals the per-call loss (value
and gradients), a 2-step smoke run changes every parameter, exact resume, clear config errors."""

import math
from pathlib import Path

import pytest
import torch

from twlib.train import pgrpo
from twlib.decoding import CallRecord, DecodeResult
from twlib.format import engine_calls, path_stats
from twlib.models import build_model
from twlib.rewards import RewardConfig, acceleration_reward, score
from twlib.tasks import generate
from twlib.tokenizer import build_tokenizer
from twlib.trie import tokenize_calls

TOY = Path(__file__).resolve().parent.parent / "assets" / "checkpoints" / "toy-parallel"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def problems():
    return generate("groupsum", 12, seed=5)


# ----------------------------------------------------------------------------------------------------
# rewards


def test_reward_forms_by_hand(problems):
    p = next(p for p in problems if p.meta["k"] >= 3)
    s = path_stats(p.parallel)
    assert 0 < s.eta < 1 and s.self_parallelism > 1
    assert acceleration_reward(s, "paper", 0.5, 0.2) == pytest.approx(min(0.5 * s.eta, 0.2))
    assert acceleration_reward(s, "code", 0.5, 0.2) == pytest.approx(0.5 * min(s.eta, 0.2))
    assert acceleration_reward(s, "readme", 0.5, 0.2) == pytest.approx(0.5 * min(s.self_parallelism - 1, 0.2))
    # a small eta: the three forms give three different numbers (the paper and the code disagree)
    from twlib.format import PathStats
    small = PathStats(total=100, longest=90, eta=0.1, self_parallelism=100 / 90)
    values = {f: acceleration_reward(small, f) for f in ("paper", "code", "readme")}
    assert values["paper"] == pytest.approx(0.05) and values["code"] == pytest.approx(0.05)
    assert values["readme"] == pytest.approx(0.5 * (100 / 90 - 1))
    big = PathStats(total=100, longest=40, eta=0.6, self_parallelism=2.5)
    assert acceleration_reward(big, "paper") == pytest.approx(0.2)  # min(0.3, 0.2)
    assert acceleration_reward(big, "code") == pytest.approx(0.1)  # 0.5 * min(0.6, 0.2)


def test_score_correct_incorrect_and_garbage(problems):
    p = next(p for p in problems if p.meta["k"] >= 2)
    r = score(p.parallel, p.answer)
    assert r.correct and r.total == pytest.approx(1 + min(0.5 * r.eta, 0.2)) and r.acceleration > 0
    seq = score(p.sequential, p.answer)
    assert seq.correct and seq.total == 1.0 and seq.acceleration == 0.0  # no parallelism, no bonus
    wrong = p.parallel.replace(f"\\boxed{{{p.answer}}}", "\\boxed{A=0 B=0}")
    assert score(wrong, p.answer).total == 0.0  # bonus only when correct
    assert score(wrong, p.answer, RewardConfig(incorrect_reward=-1.0)).total == -1.0
    for garbage in ["", "<Parallel><Thread>", "\\boxed{", None]:
        assert score(garbage or "", p.answer).correct is False
    with pytest.raises(ValueError, match="acceleration"):
        RewardConfig(acceleration="fast")


def test_math_task_uses_math_verify():
    pytest.importorskip("math_verify")
    cfg = RewardConfig(task="math")
    assert score("<think>x</think>\\boxed{\\frac{1}{2}}", "0.5", cfg).correct
    assert score("<think>x</think>\\boxed{\\frac{1}{2}}", "\\frac{2}{4}", cfg).correct
    assert not score("<think>x</think>\\boxed{3}", "4", cfg).correct
    assert not score("<think>\\boxed{4}</think> no answer", "4", cfg).correct


# ----------------------------------------------------------------------------------------------------
# advantages


def test_group_advantages():
    a = pgrpo.group_advantages([1.0, 0.0, 1.2, 0.0])
    assert sum(a) == pytest.approx(0.0) and a[2] > a[0] > 0 > a[1]
    assert a == pytest.approx([1.0 - 0.55, -0.55, 1.2 - 0.55, -0.55])
    # all correct: the small acceleration differences stay small without std, become O(1) with it
    r = [1.10, 1.12, 1.10, 1.14]
    plain = pgrpo.group_advantages(r)
    normed = pgrpo.group_advantages(r, std_normalize=True)
    assert max(map(abs, plain)) < 0.03 and max(map(abs, normed)) > 1.0
    assert pgrpo.group_advantages([1.0, 1.0]) == [0.0, 0.0]
    assert pgrpo.group_advantages([1.0, 1.0], std_normalize=True) == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------------
# the packed loss equals the per-call (reference) loss


def _fake_rollouts(problems, tok, k=3, seed=0):
    """Rollouts made of real trajectories' calls (some groups repeat a trajectory: shared completions)."""
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for group, p in enumerate(problems):
        for j in range(k):
            text = (p.parallel if j != 1 else p.sequential)
            pairs = tokenize_calls(engine_calls(text, p.prompt), tok, add_eos=True)
            calls = [CallRecord(list(c), list(d), "sequential", 1) for c, d in pairs]
            stats = path_stats(text)
            result = DecodeResult(pairs[0][0], [], text, calls, stats, 0.0, [], True, True)
            reward = score(text, p.answer)
            rollouts.append(pgrpo.Rollout(group, p.id, p.answer, result, reward))
        adv = torch.randn(k, generator=g).tolist()
        for r, a in zip(rollouts[-k:], adv):
            r.advantage = a
    return rollouts


def _loss_and_grads(model, rollouts, packing, **kw):
    model.zero_grad(set_to_none=True)
    batch = pgrpo.build_batch(rollouts, packing, max_tokens=kw.pop("max_tokens", None))
    logp = pgrpo.batch_logprobs(model, batch)
    old = kw.pop("old", None)
    parts = pgrpo.policy_loss(logp, batch, old_logp=(logp.detach() + old(logp)) if old else None, **kw)
    parts.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return parts.loss.item(), grads, batch


@pytest.mark.parametrize("packing", ["group", "trajectory"])
def test_packed_loss_equals_per_call_rows(tok, problems, packing):
    model = build_model("tiny", tok, seed=0)
    rollouts = _fake_rollouts(problems[:4], tok)
    ref_loss, ref_grads, ref_batch = _loss_and_grads(model, rollouts, "call")
    loss, grads, batch = _loss_and_grads(model, rollouts, packing)
    assert batch.n_tokens == ref_batch.n_tokens
    assert batch.rows.num_tokens < ref_batch.rows.num_tokens  # shared prefixes computed once
    assert loss == pytest.approx(ref_loss, abs=1e-5, rel=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4)
    # rollouts 0 and 2 of each group are the same trajectory: their completion nodes are shared in the
    # group trie, and carry the sum of both advantages
    if packing == "group":
        assert float(batch.counts.max()) >= 2


def test_loss_is_minus_mean_advantage_weighted_logprob(tok, problems):
    """By hand on per-call rows: -(1/N) sum_i A_i sum_t log p."""
    from twlib.trie import sequence_logprobs

    model = build_model("tiny", tok, seed=1)
    rollouts = _fake_rollouts(problems[:2], tok, k=2, seed=3)
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rollouts:
            for context, completion in r.pairs:
                lp = sequence_logprobs(model, context, completion)
                total += r.advantage * float(lp.sum())
                n += len(completion)
        batch = pgrpo.build_batch(rollouts, "group")
        loss = pgrpo.policy_loss(pgrpo.batch_logprobs(model, batch), batch).loss.item()
    assert loss == pytest.approx(-total / n, rel=1e-4, abs=1e-5)


def test_clipped_loss_matches_per_call_and_on_policy_gradient(tok, problems):
    model = build_model("tiny", tok, seed=2)
    rollouts = _fake_rollouts(problems[:3], tok, seed=4)
    shift = lambda lp: 0.3 * torch.sin(7 * lp)  # an off-policy pi_old, differing per node  # noqa: E731
    a = _loss_and_grads(model, rollouts, "call", old=shift)
    b = _loss_and_grads(model, rollouts, "group", old=shift)
    assert a[0] == pytest.approx(b[0], abs=1e-5, rel=1e-5)
    for name, g in a[1].items():
        torch.testing.assert_close(b[1][name], g, atol=1e-5, rtol=1e-4)
    # with pi_old == pi (ratio 1) the clipped surrogate has the on-policy gradient
    c = _loss_and_grads(model, rollouts, "group", old=lambda lp: torch.zeros_like(lp))
    d = _loss_and_grads(model, rollouts, "group")
    for name, g in d[1].items():
        torch.testing.assert_close(c[1][name], g, atol=1e-6, rtol=1e-5)


def test_kl_term_is_zero_at_the_reference_and_positive_elsewhere(tok, problems):
    model = build_model("tiny", tok, seed=2)
    rollouts = _fake_rollouts(problems[:2], tok)
    batch = pgrpo.build_batch(rollouts, "group")
    with torch.no_grad():
        logp = pgrpo.batch_logprobs(model, batch)
    same = pgrpo.policy_loss(logp, batch, ref_logp=logp, kl_coef=0.1)
    other = pgrpo.policy_loss(logp, batch, ref_logp=logp + 0.5 * torch.randn_like(logp), kl_coef=0.1)
    assert same.kl == pytest.approx(0.0, abs=1e-7) and other.kl > 0


def test_orchestrator_tokens_get_no_weight(tok, problems):
    p = next(p for p in problems if p.meta["k"] >= 2)
    rollouts = _fake_rollouts([p], tok, k=2)
    batch = pgrpo.build_batch(rollouts, "trajectory")
    prefix = tok.encode("\n<Thread>\n1:", add_special_tokens=False)
    # the nodes spelling the thread prefix right after </Outlines> are contexts only
    ids = batch.rows.input_ids[0].tolist()
    counts = batch.counts[0].tolist()
    outlines_close = tok.convert_tokens_to_ids("</Outlines>")
    at = ids.index(outlines_close)
    n_completion = sum(len(c) for _, c in rollouts[0].pairs)
    assert int(batch.counts[0].sum()) == n_completion
    assert all(counts[at + 1 + j] == 0 for j in range(len(prefix)))


# ----------------------------------------------------------------------------------------------------
# the trainer


def _config(tmp_path, **kw):
    base = dict(model=str(TOY), n_train=40, n_eval=10, prompts_per_step=2, rollouts_per_prompt=3, steps=2,
                max_new_tokens=200, max_thread_tokens=80, lr=1e-3, out_dir=str(tmp_path / "run"),
                checkpoint_every=1, progress=False, threads=1, device="cpu")
    base.update(kw)
    return pgrpo.PGRPOConfig(**base)


def _length_reward(text, answer, stats):
    """A reward that varies between rollouts of a barely trained model (its answers are all wrong)."""
    from twlib.rewards import Reward

    return Reward(total=stats.total / 100.0, correct=False, acceleration=0.0, eta=stats.eta, self_parallelism=stats.self_parallelism)


def test_idle_steps_move_adam_unless_skipped(tok, problems):
    """A step whose advantages are all 0 has a zero gradient, yet AdamW moves the weights by its momentum;
    skip_idle_steps leaves them alone. A step with signal is never skipped."""
    live = _fake_rollouts(problems[:2], tok)
    idle = _fake_rollouts(problems[:2], tok)
    for r in idle:
        r.advantage = 0.0
    assert pgrpo.has_signal(pgrpo.build_batch(live, "group"))
    assert not pgrpo.has_signal(pgrpo.build_batch(idle, "group")) and not pgrpo.has_signal(None)
    moved = {}
    for skip in (False, True):
        torch.manual_seed(0)
        model = build_model("tiny", tok)
        config = pgrpo.PGRPOConfig(lr=1e-3, skip_idle_steps=skip)
        optimizer, _ = pgrpo.make_optimizer(model, config)
        first = pgrpo.update(model, optimizer, pgrpo.build_batch(live, "group"), config)
        assert first["grad_norm"] > 0                             # signal: a real step either way
        before = [p.detach().clone() for p in model.parameters()]
        out = pgrpo.update(model, optimizer, pgrpo.build_batch(idle, "group"), config)
        assert out["loss"] == 0.0 and out["grad_norm"] == 0.0
        moved[skip] = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    assert moved[False] > 1e-5   # momentum from the first step
    assert moved[True] == 0.0


def test_smoke_two_steps_every_parameter_changes(tmp_path):
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(str(TOY))
    cfg = _config(tmp_path, rollouts_per_prompt=4, temperature=1.5, reward_fn=_length_reward)
    result = pgrpo.train(cfg, quiet=True)
    after = result.model
    for (name, p0), (_, p1) in zip(start.named_parameters(), after.named_parameters()):
        assert not torch.equal(p0, p1), f"{name} did not change"
    assert math.isfinite(result.last["loss"])
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("step,reward,reward_std,zero_std_groups")
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_resume_gives_identical_weights(tmp_path):
    full = pgrpo.train(_config(tmp_path / "a", steps=3, reward_fn=_length_reward), quiet=True).model

    class Stop(Exception):
        pass

    def stop_after_two(step, _):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        pgrpo.train(_config(tmp_path / "b", steps=3, reward_fn=_length_reward), on_step=stop_after_two, quiet=True)
    resumed = pgrpo.train(_config(tmp_path / "b", steps=3, resume=True, reward_fn=_length_reward), quiet=True).model
    start = pgrpo.train(_config(tmp_path / "c", steps=1, lr=1e-12, reward_fn=_length_reward), quiet=True).model
    assert any(not torch.equal(a, b) for a, b in zip(full.parameters(), start.parameters()))  # it did train
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    assert len((tmp_path / "b" / "run" / "metrics.csv").read_text().splitlines()) == 4


def test_sequential_grpo_runs_through_the_same_code(tmp_path):
    cfg = _config(tmp_path, mode="sequential", steps=1)
    result = pgrpo.train(cfg, quiet=True)
    assert math.isfinite(result.last["loss"])
    tok = result.tokenizer
    rollouts = pgrpo.collect_rollouts(result.model, tok, pgrpo.prompt_pool(cfg)[:2], cfg, step=0)
    assert len(rollouts) == 2 * cfg.rollouts_per_prompt
    assert all(len(r.result.calls) == 1 for r in rollouts)  # GRPO: one call per rollout, whatever it writes


def test_config_errors_name_the_field(tmp_path):
    from twlib.train.sft import ConfigError

    with pytest.raises(ConfigError, match="rollouts_per_prompt"):
        pgrpo.load_pgrpo_config(None, ["rollouts_per_prompt=1"])
    with pytest.raises(ConfigError, match="acceleration"):
        pgrpo.load_pgrpo_config(None, ["acceleration=quick"])
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        pgrpo.load_pgrpo_config(None, ["stepz=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("temperature: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*temperature"):
        pgrpo.load_pgrpo_config(bad)
    assert pgrpo.main(["--config", str(bad)]) == 2


def test_prompt_pool_from_a_jsonl_file(tmp_path, capsys):
    from twlib.cli import main as cli
    from twlib.infra.problems import load_parquet, problems_from_jsonl

    good = tmp_path / "rl.jsonl"
    good.write_text('{"problem": "What is 2+3?", "answer": "5"}\n\n{"problem": "Half of 8?", "answer": 4}\n')
    problems = problems_from_jsonl(good, template="Q: {prompt}\nA:")
    assert [(p.prompt, p.answer, p.task) for p in problems] == [("Q: What is 2+3?\nA:", "5", "math"),
                                                               ("Q: Half of 8?\nA:", "4", "math")]
    assert problems[1].meta["line"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x", "answer": "1"}\n{"question": "y", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'problem' is missing.*question"):
        problems_from_jsonl(bad)
    (tmp_path / "junk.jsonl").write_text("{nope\n")
    with pytest.raises(ValueError, match=r"junk.jsonl:1: not JSON"):
        problems_from_jsonl(tmp_path / "junk.jsonl")
    out = tmp_path / "pool.parquet"
    assert cli(["prompts", "--jsonl", str(good), "--out", str(out), "--task", "groupsum"]) == 0
    assert cli(["prompts", "--jsonl", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    cfg = pgrpo.PGRPOConfig(data=str(out), task="math", n_train=1).validate()
    assert [p.prompt for p in pgrpo.prompt_pool(cfg)] == ["What is 2+3?"]
    assert load_parquet(out)[0].task == "groupsum"
    with pytest.raises(Exception, match="task"):
        pgrpo.PGRPOConfig(task="math").validate()  # math prompts are not generated: they need `data`
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        pgrpo.prompt_pool(pgrpo.PGRPOConfig(data=str(tmp_path / "missing.parquet"), task="math").validate())
