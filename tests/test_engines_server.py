"""Opt-in tier: the state machine against a real completions server gives the same greedy results as
HFEngine in process, on held-out eval problems.

Skipped unless TWLAB_SERVER_URL is set. Start a server first, e.g. llama-cpp-python on the shipped toy
checkpoint (`bash scripts/setup_llamacpp_server.sh`, which prints the line below), then:

    TWLAB_SERVER_URL=http://127.0.0.1:8080 TWLAB_SERVER_KIND=llama-cpp-python \\
        .venv/bin/python -m pytest -m server tests/test_engines_server.py

Environment:
- TWLAB_SERVER_URL    base URL (without /v1/completions);
- TWLAB_SERVER_KIND   vllm (default; also serve_hf), sglang, llama-server, llama-cpp-python: see
                      twlib.engines.SERVER_KINDS (token-id or text prompts, llama.cpp's sampling defaults
                      neutralised);
- TWLAB_SERVER_MODEL  the checkpoint the server serves (default assets/checkpoints/toy-parallel): its
                      tokenizer and its transformers weights give the in-process reference;
- TWLAB_SERVER_N      eval problems (default 8).

A GGUF in f32 computes the same logits as transformers up to float rounding, so greedy decoding agrees
unless two logits are within ~1e-6 of each other; a mismatch is reported with the first differing call.
"""

import os
from pathlib import Path

import pytest

from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, sequential_decoder
from twlib.engines import SERVER_KINDS, engine_for_server

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not os.environ.get("TWLAB_SERVER_URL"), reason="set TWLAB_SERVER_URL to test against a server"),
]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.train.sft import eval_problems, load_config

    kind = os.environ.get("TWLAB_SERVER_KIND", "vllm")
    if kind not in SERVER_KINDS:
        pytest.fail(f"TWLAB_SERVER_KIND must be one of {sorted(SERVER_KINDS)}, got {kind!r}")
    path = os.environ.get("TWLAB_SERVER_MODEL", str(ROOT / "assets" / "checkpoints" / "toy-parallel"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    problems = eval_problems(load_config(str(ROOT / "configs" / "tiny-parallel.yaml")))
    prompts = [tok.encode(p.prompt) for p in problems[: int(os.environ.get("TWLAB_SERVER_N", "8"))]]
    # llama.cpp servers do not report their context; the setup script starts them with the model's own.
    max_context = None if kind in ("vllm", "sglang") else model.config.max_position_embeddings
    engine = engine_for_server(os.environ["TWLAB_SERVER_URL"], kind, tok, max_context, timeout=(10.0, 300.0))
    return tok, model, engine, prompts


def first_difference(a, b) -> str:
    for i, (x, y) in enumerate(zip(a.calls, b.calls)):
        if (x.context_ids, x.completion_ids) != (y.context_ids, y.completion_ids):
            return f"call {i} ({x.kind}): in process {x.completion_ids[:40]} vs server {y.completion_ids[:40]}"
    return f"{len(a.calls)} vs {len(b.calls)} calls"


@pytest.mark.parametrize("parallel", [True, False], ids=["state-machine", "sequential"])
def test_server_greedy_equals_hf_engine(setup, parallel):
    tok, model, engine, prompts = setup
    config = DecodeConfig(max_new_tokens=800)

    def decoder(e):
        return ParallelDecoder(e, tok, config) if parallel else sequential_decoder(e, tok, config)

    expected = decoder(HFEngine(model, tok)).decode(prompts)
    got = decoder(engine).decode(prompts)
    for i, (a, b) in enumerate(zip(expected, got)):
        assert b.text == a.text, f"problem {i}: {first_difference(a, b)}"
        assert [(c.context_ids, c.completion_ids, c.finish) for c in b.calls] == \
            [(c.context_ids, c.completion_ids, c.finish) for c in a.calls]
        assert b.flags == a.flags
    if parallel:
        assert sum(r.stats.blocks for r in got) > 0, "no block was decoded: the state machine was not exercised"
