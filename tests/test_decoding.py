"""twlib.decoding: the state machine reproduces the trainer's calls, survives adversarial engines, and
HFEngine's batched / forked / padded decoding equals decoding each request alone."""

import random

import pytest
import torch

from twlib.decoding import (
    Completion, DecodeConfig, HFEngine, ParallelDecoder, Request, SamplingParams, sequential_decoder,
)
from twlib.format import engine_calls, path_stats
from twlib.tasks import generate
from twlib.tokenizer import build_tokenizer
from twlib.trie import tokenize_calls
from conftest import random_trajectory


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


class OracleEngine:
    """Answers each request with the completion the trajectory's own calls give for that context."""

    max_context = 100_000

    def __init__(self, table):
        self.table = table
        self.batches = []

    def generate(self, requests, sampling):
        self.batches.append(len(requests))
        outs = []
        for r in requests:
            ids = self.table[tuple(r.prompt_ids)]
            assert len(ids) <= r.max_new_tokens
            outs.append(Completion(list(ids), "stop"))
        return outs


def oracle_for(text, prompt, tok):
    pairs = tokenize_calls(engine_calls(text, prompt), tok, add_eos=True)
    return OracleEngine({tuple(c): d for c, d in pairs}), pairs


@pytest.mark.parametrize("mode", ["batched", "serial"])
def test_state_machine_reproduces_engine_calls(tok, rng, mode):
    problems = generate("groupsum", 30, seed=3)
    cases = [(p.parallel, p.prompt) for p in problems] + [(random_trajectory(rng).render(), "Q:\n") for _ in range(30)]
    for text, prompt in cases:
        engine, pairs = oracle_for(text, prompt, tok)
        decoder = ParallelDecoder(engine, tok, DecodeConfig(max_new_tokens=10_000, thread_mode=mode))
        result = decoder.decode(tok.encode(prompt))
        assert result.text == text
        assert result.finished and result.valid and not result.flags
        assert [(c.context_ids, c.completion_ids) for c in result.calls] == pairs
        assert result.stats == path_stats(text)
        kinds = [c.kind for c in result.calls]
        assert kinds == [c.kind for c in engine_calls(text, prompt)]
        blocks = path_stats(text).blocks
        if mode == "batched":  # one engine call per block of threads
            assert len(engine.batches) == kinds.count("sequential") + blocks
        else:
            assert len(engine.batches) == len(kinds)


def test_many_problems_share_engine_calls(tok):
    problems = generate("groupsum", 8, seed=4)
    table = {}
    for p in problems:
        table.update(oracle_for(p.parallel, p.prompt, tok)[0].table)
    engine = OracleEngine(table)
    decoder = ParallelDecoder(engine, tok, DecodeConfig(max_new_tokens=10_000))
    results = decoder.decode([tok.encode(p.prompt) for p in problems], batch_size=8)
    assert [r.text for r in results] == [p.parallel for p in problems]
    assert max(engine.batches) > 8  # threads of several problems in one engine call


class ScriptedEngine:
    """Adversarial: answers every request with `script(request, rng)`, capped at max_new_tokens."""

    def __init__(self, script, seed=0, max_context=600):
        self.script, self.rng, self.calls = script, random.Random(seed), 0
        self.max_context = max_context

    def generate(self, requests, sampling):
        outs = []
        for r in requests:
            self.calls += 1
            assert len(r.prompt_ids) + r.max_new_tokens <= self.max_context
            ids = list(self.script(r, self.rng))
            cut = [i for i, t in enumerate(ids) if t in r.stop_ids]
            if cut and cut[0] < r.max_new_tokens:
                outs.append(Completion(ids[: cut[0] + 1], "stop"))
            else:
                outs.append(Completion(ids[: r.max_new_tokens], "length"))
        return outs


def scripts(tok):
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    eos = tok.eos_token_id
    many = enc("<Parallel>\n<Outlines>\n" + "".join(f"<Outline>{i}:</Outline>\n" for i in range(1, 301)) + "</Outlines>")
    vocab = list(range(len(tok)))
    return {
        "never_close_thread": lambda r, g: enc("<Parallel>\n<Outlines>\n<Outline>1:a</Outline>\n</Outlines>") if r.prompt_ids[-1] != enc(":")[0] else enc("x") * 10_000,
        "hundreds_of_outlines": lambda r, g: many if r.prompt_ids[-1] != enc(":")[0] else enc("y\n</Thread>"),
        "no_outline_numbers": lambda r, g: enc("<Parallel>\n<Outlines>\n<Outline>plan</Outline>\n</Outlines>"),
        "eos_mid_thread": lambda r, g: enc("<Outlines>\n<Outline>1:a</Outline>\n<Outline>2:b</Outline>\n</Outlines>") if r.prompt_ids[-1] != enc(":")[0] else enc("abc") + [eos],
        "duplicates": lambda r, g: enc("<Outlines>\n<Outline>1:a</Outline>\n<Outline>1:b</Outline>\n</Outlines>") if r.prompt_ids[-1] != enc(":")[0] else enc("z\n</Thread>"),
        "blocks_forever": lambda r, g: enc("<Outlines>\n<Outline>1:a</Outline>\n</Outlines>") if r.prompt_ids[-1] != enc(":")[0] else enc("q\n</Thread>"),
        "never_stop": lambda r, g: enc("text ") * 10_000,
        "random_tokens": lambda r, g: [g.choice(vocab) for _ in range(g.randint(0, 80))] + ([eos] if g.random() < 0.1 else []),
    }


EXPECTED_FLAG = {
    "never_close_thread": "thread_unclosed", "hundreds_of_outlines": "too_many_threads",
    "no_outline_numbers": "no_outlines", "eos_mid_thread": "thread_eos", "duplicates": "duplicate_outlines",
    "never_stop": "context_overflow",
}


@pytest.mark.parametrize("name", list(EXPECTED_FLAG) + ["blocks_forever", "random_tokens"])
def test_adversarial_engines_terminate_within_caps(tok, name):
    many = name == "hundreds_of_outlines"
    budget = {"hundreds_of_outlines": 4000, "never_stop": 2000}.get(name, 400)
    config = DecodeConfig(max_new_tokens=budget, max_thread_tokens=60, max_threads=8, max_iterations=5)
    engine = ScriptedEngine(scripts(tok)[name], max_context=8000 if many else 600)
    decoder = ParallelDecoder(engine, tok, config)
    for seed in range(20 if name == "random_tokens" else 1):
        engine.rng.seed(seed)
        result = decoder.decode(tok.encode("prompt\n"))
        generated = sum(len(c.completion_ids) for c in result.calls)
        assert generated <= config.max_new_tokens
        assert len(result.prompt_ids) + len(result.response_ids) <= engine.max_context + 5
        assert sum(c.kind == "thread" for c in result.calls) <= config.max_threads * (config.max_iterations + 1)
        if name in EXPECTED_FLAG:
            assert EXPECTED_FLAG[name] in result.flags, result.flags
    if name == "blocks_forever":
        assert "iteration_cap" in result.flags or "token_budget" in result.flags


def test_sequential_decoder_ignores_outlines(tok):
    text = "<think>\nplain reasoning\n</think>\n\\boxed{3}"
    engine, pairs = oracle_for(text, "Q\n", tok)
    result = sequential_decoder(engine, tok).decode(tok.encode("Q\n"))
    assert result.text == text and len(result.calls) == 1 and result.stats.self_parallelism == 1.0


def test_decoder_requires_single_token_tags():
    plain = build_tokenizer(with_tags=False)
    with pytest.raises(ValueError, match="single token"):
        ParallelDecoder(OracleEngine({}), plain)



# ----------------------------------------------------------------------------------------------------
# HFEngine on a briefly trained toy model (assets/checkpoints/toy-parallel: 0.43M params, ~3 min of trie
# SFT from scratch; it writes blocks, outlines and threads, though not always the right digits)

TOY = __import__("pathlib").Path(__file__).resolve().parent.parent / "assets" / "checkpoints" / "toy-parallel"


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(TOY).eval(), AutoTokenizer.from_pretrained(TOY)


def greedy_alone(model, prompt, max_new_tokens, stops):
    """Reference: plain greedy decoding of one prompt from scratch, no cache, no batching."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in stops:
                break
    return out


def test_hf_engine_batched_fork_equals_each_request_alone(toy):
    model, tok = toy
    problems = [p for p in generate("groupsum", 30, seed=21) if p.meta["k"] >= 2][:6]
    stops = (tok.convert_tokens_to_ids("</Thread>"), tok.convert_tokens_to_ids("</Outlines>"), tok.eos_token_id)
    # the thread requests of one problem share its context (forked once); requests of several problems and
    # whole prompts of unequal length share nothing
    five = next(p for p in problems if p.meta["k"] == 5)
    threads = [Request(c, 40, stops) for c, _ in tokenize_calls(engine_calls(five.parallel, five.prompt), tok)[1:6]]
    mixed = [Request(c, 40, stops) for p in problems[:3] for c, _ in tokenize_calls(engine_calls(p.parallel, p.prompt), tok)[:2]]
    mixed += [Request(tok.encode(p.prompt), 60, stops) for p in problems[3:]]
    for requests, shared in ((threads, True), (mixed, False)):
        engine = HFEngine(model, tok)
        outs = engine.generate(requests, SamplingParams())
        for r, o in zip(requests, outs):
            assert o.ids == greedy_alone(model, r.prompt_ids, r.max_new_tokens, set(r.stop_ids))
        if shared:  # the shared context is prefilled once, not once per thread
            assert engine.stats["prefill_tokens"] < sum(len(r.prompt_ids) for r in requests) / 2


def test_decoding_modes_agree_on_a_real_model(toy):
    model, tok = toy
    prompts = [tok.encode(p.prompt) for p in generate("groupsum", 6, seed=22)]
    config = DecodeConfig(max_new_tokens=300)
    reference = ParallelDecoder(HFEngine(model, tok, prefix_cache=False), tok,
                                DecodeConfig(max_new_tokens=300, thread_mode="serial")).decode(prompts)
    assert any(r.stats.blocks for r in reference), "the toy model should write at least one block"
    for engine, mode, batch in [(HFEngine(model, tok), "batched", 1), (HFEngine(model, tok), "serial", 1),
                                (HFEngine(model, tok), "batched", 6)]:
        decoder = ParallelDecoder(engine, tok, DecodeConfig(max_new_tokens=300, thread_mode=mode))
        results = decoder.decode(prompts, batch_size=batch)
        assert [r.response_ids for r in results] == [r.response_ids for r in reference]
        assert [r.flags for r in results] == [r.flags for r in reference]


def test_sampling_is_seeded(toy):
    model, tok = toy
    prompt = tok.encode(generate("groupsum", 1, seed=23)[0].prompt)
    engine = HFEngine(model, tok)
    runs = [engine.generate([Request(prompt, 40)], SamplingParams(temperature=1.0, top_p=0.9, seed=s))[0].ids
            for s in (1, 1, 2)]
    engine2 = HFEngine(model, tok)
    again = engine2.generate([Request(prompt, 40)], SamplingParams(temperature=1.0, top_p=0.9, seed=1))[0].ids
    assert runs[0] != runs[2] or runs[1] != runs[2]
    assert again == runs[0]


def test_response_prefix_forces_the_parallel_form(toy):
    """`DecodeConfig.response_prefix` is part of the response: text, token counts and format check."""
    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, sequential_decoder

    model, tok = toy
    single = [p for p in generate("groupsum", 40, seed=5) if p.meta["k"] == 1][:2]  # greedy: no block
    prompts = [tok.encode(p.prompt) for p in single]
    free = ParallelDecoder(HFEngine(model, tok), tok, DecodeConfig(max_new_tokens=200)).decode(prompts, batch_size=2)
    forced = ParallelDecoder(HFEngine(model, tok), tok, DecodeConfig(max_new_tokens=200,
                             response_prefix="<think>\n<Parallel>\n")).decode(prompts, batch_size=2)
    for a, b in zip(free, forced):
        assert a.stats.blocks == 0 and not a.text.startswith("<think>\n<Parallel>")
        assert b.text.startswith("<think>\n<Parallel>\n<Outlines>") and b.stats.blocks >= 1
        assert b.response_ids[:4] == tok.encode("<think>\n<Parallel>\n")
    # a sequential decoder with a prefix continues after it
    seq = sequential_decoder(HFEngine(model, tok), tok, DecodeConfig(max_new_tokens=30, response_prefix="<think>\nA:"))
    assert seq.decode(prompts[0]).text.startswith("<think>\nA:")


# ----------------------------------------------------------------------------------------------------
# The failure policy, case by case (moved here from notebook 03): each case gets exactly its flag, and the
# policy's consequence (stop or go on, a text that still parses or not) holds.


def _policy_run(tok, script, max_context=600, **config):
    config = DecodeConfig(**{"max_new_tokens": 300, "max_thread_tokens": 40, "max_threads": 4, **config})
    return ParallelDecoder(ScriptedEngine(lambda r, g: script(r), max_context=max_context), tok,
                           config).decode(tok.encode("prompt\n", add_special_tokens=False))


@pytest.fixture(scope="module")
def policy(tok):
    """Helpers for one-case scripts: enc, eos, the `</Outlines>` id, is_thread(request), outlines(*items)."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    colon = enc(":")[0]

    def outlines(*items):
        return enc("<Parallel>\n<Outlines>\n" + "".join(f"<Outline>{i}</Outline>\n" for i in items) + "</Outlines>")

    return dict(enc=enc, eos=tok.eos_token_id, close=tok.convert_tokens_to_ids("</Outlines>"),
                is_thread=lambda r: r.prompt_ids[-1] == colon, outlines=outlines)


def test_no_outlines_stops(tok, policy):
    r = _policy_run(tok, lambda req: policy["outlines"]("plan without a number"))
    assert r.flags == ["no_outlines"] and not r.finished and not any(c.kind == "thread" for c in r.calls)


def test_duplicate_outlines_are_deduplicated_and_decoding_goes_on(tok, policy):
    p = policy
    r = _policy_run(tok, lambda req: p["enc"]("x\n</Thread>") if p["is_thread"](req) else
                    (p["outlines"]("1:a", "1:b", "2:c") if p["close"] not in req.prompt_ids
                     else p["enc"]("</Parallel>\ndone") + [p["eos"]]))
    assert r.flags == ["duplicate_outlines"] and r.finished and r.stats.threads == 2
    assert not r.valid  # the text keeps the model's outlines as written


def test_too_many_threads_keeps_the_first_max_threads(tok, policy):
    p = policy
    r = _policy_run(tok, lambda req: p["enc"]("y\n</Thread>") if p["is_thread"](req) else
                    (p["outlines"](*[f"{i}:g{i}" for i in range(1, 8)]) if p["close"] not in req.prompt_ids
                     else p["enc"]("</Parallel>\ndone") + [p["eos"]]))
    assert r.flags == ["too_many_threads"] and r.stats.threads == 4 and r.finished and not r.valid


def test_an_unclosed_thread_is_closed_and_decoding_stops(tok, policy):
    p = policy
    r = _policy_run(tok, lambda req: p["enc"]("x" * 1000) if p["is_thread"](req) else p["outlines"]("1:a", "2:b"))
    assert r.flags == ["thread_unclosed", "thread_unclosed"] and r.valid and not r.finished


def test_a_thread_ending_with_eos_is_closed_and_only_it_is_flagged(tok, policy):
    p = policy
    one = p["enc"]("1")[0]
    r = _policy_run(tok, lambda req: (p["enc"]("ok\n</Thread>") if req.prompt_ids[-2] == one
                                      else p["enc"]("abc") + [p["eos"]])
                    if p["is_thread"](req) else p["outlines"]("1:a", "2:b"))
    assert r.flags == ["thread_eos"] and r.valid and not r.finished


def test_iteration_cap_and_token_budget_end_a_model_that_opens_block_after_block(tok, policy):
    p = policy
    forever = lambda req: p["enc"]("q\n</Thread>") if p["is_thread"](req) else p["enc"]("</Parallel>\n") * (
        p["close"] in req.prompt_ids) + p["outlines"]("1:a", "2:b")
    r = _policy_run(tok, forever, max_iterations=3, max_new_tokens=2000, max_context=4000)
    assert r.flags == ["iteration_cap"]
    # a budget that runs out exactly when the third block is joined: the tokens of every call but the last
    budget = sum(len(c.completion_ids) for c in r.calls[:-1])
    r = _policy_run(tok, forever, max_iterations=32, max_new_tokens=budget, max_context=4000)
    assert r.flags == ["token_budget"] and sum(len(c.completion_ids) for c in r.calls) == budget


def test_context_overflow_cuts_at_the_window_and_the_budget_truncates(tok, policy):
    text = lambda req: policy["enc"]("text ") * 1000
    r = _policy_run(tok, text, max_context=200, max_new_tokens=1000)
    assert r.flags == ["context_overflow"] and len(r.prompt_ids) + len(r.response_ids) <= 200
    r = _policy_run(tok, text, max_context=2000, max_new_tokens=100)
    assert r.flags == ["truncated"]
