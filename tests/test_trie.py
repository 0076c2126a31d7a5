"""twlib.trie: packed log-probs equal each call run alone, no leakage, masks agree, linear packing."""

import random
import time

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from twlib.format import DISTANCE_EXAMPLE, DISTANCE_PROMPT, Block, Trajectory, engine_calls
from twlib.tokenizer import build_tokenizer
from twlib.trie import (
    IGNORE, block_mask, collate, dense_mask, logprobs, pack, path_nodes, sequence_logprobs,
    tokenize_calls,
)
from conftest import random_trajectory


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny_model(vocab_size, impl="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      tie_word_embeddings=True, attn_implementation=impl)
    return Qwen3ForCausalLM(cfg).eval()


THREE_THREADS = Trajectory((
    "<think>\nsplit\n",
    Block((" first", " second", " third"), (" aaa bbb", " ccc", " dddd eeee f")),
    "\ncombine\n</think>\n\\boxed{7}",
))


def assert_pairs_match(model, packed, pairs, tol=1e-5):
    lp = logprobs(model, packed)
    worst = 0.0
    for context, completion in pairs:
        nodes = path_nodes(packed, context + completion)
        got = lp[0, nodes[len(context):]]
        want = sequence_logprobs(model, context, completion)
        worst = max(worst, (got - want).abs().max().item())
    assert worst < tol, worst
    return lp


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("loss", ["completions", "paper"])
def test_packed_logprobs_equal_each_call_alone(tok, impl, loss):
    model = tiny_model(len(tok), impl)
    for text, prompt in [(DISTANCE_EXAMPLE, DISTANCE_PROMPT), (THREE_THREADS.render(), "Q: 3 items\n")]:
        pairs = tokenize_calls(engine_calls(text, prompt), tok)
        packed = pack(pairs, loss=loss)
        with torch.no_grad():
            assert_pairs_match(model, packed, pairs)


def test_packed_logprobs_random_trajectories(tok, rng):
    model = tiny_model(len(tok))
    for _ in range(6):
        text = random_trajectory(rng).render()
        pairs = tokenize_calls(engine_calls(text, "prompt:"), tok)
        with torch.no_grad():
            assert_pairs_match(model, pack(pairs), pairs)


def test_pack_shares_prefixes_and_trains_each_completion_token_once(tok):
    calls = engine_calls(DISTANCE_EXAMPLE, DISTANCE_PROMPT)
    pairs = tokenize_calls(calls, tok)
    packed = pack(pairs)
    separate = sum(len(c) + len(d) for c, d in pairs)
    assert packed.shape[1] < separate
    # every completion token trained exactly once, nothing else trained
    trained = set()
    for context, completion in pairs:
        nodes = path_nodes(packed, context + completion)
        trained.update(nodes[len(context):])
    assert set((packed.labels[0] != IGNORE).nonzero().squeeze(-1).tolist()) == trained
    assert packed.labels[0, 0] == IGNORE and packed.parents[0, 0] == -1
    # positions are depths; parents precede children
    parents, positions = packed.parents[0], packed.position_ids[0]
    for i in range(1, packed.shape[1]):
        assert parents[i] < i and positions[i] == positions[parents[i]] + 1


def test_paper_policy_trains_every_response_token(tok):
    pairs = tokenize_calls(engine_calls(DISTANCE_EXAMPLE, DISTANCE_PROMPT), tok)
    ours, paper = pack(pairs), pack(pairs, loss="paper")
    assert torch.equal(ours.input_ids, paper.input_ids)
    ours_set = set((ours.labels[0] != IGNORE).nonzero().squeeze(-1).tolist())
    paper_set = set((paper.labels[0] != IGNORE).nonzero().squeeze(-1).tolist())
    assert ours_set < paper_set
    prompt_len = len(pairs[0][0])
    assert paper_set == set((paper.position_ids[0] >= prompt_len).nonzero().squeeze(-1).tolist())
    # the extra tokens are the orchestrator's inserts and the copy of thread 2 behind thread 1
    thread2 = tok.encode("<Thread>\n2:", add_special_tokens=False) + pairs[2][1]
    assert len(paper_set - ours_set) >= len(thread2)


def thread_nodes(packed, pairs, index):
    context, completion = pairs[index]
    return path_nodes(packed, context + completion)[len(context):]


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_no_leakage_between_threads(tok, kind):
    model = tiny_model(len(tok), "eager" if kind == "float" else "sdpa")
    changed = Trajectory((THREE_THREADS.segments[0],
                          Block(THREE_THREADS.blocks[0].outlines, (" aaa bbb", " xyz", " dddd eeee f")),
                          THREE_THREADS.segments[2]))
    a = tokenize_calls(engine_calls(THREE_THREADS, "Q\n"), tok)
    b = tokenize_calls(engine_calls(changed, "Q\n"), tok)
    pa, pb = pack(a), pack(b)
    with torch.no_grad():
        la = logprobs(model, pa, mask=pa.attention_mask(kind))
        lb = logprobs(model, pb, mask=pb.attention_mask(kind))
        for i in (1, 3):  # threads 1 and 3 do not see thread 2
            na, nb = thread_nodes(pa, a, i), thread_nodes(pb, b, i)
            assert torch.allclose(la[0, na], lb[0, nb], atol=1e-6)
        # thread 2 itself and the continuation do change: the test can fail
        assert not torch.allclose(la[0, thread_nodes(pa, a, 4)], lb[0, thread_nodes(pb, b, 4)], atol=1e-6)
        # with a plain causal mask over the same row, thread 3 sees thread 2: leakage
        ca = logprobs(model, pa, mask=pa.causal_mask(kind))
        cb = logprobs(model, pb, mask=pb.causal_mask(kind))
        assert not torch.allclose(ca[0, thread_nodes(pa, a, 3)], cb[0, thread_nodes(pb, b, 3)], atol=1e-6)


def test_dense_masks_are_ancestor_only(tok, rng):
    pairs = tokenize_calls(engine_calls(random_trajectory(rng), "p"), tok)
    packed = pack(pairs)
    allowed = packed.attention_mask("bool")[0, 0]
    additive = packed.attention_mask("float")[0, 0]
    for q in range(packed.shape[1]):
        assert set(allowed[q].nonzero().squeeze(-1).tolist()) == set(packed.ancestors(0, q))
    assert torch.equal(additive == 0, allowed)
    assert additive.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("block_size", [4, 16, 128])
def test_block_mask_structure_matches_dense(tok, rng, block_size):
    tries = [pack(tokenize_calls(engine_calls(random_trajectory(rng), "p"), tok)) for _ in range(3)]
    packed = collate(tries, max_tokens=4000)
    dense = dense_mask(packed.exits)[:, 0]
    bm = block_mask(packed.exits, block_size)
    rows, length = packed.shape
    n = -(-length // block_size)
    pad = n * block_size - length
    grid = torch.nn.functional.pad(dense, (0, pad, 0, pad)).view(rows, n, block_size, n, block_size)
    any_ = grid.any(-1).any(-2)
    all_ = grid.all(-1).all(-2)
    for r in range(rows):
        for qb in range(n):
            partial = set(bm.kv_indices[r, 0, qb, : bm.kv_num_blocks[r, 0, qb]].tolist())
            full = set(bm.full_kv_indices[r, 0, qb, : bm.full_kv_num_blocks[r, 0, qb]].tolist())
            assert not partial & full
            assert partial | full == set(any_[r, qb].nonzero().squeeze(-1).tolist())
            assert full <= set(all_[r, qb].nonzero().squeeze(-1).tolist())
    # mask_mod agrees elementwise with the dense mask
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    for r in range(rows):
        assert torch.equal(bm.mask_mod(torch.tensor(r), 0, q, k), dense[r])


@pytest.mark.slow
def test_flex_attention_block_mask_forward_matches(tok):
    """FlexAttention with the BlockMask (forward only on CPU; compiles ~20 s on first call)."""
    model = tiny_model(len(tok), "flex_attention")
    pairs = tokenize_calls(engine_calls(DISTANCE_EXAMPLE, DISTANCE_PROMPT), tok)
    with torch.no_grad():
        assert_pairs_match(model, pack(pairs), pairs)


def test_collate_rows_match_single_rows_and_padding_is_invisible(tok, rng):
    model = tiny_model(len(tok))
    texts = [random_trajectory(rng).render() for _ in range(5)]
    tries = [pack(tokenize_calls(engine_calls(t, f"q{i}"), tok)) for i, t in enumerate(texts)]
    batch = collate(tries, max_tokens=max(t.shape[1] for t in tries) + 40, pad_id=tok.pad_token_id)
    assert batch.shape[0] < len(tries)  # several trajectories share a row
    assert batch.num_tokens == sum(t.shape[1] for t in tries)
    with torch.no_grad():
        lp = logprobs(model, batch)
        other = collate(tries, max_tokens=batch.shape[1], pad_id=tok.eos_token_id)
        lp_other = logprobs(model, other)
        for i, t in enumerate(tries):
            single = logprobs(model, t)[0]
            r, cols = (batch.sample_ids == i).nonzero(as_tuple=True)
            assert torch.allclose(lp[r, cols], single, atol=1e-5)
            r2, cols2 = (other.sample_ids == i).nonzero(as_tuple=True)
            assert torch.allclose(lp_other[r2, cols2], single, atol=1e-5)
    assert (batch.labels[batch.sample_ids < 0] == IGNORE).all()


def test_collate_rejects_oversized_trajectory(tok):
    t = pack(tokenize_calls(engine_calls(DISTANCE_EXAMPLE, DISTANCE_PROMPT), tok))
    with pytest.raises(ValueError, match="more than max_tokens"):
        collate([t], max_tokens=10)


def test_pack_errors():
    with pytest.raises(ValueError, match="loss policy"):
        pack([([1], [2])], loss="everything")
    with pytest.raises(ValueError, match="tokenizer"):
        pack(engine_calls("abc", "p"))
    with pytest.raises(ValueError, match="at least one"):
        pack([])


def synthetic_pairs(n_tokens, rng, vocab=200):
    """Calls of a long synthetic trajectory: blocks of 4 threads, ~n_tokens in total."""
    pairs, context = [], [rng.randrange(vocab) for _ in range(50)]
    while sum(len(c) + len(d) for c, d in pairs) < n_tokens:
        head = [rng.randrange(vocab) for _ in range(40)]
        pairs.append((list(context), head))
        context = context + head
        threads = [[rng.randrange(vocab) for _ in range(120)] for _ in range(4)]
        for i, t in enumerate(threads):
            pairs.append((context + [i], t))
        context = context + [0] + sum(threads, [])
    return pairs


def test_packing_is_linear_time():
    rng = random.Random(0)

    def best_time(pairs):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            packed = pack(pairs)
            best = min(best, time.perf_counter() - start)
        return best, sum(len(c) + len(d) for c, d in pairs)

    # a block appends to the context, so total call tokens grow ~quadratically with the trajectory;
    # "linear" means linear in the tokens of the calls handed to pack.
    t_small, n_small = best_time(synthetic_pairs(20_000, rng))
    t_large, n_large = best_time(synthetic_pairs(160_000, rng))
    ratio = (t_large / t_small) / (n_large / n_small)
    assert ratio < 2.5, f"time grew {t_large / t_small:.1f}x for {n_large / n_small:.1f}x tokens"
