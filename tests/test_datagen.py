"""twlib.datagen (the pure steps of stage 1) and twlib.infra.chat / rewrite / arc: the pure steps, the whole
stage 1 against a scripted chat server (nonsense,
wrong line numbers, a 500, the cache, resume), Table-8 statistics against hand-computed values, the
self-training filter on a scripted engine, and a tiny arc with the toy checkpoint."""

import dataclasses
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from twlib import datagen as dg
from twlib.infra import arc, chat, rewrite
from twlib.decoding import Completion
from twlib.format import DISTANCE_EXAMPLE, FormatError, engine_calls
from twlib.tasks import GroupSumConfig, Problem, generate

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "assets" / "checkpoints" / "toy-parallel"
SMALL_TASK = {"max_groups": 3, "group_weights": None, "min_items": 2, "max_items": 3}
PARALLEL_TASK = GroupSumConfig(min_groups=2, max_groups=3, group_weights=None, min_items=2, max_items=3)


def problems(n, seed=0, config=PARALLEL_TASK):
    return generate("groupsum", n, seed=seed, config=config)


def draft_of(problem):
    trace = dg.split_trace(problem.sequential)
    marks = dg.parse_marks(json.dumps(rewrite.GroupSumRewriter.marks(dg.number_lines(trace.lines))), len(trace.lines))
    return trace, dg.extract_threads(trace, marks)[0]


# ----------------------------------------------------------------------------------------------------
# Pure steps


def test_split_trace_and_numbering():
    p = problems(1)[0]
    trace = dg.split_trace(p.sequential)
    assert trace.head == "<think>\n" and trace.tail.startswith("</think>")
    assert trace.head + "".join(trace.lines) + trace.tail == p.sequential
    numbered = dg.number_lines(trace.lines).splitlines()
    assert len(numbered) == len(trace.lines) and numbered[0].endswith(f"| {trace.lines[0].strip()}")
    with pytest.raises(dg.StepError) as e:
        dg.split_trace("no think here \\boxed{1}")
    assert (e.value.step, e.value.kind) == ("input", "no_think")


@pytest.mark.parametrize("reply, kind", [
    ("Sure! The blocks are lines 1-3 and 4-6.", "not_json"),
    ('{"blocks": [{"threads": [[1, 3], [4, 99]]}]}', "line_range"),
    ('{"blocks": [{"threads": [[0, 3], [4, 6]]}]}', "line_range"),
    ('{"blocks": [{"threads": [[1, 3], [5, 6]]}]}', "not_adjacent"),
    ('{"blocks": [{"threads": [[1, 6]]}]}', "one_thread"),
    ('{"blocks": [{"threads": [[1, 3], [4, 5]]}, {"threads": [[5, 5], [6, 6]]}]}', "overlap"),
    ('{"blocks": [{"threads": [["1", 3], [4, 6]]}]}', "bad_shape"),
    ('{"groups": []}', "bad_shape"),
    ('{"blocks": [{"threads": [[1, 3], [4, 6]]', "not_json"),
    ("", "not_json"),
])
def test_parse_marks_rejects_with_a_named_reason(reply, kind):
    with pytest.raises(dg.StepError) as e:
        dg.parse_marks(reply, 8)
    assert e.value.step == "mark" and e.value.kind == kind, e.value


def test_parse_marks_accepts_fenced_json_and_empty_answer():
    reply = 'Here you go:\n```json\n{"blocks": [{"threads": [[2, 3], [4, 6]]}, {"threads": [[7, 7], [8, 8]]}]}\n```'
    assert dg.parse_marks(reply, 8) == [[(2, 3), (4, 6)], [(7, 7), (8, 8)]]
    assert dg.parse_marks('{"blocks": []}', 8) == []


def test_extract_threads_and_dominated_blocks():
    trace = dg.Trace("<think>\n", ("intro\n", "aaaa\n", "bbbb\n", "x\n", "yyyyyyyyyyyyyyyyyy\n", "end\n"), "</think>\n")
    draft, notes = dg.extract_threads(trace, [[(2, 2), (3, 3)], [(4, 4), (5, 5)]], max_share=0.75)
    assert draft.segments[0] == "intro\n" and draft.blocks[0].threads == ("aaaa", "bbbb")
    # block 2: thread 2 holds 18 of 19 characters -> dropped, its lines stay sequential text
    assert len(draft.blocks) == 1 and "block 2 (lines 4-5) dropped: thread 2 holds 95%" in notes[0]
    assert draft.segments[2] == "x\nyyyyyyyyyyyyyyyyyy\nend\n"
    assert dg.thread_shares([1, 3]) == [0.25, 0.75] and dg.thread_shares([0, 0]) == [0.0, 0.0]
    with pytest.raises(dg.StepError) as e:
        dg.extract_threads(trace, [[(4, 4), (5, 5)]])
    assert e.value.kind == "no_block" and "95%" in e.value.reason
    with pytest.raises(dg.StepError) as e:
        dg.extract_threads(dg.Trace("", ("a\n", "\n", "b\n"), ""), [[(1, 1), (2, 2)]])
    assert e.value.kind == "empty_thread"


def test_oracle_steps_rebuild_the_task_parallel_form():
    for p in problems(6, seed=3):
        trace, draft = draft_of(p)
        outlines = json.loads(rewrite.GroupSumRewriter()(dg.outline_messages(p.question, draft)))
        draft = dg.with_outlines(draft, dg.parse_outlines(json.dumps(outlines), draft))
        assert dg.assemble(trace, draft) == p.parallel
        assert dg.format_filter(p.parallel, p.sequential, p.answer, "groupsum", prompt=p.prompt) == []


def test_edits_apply_minimally_or_reject():
    trace = dg.Trace("<think>\n", ("Similarly, for y: 10-2 = 8, squared 64.\n", "x: 7-1 = 6, squared 36.\n"), "</think>")
    draft, _ = dg.extract_threads(trace, [[(1, 1), (2, 2)]])
    edits = dg.parse_edits('{"edits": [{"block": 1, "thread": 1, "find": "Similarly, for y", "replace": "For y"}]}', draft)
    assert dg.apply_edits(draft, edits).blocks[0].threads[0] == "For y: 10-2 = 8, squared 64."
    cases = {
        '{"edits": [{"block": 1, "thread": 1, "find": "zzz", "replace": "q"}]}': "not_found",
        '{"edits": [{"block": 1, "thread": 2, "find": "x: 7-1 = 6, squared 36.", "replace": "completely new words"}]}': "too_much",
        '{"edits": [{"block": 3, "thread": 1, "find": "a", "replace": "b"}]}': "bad_target",
        '{"edits": [{"block": 1, "thread": 1, "find": "a"}]}': "bad_shape",
        '{"edits": "none"}': "bad_shape",
    }
    for reply, kind in cases.items():
        with pytest.raises(dg.StepError) as e:
            dg.apply_edits(draft, dg.parse_edits(reply, draft))
        assert (e.value.step, e.value.kind) == ("edit", kind), (reply, e.value)


def test_parse_outlines_checks_counts_and_lines():
    _, draft = draft_of(problems(1)[0])
    k = len(draft.blocks[0].threads)
    good = json.dumps({"blocks": [{"outlines": [f" group {i}" for i in range(k)]}]})
    assert dg.parse_outlines(good, draft)[0][0] == "group 0"
    bad = {json.dumps({"blocks": [{"outlines": ["only one"]}]}): "count",
           json.dumps({"blocks": []}): "count",
           json.dumps({"blocks": [{"outlines": ["two\nlines"] * k}]}): "bad_outline",
           json.dumps({"blocks": [{"outlines": ["x" * 200] * k}]}): "bad_outline",
           json.dumps({"blocks": [{"outlines": ["<Thread>"] * k}]}): "bad_outline",
           json.dumps({"blocks": [{"outlines": [3] * k}]}): "bad_outline"}
    for reply, kind in bad.items():
        with pytest.raises(dg.StepError) as e:
            dg.parse_outlines(reply, draft)
        assert e.value.kind == kind, reply


def test_format_filter_verdicts():
    p = problems(1, seed=5)[0]
    good = p.parallel
    assert dg.format_filter(good, p.sequential, p.answer, "groupsum", prompt=p.prompt) == []
    broken = {
        "format": good.replace("</Thread><Thread>", "</Thread> <Thread>", 1),
        "answer": good.replace(f"\\boxed{{{p.answer}}}", "\\boxed{A=0}"),
        "sibling": good.replace("\n</Thread>", " (same as thread 2)\n</Thread>", 1),
        "leak": good.replace("B:", "B:A\n", 1),
        "no block": p.sequential,
    }
    verdicts = {name: dg.format_filter(text, p.sequential, p.answer, "groupsum", prompt=p.prompt)
                for name, text in broken.items()}
    assert verdicts["format"][0].startswith("format: line") and "between sibling threads" in verdicts["format"][0]
    assert verdicts["answer"] == [f"answer: changed from {p.answer!r} to 'A=0'"]
    assert "points at a sibling ('thread 2')" in verdicts["sibling"][0]
    assert verdicts["leak"] == ["independence: block 1, thread 2 uses 'A', which only thread 1 assigns"]
    assert verdicts["no block"] == ["format: no <Parallel> block"]
    one = "<think>\n<Parallel>\n<Outlines>\n<Outline>1:A</Outline>\n</Outlines>\n<Thread>\n1:x\n</Thread>\n</Parallel>\n</think>\\boxed{1}"
    assert dg.format_filter(one, "<think>\nx\n</think>\\boxed{1}") == ["format: block 1 has 1 thread(s), fewer than 2"]
    twins = one.replace("<Outline>1:A</Outline>\n", "<Outline>1:A</Outline>\n<Outline>2:B</Outline>\n").replace(
        "</Thread>\n", "</Thread><Thread>\n2:x\n</Thread>\n")
    assert dg.format_filter(twins, "<think>\nx\n</think>\\boxed{1}") == [
        "independence: block 1, threads 1 and 2 are identical"]


def test_leaked_names_respects_visible_assignments():
    assert dg.leaked_names("", ["x = 3\ny = x + 1", "z = x * 2"]) == [(2, "x", 1)]
    assert dg.leaked_names("x = 3\n", ["x = 3\ny = x + 1", "z = x * 2"]) == []
    assert dg.leaked_names("", ["x = 3", "x = 4\nx == 4"]) == []
    assert dg.sibling_references("as in the other branch, and thread 3") == ["thread 3", "other branch"]


def test_response_cache_survives_a_torn_line(tmp_path):
    cache = chat.ResponseCache(tmp_path / "c.jsonl")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    key = chat.ResponseCache.key(body)
    assert key != chat.ResponseCache.key({**body, "model": "other"})
    cache.put(key, "m", chat.ChatReply("hello", 3, 1))
    with (tmp_path / "c.jsonl").open("a") as f:
        f.write('{"key": "abc", "cont')  # a crash mid-write
    again = chat.ResponseCache(tmp_path / "c.jsonl")
    assert len(again) == 1 and again.get(key) == chat.ChatReply("hello", 3, 1, cached=True)
    again.put("k2", "m", chat.ChatReply("second", 1, 1))  # starts a line of its own after the torn one
    assert len(chat.ResponseCache(tmp_path / "c.jsonl")) == 2


def test_parse_chat_reply():
    reply = chat.parse_chat_reply({"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 5,
                                                                                    "completion_tokens": 2}}, "x")
    assert reply == chat.ChatReply("hi", 5, 2)
    assert chat.parse_chat_reply({"choices": [{"message": {"content": None}}]}, "x") == chat.ChatReply("", 0, 0)
    with pytest.raises(chat.BadResponse):
        chat.parse_chat_reply({"error": "overloaded"}, "x")


# ----------------------------------------------------------------------------------------------------
# Stage 1 end to end against a scripted chat server


def _nonsense(behaviour, step, user):
    """What a bad model answers: None means answer correctly."""
    bad = {
        ("not_json", "mark"): "Sure! Threads: lines one to three, then the rest.",
        ("bad_lines", "mark"): '{"blocks": [{"threads": [[1, 3], [4, 99]]}]}',
        ("nonsense_edit", "edit"): '{"edits": [{"block": 1, "thread": 1, "find": "zebra", "replace": "x"}]}',
        ("outline_count", "outline"): '{"blocks": [{"outlines": ["everything"]}]}',
        ("sibling", "edit"): '{"edits": [{"block": 1, "thread": 2, "find": "B=", "replace": "B (thread 1 done)="}]}',
        ("leak", "edit"): '{"edits": [{"block": 1, "thread": 2, "find": "B:", "replace": "B:A\\n"}]}',
    }
    return bad.get((behaviour, step))


class ScriptedChat(ThreadingHTTPServer):
    """A /v1/chat/completions server: right answers from GroupSumRewriter, nonsense for some questions,
    HTTP 500 on the first request of a `fail500` question."""

    daemon_threads = True

    def __init__(self, behaviours):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behaviours, self.lock = behaviours, threading.Lock()
        self.posts, self.failed, self.usage = 0, set(), [0, 0]
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, body):
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        step = {dg.MARK_SYSTEM: "mark", dg.EDIT_SYSTEM: "edit", dg.OUTLINE_SYSTEM: "outline"}[system]
        question = user.split("\n")[1]
        behaviour = self.behaviours.get(question, "good")
        with self.lock:
            self.posts += 1
            if behaviour == "fail500" and question not in self.failed:
                self.failed.add(question)
                return 500, {"error": {"message": "overloaded"}}
        content = _nonsense(behaviour, step, user) or rewrite.GroupSumRewriter()(body["messages"])
        usage = {"prompt_tokens": len(user) // 4, "completion_tokens": len(content) // 4}
        with self.lock:
            self.usage[0] += usage["prompt_tokens"]
            self.usage[1] += usage["completion_tokens"]
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}], "usage": usage}

    def close(self):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        assert self.path == "/v1/chat/completions"
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, reply = self.server.answer(body)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


BEHAVIOURS = ["good", "not_json", "good", "bad_lines", "fail500", "nonsense_edit", "good", "outline_count",
              "sibling", "good", "leak"]


@pytest.fixture
def scripted():
    ps = problems(len(BEHAVIOURS), seed=11)
    server = ScriptedChat({p.question: b for p, b in zip(ps, BEHAVIOURS)})
    yield ps, server
    server.close()


def client_for(server, **kw):
    return chat.ChatClient(chat.ChatConfig(base_url=server.url + "/v1", model="scripted", backoff=0.01, max_retries=2,
                                       price_input_per_1m=1.0, price_output_per_1m=4.0, **kw))


def test_stage1_end_to_end_with_nonsense_500_cache_and_resume(tmp_path, scripted):
    ps, server = scripted
    client = client_for(server)
    config = rewrite.RewriteConfig(out_dir=str(tmp_path / "run1"), concurrency=3)
    run = rewrite.run_stage1(ps, client, config)["this_run"]
    assert (run["accepted"], run["rejected"], run["errors"]) == (5, 6, 0)
    assert run["reasons"] == {"rejected:edit/not_found": 1, "rejected:filter/independence": 2,
                              "rejected:mark/line_range": 1, "rejected:mark/not_json": 1, "rejected:outline/count": 1}
    # 3 requests per accepted sample, fewer for early rejections; the 500 was retried once
    assert run["requests"] == 5 * 3 + 1 + 1 + 2 + 3 + 3 + 3 == 28
    assert server.posts == client.attempts == 29
    assert [run["prompt_tokens"], run["completion_tokens"]] == server.usage
    assert run["cost"] == pytest.approx(server.usage[0] * 1e-6 + server.usage[1] * 4e-6)
    accepted = {p.id: p for p in rewrite.load_accepted(config.out_dir)}
    assert {p.id: p.parallel for p in ps if p.id in accepted} == {i: p.parallel for i, p in accepted.items()}
    good = [p.id for p, b in zip(ps, BEHAVIOURS) if b in ("good", "fail500")]
    assert sorted(accepted) == sorted(good)
    rejected = chat.read_jsonl(Path(config.out_dir) / "rejected.jsonl")
    by_id = {r["id"]: r for r in rejected}
    bad_lines = by_id[ps[BEHAVIOURS.index("bad_lines")].id]
    assert bad_lines["step"] == "mark" and "line 99 is not among the lines 1.." in bad_lines["reason"]
    assert "points at a sibling" in by_id[ps[BEHAVIOURS.index("sibling")].id]["reason"]
    assert "uses 'A', which only thread 1 assigns" in by_id[ps[BEHAVIOURS.index("leak")].id]["reason"]

    # The cache alone: a new run directory that shares the cache sends no request at all.
    posts = server.posts
    again = rewrite.run_stage1(ps, client_for(server), rewrite.RewriteConfig(
        out_dir=str(tmp_path / "run2"), cache_path=str(Path(config.out_dir) / "cache.jsonl")))["this_run"]
    assert server.posts == posts and again["requests"] == 0 and again["cache_hits"] == 28
    assert (again["accepted"], again["rejected"], again["reasons"]) == (5, 6, run["reasons"])
    # Resume: the same directory skips every finished sample.
    third = rewrite.run_stage1(ps, client_for(server), config)
    assert third["this_run"]["skipped_done"] == 11 and third["this_run"]["processed"] == 0
    assert third["overall"] == {"accepted": 5, "rejected": 6, "acceptance_rate": 5 / 11}
    assert server.posts == posts


def test_stage1_resumes_after_an_interruption(tmp_path):
    ps = problems(6, seed=21)
    server = ScriptedChat({})
    try:
        config = rewrite.RewriteConfig(out_dir=str(tmp_path / "run"), concurrency=1)
        seen = []

        def stop_after_two(result):
            seen.append(result.id)
            if len(seen) == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            rewrite.run_stage1(ps, client_for(server), config, on_result=stop_after_two)
        out = Path(config.out_dir)
        assert json.loads((out / "summary.json").read_text())["this_run"]["interrupted"] is True
        assert [r["id"] for r in chat.read_jsonl(out / "accepted.jsonl")] == seen
        with (out / "accepted.jsonl").open("a") as f:
            f.write('{"id": "' + ps[5].id + '", "sta')  # torn by a crash: that sample is not finished
        summary = rewrite.run_stage1(ps, client_for(server), config)
        assert summary["this_run"]["skipped_done"] == 2 and summary["this_run"]["processed"] == 4
        ids = [r["id"] for r in chat.read_jsonl(out / "accepted.jsonl")]
        assert sorted(ids) == sorted(p.id for p in ps)
        assert server.posts == 3 * 6  # no request was sent twice: the in-flight sample's replies were cached
    finally:
        server.close()


def test_unreachable_server_gives_errors_that_the_next_run_retries(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ps = problems(2, seed=4)
    config = rewrite.RewriteConfig(out_dir=str(tmp_path / "run"), concurrency=2)
    down = chat.ChatClient(chat.ChatConfig(base_url=f"http://127.0.0.1:{port}", max_retries=0, connect_timeout=1))
    run = rewrite.run_stage1(ps, down, config)["this_run"]
    assert run["errors"] == 2 and run["reasons"] == {"error:mark/http": 2}
    errors = chat.read_jsonl(Path(config.out_dir) / "errors.jsonl")
    assert all("ServerUnavailable" in e["reason"] for e in errors)
    server = ScriptedChat({})
    try:
        assert rewrite.run_stage1(ps, client_for(server), config)["this_run"]["accepted"] == 2
    finally:
        server.close()


def test_input_checks_reject_wrong_and_parallel_traces():
    p = problems(1)[0]
    model = chat.FunctionChat(rewrite.GroupSumRewriter())
    wrong = dataclasses.replace(p, sequential=p.sequential.replace(p.answer, "A=0"))
    assert rewrite.rewrite_sample(wrong, model).kind == "wrong_answer"
    already = dataclasses.replace(p, sequential=p.parallel)
    assert rewrite.rewrite_sample(already, model).kind == "already_parallel"
    assert model.attempts == 0
    nonsense = rewrite.rewrite_sample(p, chat.FunctionChat(lambda m: "42"))
    assert (nonsense.status, nonsense.step, nonsense.kind) == ("rejected", "mark", "not_json")


# ----------------------------------------------------------------------------------------------------
# Table 8


def test_trajectory_stats_hand_computed():
    block = ("<Parallel>\n<Outlines>\n<Outline>1:a</Outline>\n<Outline>2:b</Outline>\n</Outlines>\n"
             "<Thread>\n1:cc\n</Thread><Thread>\n2:d\n</Thread>\n</Parallel>")
    # sequential tokens: <Parallel> \n <Outlines> \n (4) + 2 outlines x 6 + </Outlines> \n (2) + 2 x
    # <Thread></Thread> (4) + \n </Parallel> (2) = 24; threads "\n1:cc\n" 6 and "\n2:d\n" 5: T 35, L 30
    s = dg.trajectory_stats(["xy", block, "<Parallel>"])
    assert s == {"n": 3, "invalid": 1, "parallel_ratio": pytest.approx(2 / 3),
                 "mean_longest": pytest.approx((2 + 30 + 1) / 3), "mean_total": pytest.approx((2 + 35 + 1) / 3),
                 "self_parallelism": pytest.approx((1 + 35 / 30 + 1) / 3),
                 "self_parallelism_of_means": pytest.approx(38 / 33), "blocks_per_sample": pytest.approx(2 / 3),
                 "tokens_per_block": 35, "threads_per_block": 2}
    assert dg.trajectory_stats([])["n"] == 0 and dg.trajectory_stats([])["mean_total"] is None


def test_trajectory_stats_on_groupsum_oracle():
    """Per problem with k groups of m_i items (tags one token, other characters one each): a thread body
    `A:q3:0+3=3...\\nA=6` has 9m+5 characters, so a thread costs 9m+9 between <Thread> and </Thread>
    (`\\n`, `n:`, body, `\\n`); an outline line `<Outline>1:A</Outline>\\n` 6; the block's fixed part
    8 + 8k; `<think>\\n`, the `\\n</think>\\n\\boxed{..}` and the answer (4k-1 characters) 20 + 4k.
    So T = 20 + 12k + sum(9m+9), L = 20 + 12k + max(9m+9); a one-group (sequential) trace has 9m + 21."""
    ps = generate("groupsum", 80, seed=7)
    rows = []
    for p in ps:
        sizes = p.meta["sizes"]
        k = len(sizes)
        threads = [9 * m + 9 for m in sizes]
        if k == 1:
            rows.append((9 * sizes[0] + 21, 9 * sizes[0] + 21, None))
        else:
            rows.append((20 + 12 * k + sum(threads), 20 + 12 * k + max(threads), (8 + 8 * k + sum(threads), k)))
    s = dg.trajectory_stats([p.parallel for p in ps])
    blocks = [r[2] for r in rows if r[2]]
    assert 0 < len(blocks) < len(ps)
    assert s["parallel_ratio"] == pytest.approx(len(blocks) / len(ps))
    assert s["mean_total"] == pytest.approx(sum(r[0] for r in rows) / len(ps))
    assert s["mean_longest"] == pytest.approx(sum(r[1] for r in rows) / len(ps))
    assert s["self_parallelism"] == pytest.approx(sum(r[0] / r[1] for r in rows) / len(ps))
    assert s["blocks_per_sample"] == pytest.approx(len(blocks) / len(ps))
    assert s["tokens_per_block"] == pytest.approx(sum(b[0] for b in blocks) / len(blocks))
    assert s["threads_per_block"] == pytest.approx(sum(b[1] for b in blocks) / len(blocks))
    assert "threads / block" in dg.format_stats({"oracle": s})


# ----------------------------------------------------------------------------------------------------
# Stage 2


class ReplayEngine:
    """Answers each state-machine request with the completion a scripted response needs (by context)."""

    max_context = 4096

    def __init__(self, tok, scripts):
        self.tok, self.answers = tok, {}
        for prompt, text in scripts:
            try:
                calls = [(c.context, c.completion) for c in engine_calls(text, prompt)]
            except FormatError:  # a malformed response: one call that writes it all
                calls = [(prompt, text)]
            for i, (context, completion) in enumerate(calls):
                self.answers[context] = (completion, i == len(calls) - 1)

    def generate(self, requests, sampling):
        out = []
        for r in requests:
            completion, last = self.answers[self.tok.decode(r.prompt_ids, skip_special_tokens=False)]
            ids = self.tok.encode(completion, add_special_tokens=False) + ([self.tok.eos_token_id] if last else [])
            out.append(Completion(ids, "stop"))
        return out


@pytest.fixture(scope="module")
def char_tok():
    from twlib.tokenizer import build_tokenizer

    return build_tokenizer()


def test_self_train_keeps_valid_correct_trajectories(char_tok):
    ps = problems(4, seed=9)
    texts = [ps[0].parallel, ps[1].parallel.replace(f"\\boxed{{{ps[1].answer}}}", "\\boxed{A=0}"),
             "<think>\nno end", ps[3].sequential]
    engine = ReplayEngine(char_tok, [(p.prompt, t) for p, t in zip(ps, texts)])
    result = arc.self_train(None, char_tok, ps, arc.SelfTrainConfig(max_new_tokens=400), engine=engine)
    assert [r["reason"] for r in result.rows] == ["", "answer: wrong", "format: does not parse", ""]
    assert [p.id for p in result.problems] == [ps[0].id, ps[3].id]
    assert result.problems[0].parallel == ps[0].parallel and result.problems[1].parallel == ps[3].sequential
    assert result.counts["kept"] == 2 and result.counts["accuracy"] == 0.5 and result.counts["format_valid"] == 0.75
    assert result.stats == dg.trajectory_stats([ps[0].parallel, ps[3].sequential], char_tok)
    only_parallel = arc.self_train(None, char_tok, ps, arc.SelfTrainConfig(require_parallel=True, require_correct=False,
                                                                        samples_per_prompt=2), engine=engine)
    assert [p.id for p in only_parallel.problems] == [ps[0].id, ps[1].id]
    assert [r["reason"] for r in only_parallel.rows][:2] == ["", "duplicate"]


@pytest.mark.slow  # two SFTs, three decoding passes and four model loads: seconds, not milliseconds
def test_run_arc_tiny(tmp_path):
    sft = {"max_steps": 2, "threads": 1, "tokens_per_batch": 512, "rows_per_micro_batch": 2, "log_every": 100}
    config = arc.ArcConfig(out=str(tmp_path / "arc"), model=str(TOY), task_options=SMALL_TASK, n_seed=4, n_pool=3,
                          n_eval=2, sft1=dict(sft), sft2=dict(sft), eval_max_new_tokens=200, eval_batch=4,
                          self_train=arc.SelfTrainConfig(max_new_tokens=200, require_correct=False, batch_size=4),
                          quiet=True)
    report = arc.run_arc(config)
    out = Path(config.out)
    assert {"seed", "sft1", "self_train", "sft2", "paper_format_correct"} <= set(report)
    assert 0 <= report["sft1"]["format_correct"] <= 1 and report["sft1"]["problems"] == 2
    assert report["self_train"]["counts"]["decoded"] == 3
    if report["self_train"]["counts"]["kept"]:
        assert (out / "sft2" / "final" / "config.json").is_file() and "accuracy" in report["sft2"]
    else:
        assert "skipped" in report["sft2"]
    stamp = (out / "sft1" / "final" / "model.safetensors").stat().st_mtime
    assert arc.run_arc(config) == report  # everything done: nothing is recomputed
    assert (out / "sft1" / "final" / "model.safetensors").stat().st_mtime == stamp
    assert "sft1" in arc.format_arc(report)
    assert report["keep"] == "format" and report["config"]["n_seed"] == 4
    assert "self-training kept" in arc.format_arc(report) and "(format;" in arc.format_arc(report)


def test_trajectory_html():
    page = rewrite.trajectory_html(DISTANCE_EXAMPLE, "distance")
    assert page.count("display:flex") == 1 and "thread 2: Compute (y2-y1)^2." in page
    assert rewrite.THREAD_COLOURS[0] in page and rewrite.THREAD_COLOURS[1] in page
    assert "format error" in rewrite.trajectory_html("<Parallel>oops")


def test_shipped_arc_reports_are_consistent():
    """assets/arc/*.json (the full-size arcs in the README): complete, and their counts add up."""
    reports = sorted((ROOT / "assets" / "arc").glob("*.json"))
    assert {p.name for p in reports} == {"seed150-correct.json"}
    for path in reports:
        report = json.loads(path.read_text())
        counts, stats = report["self_train"]["counts"], report["self_train"]["stats"]
        assert counts["decoded"] == report["config"]["n_pool"] and stats["n"] == counts["kept"] <= counts["decoded"]
        assert counts["kept"] / counts["decoded"] == pytest.approx(counts["yield"])
        if report["keep"] == "format+correct":  # the strict filter keeps at most the correct ones
            assert counts["kept"] <= round(counts["accuracy"] * counts["decoded"])
        assert report["config"]["model"] == "assets/checkpoints/tiny-base"  # from the shipped base
        for stage in ("sft1", "sft2"):
            assert report[stage]["problems"] == report["config"]["n_eval"] == 500
        assert "sft2" in arc.format_arc(report)


def test_self_train_grades_math_prompts_with_math_verify(char_tok):
    """A `task: math` prompt pool (the 8B self-training stage): an answer written in another form than the
    ground truth (0.5 for \\frac{1}{2}) is correct and kept; exact match would drop it as wrong."""
    text = "<think>\nhalf of it\n</think>\n\n\\boxed{0.5}"
    right = Problem("half", "math", "3/6?", "3/6?\n", "", "", "\\frac{1}{2}")
    wrong = Problem("third", "math", "2/6?", "2/6?\n", "", "", "\\frac{1}{3}")
    engine = ReplayEngine(char_tok, [(right.prompt, text), (wrong.prompt, text)])
    result = arc.self_train(None, char_tok, [right, wrong], arc.SelfTrainConfig(max_new_tokens=200), engine=engine)
    assert [(r["correct"], r["reason"]) for r in result.rows] == [(True, ""), (False, "answer: wrong")]
    assert [p.id for p in result.problems] == ["half"]
