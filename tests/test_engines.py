"""twlib.engines: the state machine over HTTP equals the state machine in process, and the HTTP client
fails clearly (and fast) on every way a server can misbehave.

Servers here are local: `serve_hf` around the shipped toy checkpoint, and raw sockets that answer with
scripted bytes. Back-off sleeps are recorded instead of slept, so every test stays well under a second
except the ones that decode with the toy model.
"""

import importlib.util
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from twlib.decoding import (
    Completion, DecodeConfig, HFEngine, ParallelDecoder, Request, SamplingParams, sequential_decoder,
)
from twlib.engines import LLAMA_CPP_NEUTRAL_SAMPLING, BadResponse, EngineError, OpenAICompletionsEngine, RequestRejected, ServerTimeout, ServerUnavailable, VLLMEngine, completion_payload, parse_completion
from twlib.infra.server import serve_hf
from twlib.tasks import make_splits

TOY = Path(__file__).resolve().parent.parent / "assets" / "checkpoints" / "toy-parallel"


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(TOY).eval(), AutoTokenizer.from_pretrained(TOY)


def call_rows(result):
    return [(c.context_ids, c.completion_ids, c.kind, c.phase, c.block, c.thread, c.finish) for c in result.calls]


# ----------------------------------------------------------------------------------------------------
# The same decoding through HTTP


# Enough budget for every block to close; a small one, so that threads stop at their budget ("length",
# flagged thread_unclosed); and the sequential decoder.
PARALLEL, TIGHT, SEQUENTIAL = (DecodeConfig(max_new_tokens=800), DecodeConfig(max_new_tokens=150),
                               DecodeConfig(max_new_tokens=300))


def decode_all(engine, tok, prompts):
    return (ParallelDecoder(engine, tok, PARALLEL).decode(prompts)
            + [ParallelDecoder(engine, tok, TIGHT).decode(prompts[0])]
            + [sequential_decoder(engine, tok, SEQUENTIAL).decode(prompts[1])])


@pytest.fixture(scope="module")
def reference(toy):
    """A few eval prompts, decoded greedily in process (see decode_all)."""
    model, tok = toy
    _, problems = make_splits("groupsum", 0, 3, seed=5)
    prompts = [tok.encode(p.prompt) for p in problems]
    return prompts, decode_all(HFEngine(model, tok), tok, prompts)


@pytest.mark.parametrize("style, token_ids", [("vllm", True), ("llama.cpp", False)],
                         ids=["vllm-shape-token-ids", "llama-cpp-shape-text"])
def test_state_machine_over_http_equals_in_process(toy, reference, style, token_ids):
    """vllm shape: ids in, ids out. llama.cpp shape: text in, text out with the stop cut, re-tokenised."""
    model, tok = toy
    prompts, direct = reference
    with serve_hf(HFEngine(model, tok), tokenizer=tok, style=style, batch_window=0.02) as server:
        engine = OpenAICompletionsEngine(server.url, tokenizer=tok, token_ids=token_ids)
        remote = decode_all(engine, tok, prompts)
        batches = list(server.batcher.batches)
    assert engine.max_context == model.config.max_position_embeddings  # read from GET /v1/models
    # What the comparison covers: blocks that close, threads stopped by their budget, EOS endings.
    assert all(r.ok and r.stats.blocks for r in direct[:3]), "the toy model should write and close blocks"
    assert "thread_unclosed" in direct[3].flags and any(c.finish == "length" for c in direct[3].calls)
    assert direct[4].finished and len(direct[4].calls) == 1
    for a, b in zip(direct, remote):
        assert b.text == a.text
        assert b.response_ids == a.response_ids
        assert b.flags == a.flags and b.finished == a.finished
        assert call_rows(b) == call_rows(a)
    assert max(batches) > 1  # the concurrent thread requests of a block met in one forward batch
    assert engine.stats["attempts"] == engine.stats["requests"] == sum(len(r.calls) for r in remote)


def test_reference_server_rejects_bad_requests(toy):
    model, tok = toy
    with serve_hf(HFEngine(model, tok), tokenizer=tok) as server:
        engine = OpenAICompletionsEngine(server.url, tokenizer=tok, max_retries=3)
        engine.sleep = lambda s: pytest.fail("a 400 must not be retried")
        with pytest.raises(RequestRejected, match=r"HTTP 400.*maximum context length is 2048"):
            engine.complete(Request([5] * 2040, 20))  # engine.max_context is not known yet: the server says no
        with pytest.raises(RequestRejected, match=r"HTTP 400.*token ids must be in \[0, 268\)"):
            engine.complete(Request([999], 5))
        assert engine.stats["attempts"] == 2
        assert engine.max_context == 2048  # now known: too long a request is refused before it is sent
        with pytest.raises(ValueError, match="exceed the context of 2048"):
            engine.complete(Request([5] * 2040, 20))
        assert engine.stats["attempts"] == 2


# ----------------------------------------------------------------------------------------------------
# A misbehaving server: raw sockets, scripted replies


def read_request(conn) -> tuple[bytes, dict | None]:
    """The request's header bytes and its JSON body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data, None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"content-length:\s*(\d+)", head, re.I)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        body += conn.recv(65536)
    return head, json.loads(body) if body else {}


def reply(status=200, body=None, raw: bytes | None = None, length: int | None = None, headers: str = ""):
    """Answer with `body` as JSON (or `raw` bytes), announcing `length` bytes (default: the true length)."""
    payload = raw if raw is not None else json.dumps(body).encode()

    def behaviour(conn, request):
        head = (f"HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\n{headers}"
                f"Content-Length: {len(payload) if length is None else length}\r\nConnection: close\r\n\r\n")
        conn.sendall(head.encode() + payload)
    return behaviour


def hang(seconds):
    return lambda conn, request: time.sleep(seconds)


def hang_up():
    return lambda conn, request: None  # close without a word


def echo_last_token(delay=0.0):
    """A well-behaved server: the completion is the prompt's last token, after `delay` seconds."""
    def behaviour(conn, request):
        time.sleep(delay)
        reply(200, ok_body([request["prompt"][-1]]))(conn, request)
    return behaviour


def ok_body(ids, finish="length"):
    return {"choices": [{"index": 0, "text": "", "token_ids": ids, "finish_reason": finish}], "usage": {}}


class RawServer:
    """Accepts connections and answers the i-th with behaviours[i] (the last one repeats)."""

    def __init__(self, *behaviours):
        self.behaviours, self.requests, self.heads, self.connections = list(behaviours), [], [], 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with self.lock:
                behaviour = self.behaviours[min(self.connections, len(self.behaviours) - 1)]
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn, behaviour), daemon=True).start()

    def _serve(self, conn, behaviour):
        try:
            conn.settimeout(5)
            head, request = read_request(conn)
            with self.lock:
                self.heads.append(head)
                self.requests.append(request)
            behaviour(conn, request)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stopped.set()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def client(url, delays, **kwargs):
    options = dict(model="m", max_context=1000, max_retries=3, backoff=0.01, timeout=(1.0, 2.0))
    engine = OpenAICompletionsEngine(url, **{**options, **kwargs})
    engine.sleep = delays.append  # record the back-off instead of sleeping it
    return engine


REQUEST = Request([12, 13, 14], 8, (11, 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_closed_port_retries_with_exponential_backoff_then_unavailable():
    delays = []
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    engine = client(url, delays)
    with pytest.raises(ServerUnavailable, match=rf"POST {url}/v1/completions: cannot connect .*after 4 attempts"):
        engine.complete(REQUEST)
    assert engine.stats["attempts"] == 4
    assert delays == [0.01, 0.02, 0.04]


def test_real_backoff_sleeps_are_taken():
    url = f"http://127.0.0.1:{free_port()}"
    engine = OpenAICompletionsEngine(url, model="m", max_context=1000, max_retries=2, backoff=0.05)
    began = time.perf_counter()
    with pytest.raises(ServerUnavailable):
        engine.complete(REQUEST)
    assert 0.15 <= time.perf_counter() - began < 1.5  # 0.05 + 0.1 of back-off
    assert engine.stats["attempts"] == 3


def test_connection_closed_without_reply_is_retried():
    delays = []
    with RawServer(hang_up()) as server:
        engine = client(server.url, delays, max_retries=2)
        with pytest.raises(ServerUnavailable, match="connection closed before a reply.*after 3 attempts"):
            engine.complete(REQUEST)
        assert server.connections == 3 and delays == [0.01, 0.02]


def test_read_timeout_is_a_server_timeout_and_not_retried():
    delays = []
    with RawServer(hang(1.5)) as server:
        engine = client(server.url, delays, timeout=(1.0, 0.2))
        began = time.perf_counter()
        with pytest.raises(ServerTimeout, match=rf"POST {server.url}/v1/completions: no reply within the read "
                                                rf"timeout of 0.2 s"):
            engine.complete(REQUEST)
        assert time.perf_counter() - began < 1.0
        assert server.connections == 1 and delays == []


def test_500_twice_then_200_succeeds_on_the_third_attempt():
    delays = []
    with RawServer(reply(500, {"error": "busy"}), reply(502, raw=b"<html>bad gateway</html>"),
                   reply(200, ok_body([7, 8, 11], "stop"))) as server:
        engine = client(server.url, delays)
        done = engine.complete(REQUEST)
        assert done == Completion([7, 8, 11], "stop")
        assert server.connections == 3 and engine.stats["attempts"] == 3 and delays == [0.01, 0.02]


def test_5xx_every_time_gives_up_naming_the_status_and_body():
    delays = []
    with RawServer(reply(503, {"error": {"message": "model is loading"}})) as server:
        engine = client(server.url, delays, max_retries=1)
        with pytest.raises(ServerUnavailable, match=r"HTTP 503: .*model is loading.*after 2 attempts"):
            engine.complete(REQUEST)
        assert server.connections == 2


def test_429_waits_at_least_retry_after():
    delays = []
    with RawServer(reply(429, {"error": "slow down"}, headers="Retry-After: 0.3\r\n"), reply(200, ok_body([5]))) as server:
        engine = client(server.url, delays)
        assert engine.complete(REQUEST).ids == [5]
        assert delays == [0.3]


def test_400_is_not_retried_and_names_status_and_body():
    delays = []
    with RawServer(reply(400, {"error": {"message": "max_tokens must be at least 1"}})) as server:
        engine = client(server.url, delays)
        with pytest.raises(RequestRejected, match=rf"POST {server.url}/v1/completions: HTTP 400 .*max_tokens must be "
                                                  rf"at least 1"):
            engine.complete(REQUEST)
        assert server.connections == 1 and delays == []


BAD_BODIES = {
    "invalid JSON": (reply(200, raw=b"{'choices': oops"), r"HTTP 200: response is not valid JSON"),
    "no choices": (reply(200, {"object": "text_completion", "usage": {}}), r"response JSON has no 'choices'"),
    "error object": (reply(200, {"error": {"message": "out of memory"}}), r"no 'choices' \(error: .*out of memory"),
    "truncated body": (reply(200, raw=b'{"choices": [{"text": "abc', length=500), r"body truncated: got \d+ bytes, \d+ more were announced"),
    "two choices": (reply(200, {"choices": [ok_body([5])["choices"][0]] * 2}), r"expected exactly 1 choice .* got 2"),
    "no choice": (reply(200, {"choices": []}), r"expected exactly 1 choice .* got 0"),
    "choices not a list": (reply(200, {"choices": {"text": "a"}}), r"expected exactly 1 choice .* got dict"),
    "bad finish": (reply(200, ok_body([5], "abort")), r"finish_reason 'abort' is neither"),
    "no ids, no tokenizer": (reply(200, {"choices": [{"text": "abc", "finish_reason": "length"}]}),
                             r"no token ids .*pass tokenizer="),
    "too many tokens": (reply(200, ok_body(list(range(20, 40)))), r"20 completion tokens for max_tokens 8"),
    "empty completion": (reply(200, ok_body([], "stop")), r"empty completion"),
    "not an object": (reply(200, [1, 2]), r"response JSON is a list"),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_bodies_are_bad_responses_with_clear_messages(name):
    behaviour, message = BAD_BODIES[name]
    delays = []
    with RawServer(behaviour) as server:
        engine = client(server.url, delays)
        with pytest.raises(BadResponse, match=message) as caught:
            engine.complete(REQUEST)
        assert server.url in str(caught.value)
        assert server.connections == 1 and delays == []  # an answer that is wrong is not retried


def test_requests_of_one_call_run_concurrently_in_order():
    requests = [Request([20 + i], 4) for i in range(4)]
    with RawServer(echo_last_token(delay=0.3)) as server:
        for concurrency, lo, hi in [(4, 0.25, 0.9), (1, 1.15, 5.0)]:
            engine = client(server.url, [], concurrency=concurrency)
            began = time.perf_counter()
            outs = engine.generate(requests, SamplingParams())
            assert lo <= time.perf_counter() - began < hi, concurrency
            assert [o.ids for o in outs] == [[20], [21], [22], [23]]


def test_one_failed_request_fails_the_call():
    with RawServer(echo_last_token(), reply(400, {"error": "no"})) as server:
        engine = client(server.url, [], concurrency=1)
        with pytest.raises(RequestRejected):
            engine.generate([Request([20], 4), Request([21], 4), Request([22], 4)])


def test_payload_fields(toy):
    _, tok = toy
    thread_close, eos = tok.convert_tokens_to_ids("</Thread>"), tok.eos_token_id
    request = Request(tok.encode("A:a1\n<Thread>\n1:"), 30, (thread_close, eos))
    with RawServer(reply(200, ok_body([thread_close], "stop"))) as server:
        engine = client(server.url, [], tokenizer=tok, api_key="secret", extra_body=LLAMA_CPP_NEUTRAL_SAMPLING)
        engine.generate([request], SamplingParams(temperature=0.7, top_p=0.9, seed=3))
        text = client(server.url, [], tokenizer=tok, token_ids=False)
        text.complete(request)
        sent, sent_text = server.requests
    assert sent["prompt"] == request.prompt_ids and sent["model"] == "m"
    assert sent["max_tokens"] == 30 and sent["stop_token_ids"] == [thread_close, eos]
    assert sent["stop"] == ["</Thread>", "<|endoftext|>"]
    assert (sent["temperature"], sent["top_p"], sent["seed"]) == (0.7, 0.9, 3)
    assert sent["return_token_ids"] is True and sent["repeat_penalty"] == 1.0
    assert sent["skip_special_tokens"] is False and sent["spaces_between_special_tokens"] is False
    assert sent_text["prompt"] == "A:a1\n<Thread>\n1:" and "seed" not in sent_text


def test_api_key_is_sent_as_bearer_token():
    with RawServer(reply(200, ok_body([5]))) as server:
        client(server.url, [], api_key="sk-test").complete(REQUEST)
        client(server.url, []).complete(REQUEST)
    assert b"Authorization: Bearer sk-test" in server.heads[0]
    assert b"Authorization" not in server.heads[1]


def test_max_context_from_models_endpoint_or_a_clear_error():
    models = {"object": "list", "data": [{"id": "served", "max_model_len": 4096}]}
    with RawServer(reply(200, models)) as server:
        engine = OpenAICompletionsEngine(server.url + "/v1/")  # an OpenAI-style base URL works too
        assert engine.max_context == 4096 and engine.model == "served"
    with RawServer(reply(200, {"object": "list", "data": [{"id": "llama"}]})) as server:
        with pytest.raises(EngineError, match="pass max_context="):
            OpenAICompletionsEngine(server.url).max_context
    with RawServer(reply(200, {"nothing": 1})) as server:
        with pytest.raises(BadResponse, match=r"GET .*/v1/models: expected"):
            OpenAICompletionsEngine(server.url).max_context


def test_text_prompts_need_a_tokenizer():
    with pytest.raises(ValueError, match="needs tokenizer="):
        OpenAICompletionsEngine("http://127.0.0.1:1", token_ids=False)


# ----------------------------------------------------------------------------------------------------
# What each server returns, and the ids read from it


def shapes(tok):
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    close, eos = tok.convert_tokens_to_ids("</Thread>"), tok.eos_token_id
    body = enc("x1:0+1=1\n")
    return close, eos, {
        # server: (choice, usage, expected ids)
        "vllm token_ids": ({"text": "?", "token_ids": body + [close], "finish_reason": "stop"}, None, body + [close]),
        "vllm text + stop_reason id": ({"text": "x1:0+1=1\n", "stop_reason": close, "finish_reason": "stop"}, None, body + [close]),
        "vllm text + stop_reason None (EOS)": ({"text": "x1:0+1=1\n", "stop_reason": None, "finish_reason": "stop"}, None, body + [eos]),
        "vllm text + stop string": ({"text": "x1:0+1=1\n", "stop_reason": "</Thread>", "finish_reason": "stop"}, None, body + [close]),
        "vllm logprobs token_id:N": ({"text": "", "logprobs": {"tokens": [f"token_id:{i}" for i in body]},
                                      "finish_reason": "length"}, None, body),
        "sglang matched_stop": ({"text": "x1:0+1=1\n", "matched_stop": close, "finish_reason": "stop"}, None, body + [close]),
        "llama-server tokens": ({"text": "", "tokens": body + [eos], "finish_reason": "stop"}, None, body + [eos]),
        "text keeps its stop": ({"text": "x1:0+1=1\n</Thread>", "finish_reason": "stop"}, None, body + [close]),
        "llama-cpp-python stop string": ({"text": "x1:0+1=1\n", "finish_reason": "stop"},
                                         {"completion_tokens": len(body) + 1}, body + [close]),
        "llama-cpp-python EOS": ({"text": "x1:0+1=1\n", "finish_reason": "stop"},
                                 {"completion_tokens": len(body)}, body + [eos]),
        "length": ({"text": "x1:0+1=1\n", "finish_reason": "length"}, {"completion_tokens": len(body)}, body),
    }


@pytest.mark.parametrize("name", ["vllm token_ids", "vllm text + stop_reason id", "vllm text + stop_reason None (EOS)",
                                  "vllm text + stop string", "vllm logprobs token_id:N", "sglang matched_stop",
                                  "llama-server tokens", "text keeps its stop", "llama-cpp-python stop string",
                                  "llama-cpp-python EOS", "length"])
def test_ids_are_read_from_each_servers_reply(toy, name):
    _, tok = toy
    close, eos, cases = shapes(tok)
    choice, usage, expected = cases[name]
    request = Request([12], 40, (close, eos))
    done = parse_completion({"choices": [choice], "usage": usage}, request, "here", tok, eos)
    assert done.ids == expected
    assert done.finish == ("stop" if expected[-1] in (close, eos) else "length")


def test_unknown_stop_is_a_bad_response_not_a_guess(toy):
    _, tok = toy
    close, eos, _ = shapes(tok)
    choice = {"text": "x1", "finish_reason": "stop"}  # no ids, no stop reason, no usage
    with pytest.raises(BadResponse, match="cannot tell which stop ended the text"):
        parse_completion({"choices": [choice]}, Request([12], 40, (close, eos)), "here", tok, eos)


def test_finish_is_stop_when_the_last_token_is_a_stop_id():
    done = parse_completion(ok_body([5, 11], "length"), Request([12], 2, (11,)), "here")
    assert done == Completion([5, 11], "stop")


def test_payload_without_tokenizer_has_no_stop_strings():
    body = completion_payload(Request([1, 2], 5, (3,)), SamplingParams(), None, [1, 2], (), {"top_k": 1})
    assert "stop" not in body and "model" not in body and body["top_k"] == 1 and body["stop_token_ids"] == [3]


# ----------------------------------------------------------------------------------------------------
# vLLM in process


def test_vllm_engine_explains_how_to_install_when_missing():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install -e \.\[gpu\]"):
            VLLMEngine(TOY)
    else:
        pytest.skip("vllm is installed: the missing-vllm message cannot be shown")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vllm is not installed (GPU only: pip install -e .[gpu] on a CUDA machine)")
def test_vllm_engine_greedy_equals_hf_engine(toy, reference):
    _, tok = toy
    prompts, direct = reference
    remote = decode_all(VLLMEngine(TOY, dtype="float32", max_model_len=2048, gpu_memory_utilization=0.3), tok, prompts)
    assert [r.text for r in remote] == [r.text for r in direct]
    assert [call_rows(r) for r in remote] == [call_rows(r) for r in direct]
