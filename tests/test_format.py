"""twlib.format: round trips, the error catalogue, the state machine's calls and path statistics."""

import random

import pytest

from twlib.format import (
    DISTANCE_EXAMPLE, DISTANCE_PROMPT, Block, FormatError, Trajectory, count_path, engine_calls,
    is_valid, join_threads, outline_numbers, parse, path_stats, replay,
)
from conftest import random_trajectory

BLOCK = ("<Parallel>\n<Outlines>\n<Outline>1: plan A</Outline>\n<Outline>2: plan B</Outline>\n</Outlines>\n"
         "<Thread>\n1: body A\n</Thread><Thread>\n2: body B\n</Thread>\n</Parallel>\n")


def test_spec_block_parses_and_renders_back():
    traj = parse(BLOCK)
    assert traj.segments == (Block((" plan A", " plan B"), (" body A", " body B")), "\n")
    assert traj.render() == BLOCK


def test_round_trips_on_random_trajectories(rng):
    for _ in range(500):
        traj = random_trajectory(rng)
        text = traj.render()
        assert parse(text) == traj
        assert parse(text).render() == text


def test_trajectory_merges_text_segments():
    assert Trajectory(("a", "", "b", Block(("x",), ("y",)), "")).segments == ("ab", Block(("x",), ("y",)))


@pytest.mark.parametrize("text, message, line, col", [
    ("a<Parallel>\n<Outlines>\n</Outlines>\n", "empty <Outlines>", 3, 1),
    ("<Parallel>\n<Outlines>\n<Outline>1:a</Outline>\n</Outlines>\n<Thread>\n1:x\n</Thread>",
     "unclosed <Parallel>", 1, 1),
    ("<Parallel>\n<Outlines>\n<Outline>1:a\n</Outlines>\n", "unclosed <Outline>", 4, 1),
    ("<Parallel>\n<Outlines>\n<Outline>1:a</Outline>\n</Outlines>\n<Thread>\n1:x\n",
     "unclosed <Thread>", 5, 1),
    ("x\n<Thread>\n", "<Thread> outside a <Parallel> block", 2, 1),
    ("ok <Think> no", "unknown tag <Think>", 1, 4),
    ("<Conclusion>", "unknown tag <Conclusion>", 1, 1),
    ("<thread>", "did you mean <Thread>", 1, 1),
    ("<Parallel>\n<Outlines>\n<Outline>2:a</Outline>\n</Outlines>\n", "expected 1, found 2", 3, 10),
    ("<Parallel>\n<Outlines>\n<Outline>a</Outline>\n</Outlines>\n", "outline without a number", 3, 10),
    ("<Parallel>\n<Outlines>\n<Outline>1:a</Outline>\n<Outline>3:b</Outline>\n</Outlines>\n",
     "outline numbers must be 1..k", 4, 10),
    ("<Parallel>\n<Outlines>\n<Outline>1:a</Outline>\n</Outlines>\n<Thread>\n2:x\n</Thread>\n</Parallel>",
     "thread numbers must equal the outline numbers", 6, 1),
    ("<Parallel>\n<Outlines>\n<Outline>1:a</Outline>\n<Outline>2:b</Outline>\n</Outlines>\n"
     "<Thread>\n1:x\n</Thread>\n<Thread>\n2:y\n</Thread>\n</Parallel>", "text between sibling threads", 8, 10),
    ("<Parallel>\n<Outlines>\n<Outline>1:a</Outline>\n<Outline>2:b</Outline>\n</Outlines>\n"
     "<Thread>\n1:x\n</Thread>\n</Parallel>", "2 outlines but 1 thread", 8, 10),
    ("<Parallel>\n<Outlines>\n<Outline>1:a</Outline>\n</Outlines>\n<Thread>\n1: \n</Thread>\n</Parallel>",
     "empty thread 1", 5, 1),
    ("<Parallel>\n<Outlines>\n<Outline>1:a</Outline>\n</Outlines>\n<Thread>\n1:x</Thread>\n</Parallel>",
     "'\\n' right before </Thread>", 6, 4),
    ("<Parallel>\n<Outlines>\n<Outline>1:a</Outline>\n</Outlines>\n<Thread>\n1:x\n</Thread></Parallel>",
     "'\\n' after the last </Thread>", 7, 10),
    ("<Parallel>\n<Outlines>\n<Outline>1:a</Outline>\n</Outlines>\n<Thread>\n1:<Parallel>\n</Thread>",
     "blocks do not nest", 6, 3),
    ("<Parallel><Outlines>\n", "expected '\\n<Outlines>\\n' right after <Parallel>", 1, 11),
    ("<Parallel>\n<Outlines>\n<Outline>1:a</Outline>\n\n</Outlines>\n", "expected <Outline> or </Outlines>", 4, 1),
    ("<think>\n<think>", "nested <think>", 2, 1),
    ("a</think>", "</think> without <think>", 1, 2),
    ("<think>\nabc", "unclosed <think>", 1, 1),
])
def test_error_catalogue(text, message, line, col):
    with pytest.raises(FormatError) as info:
        parse(text)
    err = info.value
    assert message in str(err)
    assert (err.line, err.col) == (line, col), str(err)
    assert err.offset == len("\n".join(text.split("\n")[: line - 1])) + (1 if line > 1 else 0) + col - 1


def test_plain_text_and_lowercase_angle_brackets_are_fine():
    assert parse("if a<b> then c").segments == ("if a<b> then c",)
    assert parse("").segments == ()
    assert not is_valid("<Outline>")


def test_non_string_input_is_a_format_error():
    with pytest.raises(FormatError):
        parse(None)


def mutate(rng: random.Random, text: str) -> str:
    pieces = ["<Parallel>", "</Parallel>", "<Outlines>", "</Outlines>", "<Outline>", "</Outline>",
              "<Thread>", "</Thread>", "<think>", "</think>", "\n", "1:", "2:", "<", ">", "<Thin", "x"]
    for _ in range(rng.randint(1, 3)):
        i = rng.randint(0, len(text))
        op = rng.random()
        if op < 0.4:
            text = text[:i] + rng.choice(pieces) + text[i:]
        elif op < 0.8:
            j = min(len(text), i + rng.randint(1, 12))
            text = text[:i] + text[j:]
        else:
            j = min(len(text), i + rng.randint(1, 12))
            text = text[:i] + text[i:j][::-1] + text[j:]
    return text


def test_fuzz_mutations_raise_only_format_error(rng):
    seeds = [random_trajectory(rng).render() for _ in range(50)] + [DISTANCE_EXAMPLE, BLOCK]
    valid = invalid = 0
    for n in range(5000):
        text = mutate(rng, seeds[n % len(seeds)])
        try:
            traj = parse(text)
        except FormatError as err:
            assert err.line >= 1 and err.col >= 1 and 0 <= err.offset <= len(text)
            invalid += 1
            continue
        assert traj.render() == text
        assert replay(engine_calls(traj, "p"), "p") == text
        valid += 1
    assert invalid > 1000 and valid > 100  # the fuzzer exercises both sides


def test_distance_example_makes_the_four_calls_of_the_spec():
    calls = engine_calls(DISTANCE_EXAMPLE, DISTANCE_PROMPT)
    assert [c.kind for c in calls] == ["sequential", "thread", "thread", "sequential"]
    first, t1, t2, last = calls
    assert first.context == DISTANCE_PROMPT and first.completion.endswith("</Outlines>")
    assert t1.context == first.context + first.completion + "\n<Thread>\n1:"
    assert t2.context == first.context + first.completion + "\n<Thread>\n2:"
    assert t1.completion == " x2-x1 = 7-1 = 6, so (x2-x1)^2 = 36.\n</Thread>"
    assert last.context == first.context + first.completion + join_threads([t1.completion, t2.completion])
    assert last.completion.startswith("</Parallel>\nThe sum is")
    assert replay(calls, DISTANCE_PROMPT) == DISTANCE_EXAMPLE


def test_engine_calls_replay_random(rng):
    for _ in range(300):
        text = random_trajectory(rng).render()
        calls = engine_calls(text, "Q?\n")
        assert replay(calls, "Q?\n") == text
        blocks = parse(text).blocks
        assert sum(c.kind == "thread" for c in calls) == sum(len(b.threads) for b in blocks)


def test_replay_rejects_a_wrong_context():
    calls = engine_calls(DISTANCE_EXAMPLE, DISTANCE_PROMPT)
    with pytest.raises(ValueError):
        replay(calls, "another prompt")


def test_join_rule():
    assert join_threads(["a\n</Thread>", "b\n</Thread>"]) == "\n<Thread>\n1:a\n</Thread><Thread>\n2:b\n</Thread>\n"


def test_outline_numbers_reads_newest_block_and_dedupes():
    ctx = ("<Outlines>\n<Outline>1:a</Outline>\n</Outlines>..." 
           "<Outlines>\n<Outline>1:a</Outline>\n<Outline>2:b</Outline>\n<Outline>2:c</Outline>\n</Outlines>")
    assert outline_numbers(ctx) == [1, 2]
    assert outline_numbers("no outlines") == []
    assert outline_numbers("<Outlines>\n<Outline>x</Outline>\n</Outlines>") == []


def test_path_stats_by_hand():
    # "ab" (2) + <Parallel> block + "c": threads "\n1:xyz\n" = 7 and "\n2:x\n" = 5 tokens.
    text = ("ab<Parallel>\n<Outlines>\n<Outline>1:p</Outline>\n<Outline>2:q</Outline>\n</Outlines>\n"
            "<Thread>\n1:xyz\n</Thread><Thread>\n2:x\n</Thread>\n</Parallel>c")
    stats = path_stats(text)
    outlines = 1 + 1 + 1 + 1 + 2 * (1 + 3 + 1 + 1) + 1 + 1  # <Parallel>\n<Outlines>\n, 2 outlines, </Outlines>\n
    wrappers = 4  # <Thread>, </Thread> twice
    tail = 1 + 1  # "\n", </Parallel>
    sequential = 2 + outlines + wrappers + tail + 1
    assert stats.total == sequential + 7 + 5
    assert stats.longest == sequential + 7
    assert stats.eta == pytest.approx(1 - stats.longest / stats.total)
    assert stats.self_parallelism == pytest.approx(stats.total / stats.longest)
    assert (stats.blocks, stats.threads) == (1, 2)


def test_path_stats_sequential_and_empty():
    assert path_stats("hello").self_parallelism == 1.0 and path_stats("hello").total == 5
    assert path_stats("").total == 0 and path_stats("").self_parallelism == 1.0


def test_path_stats_is_tolerant_of_malformed_outputs(rng):
    for _ in range(500):
        text = mutate(rng, random_trajectory(rng).render())
        stats = path_stats(text)
        assert 0 < stats.longest <= stats.total or stats.total == 0


def test_count_path_unclosed_thread_counts_to_the_end():
    units = ["<Parallel>", "<Thread>", "a", "b", "c"]
    stats = count_path(units)
    assert stats.total == 5 and stats.longest == 2 + 3
