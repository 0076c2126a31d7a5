"""The strong model of data generation: any OpenAI-compatible `/v1/chat/completions` endpoint, and a response cache.

Design choices
- HTTP reuses `twlib.engines.request_json` (timeouts, retries with back-off on 429/5xx/connection errors,
  named `EngineError`s). The API key is read from the environment variable named in `ChatConfig`, never
  stored in a config.
- A response cache on disk (JSONL, keyed by a hash of the whole request body: model, messages, sampling
  fields), so re-running sends no request twice. Usage and cost accounting from the reply's `usage`
  fields, prices per 1M tokens in `ChatConfig`.
- `FunctionChat` wraps a Python function as a chat model (tests, notebook 04, offline demos).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from twlib.datagen import is_int, snip
from twlib.engines import BadResponse, HTTPConfig, request_json

__all__ = ["ChatConfig", "ChatReply", "chat_body", "parse_chat_reply", "ChatClient", "FunctionChat", "ResponseCache",
           "end_with_newline", "read_jsonl"]


# ----------------------------------------------------------------------------------------------------
# The strong model: any OpenAI-compatible chat endpoint


@dataclass(frozen=True)
class ChatConfig:
    """Where the strong model is and what it costs. The API key is read from the environment variable
    named by `api_key_env` (never stored in a config). `temperature` / `max_tokens` are sent only if set
    (some models accept only their defaults); `extra_body` is merged into every request."""

    base_url: str = "http://127.0.0.1:8000"
    model: str = "strong-model"
    api_key_env: str | None = None
    temperature: float | None = 0.0
    max_tokens: int | None = None
    extra_body: dict = field(default_factory=dict)
    price_input_per_1m: float = 0.0  # currency units per 1M prompt tokens
    price_output_per_1m: float = 0.0  # per 1M completion tokens
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    max_retries: int = 4
    backoff: float = 1.0


@dataclass(frozen=True)
class ChatReply:
    content: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


def chat_body(config: ChatConfig, messages: Sequence[dict]) -> dict:
    body = {"model": config.model, "messages": list(messages), "stream": False}
    if config.temperature is not None:
        body["temperature"] = config.temperature
    if config.max_tokens is not None:
        body["max_tokens"] = config.max_tokens
    body.update(config.extra_body)
    return body


def parse_chat_reply(data: Any, where: str) -> ChatReply:
    """Content and usage of a `/v1/chat/completions` reply; BadResponse if it is not one. A missing or
    null content reads as "" (the step then rejects the sample); missing usage counts 0 tokens."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadResponse(f"{where}: no 'choices' in the reply: {snip(json.dumps(data), 200)}")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = [usage.get(k) if is_int(usage.get(k)) else 0 for k in ("prompt_tokens", "completion_tokens")]
    return ChatReply(content if isinstance(content, str) else "", *tokens)


class ChatClient:
    """`POST {base_url}/v1/chat/completions` with twlib.engines' retries and errors. Thread-safe."""

    def __init__(self, config: ChatConfig):
        self.config = config
        base = config.base_url.rstrip("/")
        self.url = (base[:-3] if base.endswith("/v1") else base) + "/v1/chat/completions"
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = HTTPConfig(config.connect_timeout, config.read_timeout, config.max_retries, config.backoff)
        self.model = config.model
        self.attempts, self._lock = 0, threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.attempts += 1

    def body(self, messages: Sequence[dict]) -> dict:
        return chat_body(self.config, messages)

    def chat(self, messages: Sequence[dict]) -> ChatReply:
        data = request_json("POST", self.url, self.body(messages), self.headers, self.http, on_attempt=self._count)
        return parse_chat_reply(data, f"POST {self.url}")


class FunctionChat:
    """A chat client around a Python function `messages -> content` (scripted models in notebooks and
    tests, no HTTP). Token counts are estimates: 4 characters per token."""

    def __init__(self, fn: Callable[[list[dict]], str], model: str = "scripted"):
        self.fn, self.model, self.attempts = fn, model, 0

    def body(self, messages: Sequence[dict]) -> dict:
        return {"model": self.model, "messages": list(messages)}

    def chat(self, messages: Sequence[dict]) -> ChatReply:
        self.attempts += 1
        content = self.fn(list(messages))
        prompt = sum(len(m.get("content", "")) for m in messages)
        return ChatReply(content, prompt // 4, len(content) // 4)


class ResponseCache:
    """Replies on disk, one JSON line each, keyed by the SHA-256 of the request body (model, messages and
    sampling fields). A torn last line (a crash mid-write) is ignored when loading. Thread-safe."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        end_with_newline(self.path)
        self._entries = {r["key"]: r for r in read_jsonl(self.path) if isinstance(r.get("key"), str)}
        self._lock = threading.Lock()

    @staticmethod
    def key(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> ChatReply | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        return ChatReply(entry["content"], entry.get("prompt_tokens", 0), entry.get("completion_tokens", 0), True)

    def put(self, key: str, model: str, reply: ChatReply) -> None:
        entry = {"key": key, "model": model, "content": reply.content, "prompt_tokens": reply.prompt_tokens,
                 "completion_tokens": reply.completion_tokens}
        with self._lock:
            self._entries[key] = entry
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def end_with_newline(path) -> None:
    """Terminate a torn last line (a crash mid-write), so that the next append starts a line of its own."""
    path = Path(path)
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def read_jsonl(path) -> list[dict]:
    """The JSON objects of a JSONL file; undecodable lines (a torn write) are skipped; [] if absent."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out
