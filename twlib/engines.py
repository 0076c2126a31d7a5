"""Engines beyond the in-process one: any OpenAI-style `/v1/completions` server, in-process vLLM, and a
tiny reference server that puts an `HFEngine` behind the same HTTP API.

The state machine (`twlib.decoding.ParallelDecoder`) only ever sends ordinary completion requests, so
the engine behind it can be a real inference server: `vllm serve`, SGLang, llama.cpp's `llama-server`
or `llama-cpp-python`'s server. Their prefix caches then remove the recomputation of the shared prefix
that the threads of a block and the continuation after a join would otherwise pay.

    engine = OpenAICompletionsEngine("http://127.0.0.1:8000", model="toy", tokenizer=tok)
    ParallelDecoder(engine, tok).decode(tok.encode(prompt))

Design choices
- Standard library only (`http.client`, `concurrent.futures`): no `openai` or `requests` dependency, and
  every failure is ours to name. One HTTP request per `Request`; the requests of one `generate` call (the
  threads of a block, or the pending calls of several problems) run on up to `concurrency` threads at
  once, and the server batches them (continuous batching in vLLM / SGLang / llama-server).
- Token ids end to end by default: the prompt is sent as a list of ids (`prompt: [ids]`, accepted by
  vLLM, SGLang and llama-server), so the server sees exactly the context the model was trained on. With
  `token_ids=False` the prompt is the tokenizer's decoding of the ids (for servers that take text only).
- Stops: `stop_token_ids` (vLLM, SGLang) and, when a tokenizer is given, the same ids decoded as `stop`
  strings (llama.cpp servers know no stop ids). Tags are single tokens, so both stop on the same token.
- Completion ids are read from what the server returns, most trustworthy first:
      `choice["token_ids"]`   vLLM >= 0.10.2 with `return_token_ids: true` (sent by default); serve_hf;
      `choice["tokens"]`      ints, as llama-server's native `/completion` returns with `return_tokens`
                              (its `/v1/completions` reply has no ids; `__verbose.tokens` is read too);
      `logprobs.tokens`       `token_id:N` strings, older vLLM with `extra_body={"logprobs": 0,
                              "return_tokens_as_token_ids": True}`;
      the text, re-tokenised  everything else (llama-cpp-python, SGLang): needs `tokenizer`. A server cuts
                              a matched stop string from the text, so the stop id is put back from
                              `stop_reason` (vLLM: id, string, or None for EOS), `matched_stop` (SGLang),
                              or, for llama.cpp servers, from `usage.completion_tokens`: llama-cpp-python
                              does not count an EOS it stopped at but does count a stop string's token.
                              When the EOS and the one non-EOS stop cannot be told apart, BadResponse.
- `finish` is normalised to the Completion contract: "stop" whenever the last id is a stop id or EOS
  (some servers say "length" when the stop token is also the last allowed one), else the server's
  "stop" / "length". Any other finish reason, no choices, two choices, an empty completion, more tokens
  than max_tokens, ids outside the vocabulary: `BadResponse`, naming the URL and what was wrong.
- Robustness: separate connect and read timeouts; connection errors (refused, reset, closed without a
  reply, connect timeout), HTTP 429 and 5xx are retried with exponential back-off (`backoff * 2**k`,
  capped, at least a `Retry-After` header's seconds); other 4xx are not retried (`RequestRejected`). A
  read timeout is not retried either: the server may still be generating, and a resend would duplicate
  the work (`ServerTimeout` at once). A truncated body or bad JSON is a `BadResponse`, never a raw
  KeyError or JSONDecodeError.
- `serve_hf` is a teaching stand-in with vLLM's API shape, not a production server: a
  `ThreadingHTTPServer` whose handler threads hand requests to one batcher thread, which waits
  `batch_window` seconds for concurrent requests (the threads of a block) and runs them as one
  `HFEngine.generate` call (a forked KV cache), much as continuous batching does.
  `style="llama.cpp"` imitates llama-cpp-python's reply instead (text only, the stop string cut, an EOS
  not counted) so that the re-tokenising path is tested end to end without llama.cpp.
- Its `POST /load_weights {"path": DIR}` (the weight sync of `twlib.train.pgrpo_fsdp`'s server rollouts)
  replaces the served weights, so it is closed by default: `--allow-weight-updates ROOT` turns it on for
  folders inside ROOT only (resolved once at start; the requested folder and each of its *.safetensors
  files are checked after resolving symlinks and `..`), and every request must carry the shared token
  (`--weight-token` or $TWLAB_WEIGHT_TOKEN) as `Authorization: Bearer TOKEN`, compared in constant time.
  A refused request gets HTTP 403 with a JSON error and changes nothing. Not covered: a local user who can
  write inside ROOT can still swap files between the check and the load; keep ROOT private to the trainer.
- `VLLMEngine` runs `vllm.LLM` in process with prefix caching on; vllm is imported lazily (GPU only).

Deviations and limits
- A server stops at EOS whatever `stop_ids` says (the state machine always includes EOS anyway).
- Re-tokenised text equals the generated ids only if the tokenizer round-trips (true for this lab's
  character tokenizer; a model that spells a tag out character by character would be re-read as the tag).
- Sampling: a request's own seed (`Request.seed`, set by `ParallelDecoder.decode(seeds=...)`) is sent
  as the body's `seed`, else `SamplingParams.seed`. `serve_hf` seeds each request alone, as vLLM does, so
  per-request-seeded sampling through it equals the in-process HFEngine token for token (tested); a
  batch-wide `SamplingParams.seed` is HFEngine-only (it depends on the batch), and other engines sample
  with their own generators, so across engines only greedy decoding is comparable token for token. llama.cpp servers apply their own
  defaults (repeat penalty 1.1, top-k 40, min-p 0.05): pass `extra_body=LLAMA_CPP_NEUTRAL_SAMPLING`.
- `max_context` is asked from `GET /v1/models` (`max_model_len`: vLLM, SGLang, serve_hf) unless given;
  llama.cpp servers do not report it, so pass it.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from typing import Any, Callable, Sequence
from twlib.decoding import Completion, Request, SamplingParams

# llama.cpp servers sample with a repeat penalty, top-k and min-p by default; these make their sampling
# plain temperature / top-p like HFEngine's, and greedy really greedy.
LLAMA_CPP_NEUTRAL_SAMPLING = {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0}


# ----------------------------------------------------------------------------------------------------
# Errors


class EngineError(RuntimeError):
    """Base class of every failure of a remote engine."""


class ServerUnavailable(EngineError):
    """No usable answer after every retry: connection refused / reset / closed, HTTP 429 or 5xx."""


class ServerTimeout(EngineError):
    """The server did not answer within the read timeout (or never accepted within the connect timeout)."""


class BadResponse(EngineError):
    """The server answered, but not with a completion we can use (bad JSON, missing fields, ...)."""


class RequestRejected(EngineError):
    """HTTP 4xx other than 429: the server refused this request; sending it again would not help."""


def _snippet(data: bytes | str, limit: int = 300) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else str(data)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


# ----------------------------------------------------------------------------------------------------
# HTTP with timeouts and retries


@dataclass(frozen=True)
class HTTPConfig:
    connect_timeout: float = 5.0
    read_timeout: float = 600.0  # longest wait for the reply: a whole generation, as replies are not streamed
    max_retries: int = 3  # attempts = 1 + max_retries
    backoff: float = 0.5  # seconds before the first retry, doubled each time
    max_backoff: float = 30.0


class _Retryable(Exception):
    def __init__(self, message: str, timeout: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.timeout, self.retry_after = timeout, retry_after


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: ignore it and use our own back-off


def _attempt(method: str, url: str, payload: bytes | None, headers: dict, cfg: HTTPConfig) -> tuple[int, Any, bytes]:
    """One HTTP exchange. Raises _Retryable for failures worth another try, EngineError for the others."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = connection_class(parts.hostname, parts.port, timeout=cfg.connect_timeout)
    try:
        try:
            conn.connect()
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no connection within {cfg.connect_timeout} s", timeout=True)
        except OSError as e:  # refused, unreachable, DNS
            raise _Retryable(f"cannot connect ({e})")
        conn.sock.settimeout(cfg.read_timeout)  # from here on the read timeout applies
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
        except (TimeoutError, socket.timeout):
            raise ServerTimeout(f"{method} {url}: no reply within the read timeout of {cfg.read_timeout} s")
        except (http.client.RemoteDisconnected, ConnectionError) as e:
            raise _Retryable(f"connection closed before a reply ({type(e).__name__}: {e})")
        except http.client.HTTPException as e:
            raise BadResponse(f"{method} {url}: malformed HTTP reply ({type(e).__name__}: {e})")
        try:
            data = response.read()
        except http.client.IncompleteRead as e:
            raise BadResponse(f"{method} {url}: HTTP {response.status}: body truncated: got {len(e.partial)} "
                              f"bytes, {e.expected} more were announced: {_snippet(e.partial)}")
        except (TimeoutError, socket.timeout):
            raise ServerTimeout(f"{method} {url}: HTTP {response.status}: body not received within the read "
                                f"timeout of {cfg.read_timeout} s")
        except (ConnectionError, http.client.HTTPException) as e:
            raise BadResponse(f"{method} {url}: HTTP {response.status}: connection lost while reading the body "
                              f"({type(e).__name__}: {e})")
        return response.status, response.headers, data
    finally:
        conn.close()


def request_json(method: str, url: str, body: Any = None, headers: dict | None = None,
                 cfg: HTTPConfig = HTTPConfig(), sleep: Callable[[float], None] = time.sleep,
                 on_attempt: Callable[[], None] | None = None) -> Any:
    """Send `body` as JSON, return the reply's JSON; retries as described in the module docstring."""
    payload = None if body is None else json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
    attempt = 0
    while True:
        attempt += 1
        if on_attempt:
            on_attempt()
        try:
            status, reply_headers, data = _attempt(method, url, payload, headers, cfg)
            if 200 <= status < 300:
                return _parse_json(method, url, status, data)
            if status == 429 or status >= 500:
                raise _Retryable(f"HTTP {status}: {_snippet(data)}", retry_after=_retry_after(reply_headers))
            raise RequestRejected(f"{method} {url}: HTTP {status} (not retried): {_snippet(data)}")
        except _Retryable as failure:
            if attempt > cfg.max_retries:
                kind = ServerTimeout if failure.timeout else ServerUnavailable
                raise kind(f"{method} {url}: {failure} (gave up after {attempt} attempts)") from None
            delay = min(cfg.max_backoff, cfg.backoff * 2 ** (attempt - 1))
            if failure.retry_after is not None:
                delay = min(cfg.max_backoff, max(delay, failure.retry_after))
            sleep(delay)


def _parse_json(method: str, url: str, status: int, data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadResponse(f"{method} {url}: HTTP {status}: response is not valid JSON ({e}): {_snippet(data)}") from None


# ----------------------------------------------------------------------------------------------------
# Completion payloads and replies


def stop_strings(stop_ids: Sequence[int], tokenizer) -> list[str]:
    """The stop ids as text, for servers that only know stop strings (empty strings dropped)."""
    if tokenizer is None:
        return []
    texts = [tokenizer.decode([i], skip_special_tokens=False) for i in stop_ids]
    return [t for t in dict.fromkeys(texts) if t]


def completion_payload(request: Request, sampling: SamplingParams, model: str | None, prompt,
                       stops: Sequence[str] = (), extra_body: dict | None = None) -> dict:
    """The JSON body of one completion request. Non-OpenAI fields are ignored by servers that lack them."""
    body = {
        "prompt": prompt,
        "max_tokens": request.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "n": 1,
        "stream": False,
        # vLLM / SGLang: stop ids, the completion's ids back, and text that keeps special tokens with no
        # spaces inserted between them (so that re-tokenising the text gives the ids).
        "stop_token_ids": list(request.stop_ids),
        "return_token_ids": True,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "add_special_tokens": False,
        # llama.cpp: ids in its native reply format.
        "return_tokens": True,
    }
    if model is not None:
        body["model"] = model
    seed = request.seed if request.seed is not None else sampling.seed
    if seed is not None:
        body["seed"] = seed
    if stops:
        body["stop"] = list(stops)
    body.update(extra_body or {})
    return body


_TOKEN_ID = re.compile(r"token_id:(\d+)$")


def int_list(value) -> list[int] | None:
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return None


def _ids_from_fields(choice: dict, data: dict) -> list[int] | None:
    """Ids the server returned itself: token_ids (vLLM), tokens (llama.cpp), token_id:N logprobs (vLLM)."""
    verbose = data.get("__verbose")  # llama-server started with verbose logging: its native reply
    for value in (choice.get("token_ids"), choice.get("tokens"), verbose.get("tokens") if isinstance(verbose, dict) else None):
        ids = int_list(value)
        if ids is not None:
            return ids
    logprobs = choice.get("logprobs")
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    if isinstance(tokens, list) and tokens and all(isinstance(t, str) and _TOKEN_ID.match(t) for t in tokens):
        return [int(_TOKEN_ID.match(t).group(1)) for t in tokens]
    return None


def _ids_from_text(where: str, choice: dict, usage, request: Request, finish: str, tokenizer, eos) -> list[int]:
    """Re-tokenise the text, and put back the stop token that the server cut from it."""
    text = choice.get("text")
    if not isinstance(text, str):
        raise BadResponse(f"{where}: the choice has no token ids and no 'text' string")
    if tokenizer is None:
        raise BadResponse(f"{where}: the server returned no token ids ('token_ids' / 'tokens'); pass "
                          f"tokenizer= to re-tokenise its text")
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    stops = set(request.stop_ids) | ({eos} if eos is not None else set())
    if finish != "stop" or (ids and ids[-1] in stops):
        return ids
    for key in ("stop_reason", "matched_stop"):  # vLLM, SGLang
        if key in choice:
            reason = choice[key]
            if reason is None and eos is not None:
                return ids + [eos]
            if isinstance(reason, int) and not isinstance(reason, bool):
                return ids + [reason]
            if isinstance(reason, str):
                return ids + list(tokenizer.encode(reason, add_special_tokens=False))
    # llama.cpp servers give no stop reason: llama-cpp-python counts a stop string's token but not an EOS.
    others = [s for s in dict.fromkeys(request.stop_ids) if s != eos]
    counted = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not others or counted == len(ids):
        if eos is None:
            raise BadResponse(f"{where}: stopped at EOS, but the tokenizer has no eos_token_id")
        return ids + [eos]
    if len(others) == 1 and counted is not None:
        return ids + others
    raise BadResponse(f"{where}: finish_reason 'stop' but cannot tell which stop ended the text: no token ids, "
                      f"no 'stop_reason' / 'matched_stop', completion_tokens={counted!r}, stops {request.stop_ids}")


def parse_completion(data: Any, request: Request, where: str, tokenizer=None, eos: int | None = None) -> Completion:
    """One Completion from a `/v1/completions` reply (one prompt, n=1); BadResponse naming what is wrong."""
    if not isinstance(data, dict):
        raise BadResponse(f"{where}: response JSON is a {type(data).__name__}, not an object: {_snippet(json.dumps(data))}")
    if "choices" not in data:
        detail = f" (error: {_snippet(json.dumps(data['error']))})" if "error" in data else ""
        raise BadResponse(f"{where}: response JSON has no 'choices'{detail}: {_snippet(json.dumps(data))}")
    choices = data["choices"]
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        count = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise BadResponse(f"{where}: expected exactly 1 choice object for 1 prompt, got {count}")
    choice = choices[0]
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        raise BadResponse(f"{where}: finish_reason {finish!r} is neither 'stop' nor 'length'")
    ids = _ids_from_fields(choice, data)
    if ids is None:
        ids = _ids_from_text(where, choice, data.get("usage"), request, finish, tokenizer, eos)
    if not ids:
        raise BadResponse(f"{where}: empty completion (finish_reason {finish!r})")
    if len(ids) > request.max_new_tokens:
        raise BadResponse(f"{where}: {len(ids)} completion tokens for max_tokens {request.max_new_tokens}")
    if tokenizer is not None and not all(0 <= i < len(tokenizer) for i in ids):
        raise BadResponse(f"{where}: token ids outside the tokenizer's {len(tokenizer)} ids: {ids[:20]}")
    if ids[-1] in request.stop_ids or (eos is not None and ids[-1] == eos):
        finish = "stop"  # the Completion contract: ended with a stop id
    return Completion(ids, finish)


# ----------------------------------------------------------------------------------------------------
# The engine over HTTP


class OpenAICompletionsEngine:
    """The `Engine` protocol over `POST {base_url}/v1/completions` (vLLM, SGLang, llama.cpp, serve_hf)."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, *,
                 tokenizer=None, token_ids: bool = True, timeout: float | tuple[float, float] = (5.0, 600.0),
                 max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 30.0, concurrency: int = 16,
                 max_context: int | None = None, extra_body: dict | None = None):
        if not token_ids and tokenizer is None:
            raise ValueError("token_ids=False sends text prompts: it needs tokenizer= to decode the ids")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):  # accept the OpenAI-client style base URL too
            self.base_url = self.base_url[:-3]
        self.url = f"{self.base_url}/v1/completions"
        self.http = HTTPConfig(connect, read, max_retries, backoff, max_backoff)
        self.tokenizer, self.token_ids, self.concurrency = tokenizer, token_ids, concurrency
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.extra_body = dict(extra_body or {})
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.sleep: Callable[[float], None] = time.sleep  # replaceable, so tests can record the back-off
        self._model, self._max_context, self._models = model, max_context, None
        self._lock = threading.Lock()
        # A fast tokenizer shared by the request threads: one at a time (its Rust core can refuse a
        # concurrent borrow), and the stop strings of each stop set decoded once.
        self._tokenizer_lock = threading.Lock()
        self._stop_strings: dict[tuple[int, ...], list[str]] = {}
        self.stats = {"requests": 0, "attempts": 0}

    # -- what the server is serving -------------------------------------------------------------------

    def models(self) -> list[dict]:
        """`GET /v1/models`'s entries (cached)."""
        if self._models is None:
            url = f"{self.base_url}/v1/models"
            data = request_json("GET", url, headers=self.headers, cfg=self.http, sleep=self.sleep)
            entries = data.get("data") if isinstance(data, dict) else None
            if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
                raise BadResponse(f"GET {url}: expected {{'data': [model objects]}}, got {_snippet(json.dumps(data))}")
            self._models = entries
        return self._models

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = str(self.models()[0].get("id"))
        return self._model

    @property
    def max_context(self) -> int:
        if self._max_context is None:
            entry = next((e for e in self.models() if e.get("id") == self.model), self.models()[0])
            value = entry.get("max_model_len")
            if not isinstance(value, int):
                raise EngineError(f"GET {self.base_url}/v1/models reports no 'max_model_len' (llama.cpp servers "
                                  f"do not): pass max_context= to OpenAICompletionsEngine")
            self._max_context = value
        return self._max_context

    # -- completions ---------------------------------------------------------------------------------

    def _count_attempt(self) -> None:
        with self._lock:
            self.stats["attempts"] += 1

    def _payload(self, request: Request, sampling: SamplingParams) -> dict:
        with self._tokenizer_lock:
            stops = self._stop_strings.get(tuple(request.stop_ids))
            if stops is None:
                stops = self._stop_strings[tuple(request.stop_ids)] = stop_strings(request.stop_ids, self.tokenizer)
            prompt = list(request.prompt_ids) if self.token_ids else \
                self.tokenizer.decode(request.prompt_ids, skip_special_tokens=False)
        return completion_payload(request, sampling, self.model, prompt, stops, self.extra_body)

    def complete(self, request: Request, sampling: SamplingParams = SamplingParams()) -> Completion:
        """One request, one HTTP exchange (plus retries)."""
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        if self._max_context is not None and len(request.prompt_ids) + request.max_new_tokens > self._max_context:
            raise ValueError(f"{len(request.prompt_ids)} prompt + {request.max_new_tokens} new tokens exceed the "
                             f"context of {self._max_context}")
        body = self._payload(request, sampling)
        with self._lock:
            self.stats["requests"] += 1
        data = request_json("POST", self.url, body, self.headers, self.http, self.sleep, self._count_attempt)
        with self._tokenizer_lock:
            return parse_completion(data, request, f"POST {self.url}: HTTP 200", self.tokenizer, self.eos)

    def generate(self, requests: Sequence[Request], sampling: SamplingParams = SamplingParams()) -> list[Completion]:
        if not requests:
            return []
        workers = min(self.concurrency, len(requests))
        if workers == 1:
            return [self.complete(r, sampling) for r in requests]
        with ThreadPoolExecutor(workers, thread_name_prefix="twlab-http") as pool:
            futures = [pool.submit(self.complete, r, sampling) for r in requests]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:  # do not start what is still queued; the running ones finish
                    f.cancel()
                raise


# What each kind of server needs: (token-id prompts?, extra request fields). vLLM and SGLang take ids
# and report max_model_len; llama-server takes ids; llama-cpp-python takes text only.
SERVER_KINDS = {
    "vllm": (True, {}),
    "sglang": (True, {}),
    "llama-server": (True, LLAMA_CPP_NEUTRAL_SAMPLING),
    "llama-cpp-python": (False, LLAMA_CPP_NEUTRAL_SAMPLING),
}


def engine_for_server(url: str, kind: str, tokenizer, max_context: int | None = None, **kwargs) -> OpenAICompletionsEngine:
    """An OpenAICompletionsEngine set up for one kind of server (see SERVER_KINDS)."""
    if kind not in SERVER_KINDS:
        raise ValueError(f"server kind must be one of {sorted(SERVER_KINDS)}, got {kind!r}")
    token_ids, extra = SERVER_KINDS[kind]
    return OpenAICompletionsEngine(url, tokenizer=tokenizer, token_ids=token_ids, max_context=max_context,
                                   extra_body={**extra, **kwargs.pop("extra_body", {})}, **kwargs)


# ----------------------------------------------------------------------------------------------------
# vLLM in process (GPU)


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "VLLMEngine needs vllm, which runs on CUDA GPUs: on a GPU machine run `pip install -e .[gpu]` "
            "(or `python3 lab.py install --gpu`). The official vllm wheels do not run on a CPU; on this "
            "lab's CPU machines use HFEngine, or OpenAICompletionsEngine against a server") from e
    return vllm


class VLLMEngine:
    """`vllm.LLM` in process, prefix caching on; requests go in as token ids, completions come back as ids."""

    def __init__(self, model_path, **llm_kwargs):
        vllm = _import_vllm()
        llm_kwargs.setdefault("enable_prefix_caching", True)  # threads and continuations share the prefix
        self.llm = vllm.LLM(model=str(model_path), **llm_kwargs)
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        self.max_context = getattr(config, "max_model_len", None) or llm_kwargs.get("max_model_len")
        if not self.max_context:
            raise EngineError("cannot read max_model_len from vllm; pass max_model_len= to VLLMEngine")

    def generate(self, requests: Sequence[Request], sampling: SamplingParams = SamplingParams()) -> list[Completion]:
        if not requests:
            return []
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        params = [VLLMSamplingParams(max_tokens=r.max_new_tokens, stop_token_ids=list(r.stop_ids),
                                     temperature=sampling.temperature, top_p=sampling.top_p,
                                     seed=r.seed if r.seed is not None else sampling.seed,
                                     detokenize=False)  # ids are all we read
                  for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        completions = []
        for r, out in zip(requests, outputs):
            ids = list(out.outputs[0].token_ids)
            finish = "stop" if ids and ids[-1] in r.stop_ids else ("length" if out.outputs[0].finish_reason == "length"
                                                                    else "stop")
            completions.append(Completion(ids, finish))
        return completions
