"""A reference server: an `HFEngine` behind vLLM's `/v1/completions` API shape (teaching and tests only).

    python -m twlib serve --model assets/checkpoints/tiny-pgrpo [--port 8000] [--allow-weight-updates DIR]

Design choices
- Standard library HTTP (`http.server`), one thread per connection; a batching thread (`_Batcher`) collects
  the requests that arrive within `batch_window` seconds and decodes them together on the engine, as
  continuous batching does in vLLM. Each request is seeded alone, as vLLM does, so per-request-seeded
  sampling through the server equals the in-process HFEngine token for token.
- Replies carry the generated token ids (`choice["token_ids"]`, as vLLM >= 0.10.2); `style="llama.cpp"`
  answers as llama-cpp-python does (text only) to exercise `twlib.engines`' re-tokenising path.
- `POST /load_weights` (weight sync of `twlib.train.pgrpo_fsdp`) is off unless a weight folder is given; it
  then needs a shared bearer token and loads only folders inside that folder, between batches.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from twlib.decoding import Completion, Request, SamplingParams
from twlib.engines import int_list


# ----------------------------------------------------------------------------------------------------
# A reference server: an HFEngine behind vLLM's API shape (teaching and tests only)


@dataclass
class _Job:
    request: Request | None
    sampling: SamplingParams | None
    done: threading.Event
    result: Completion | None = None
    error: BaseException | None = None
    fn: Callable[[], object] | None = None  # run alone in the batcher thread (a weight load)


def load_safetensors_dir(model, path) -> int:
    """Copy the tensors of a directory's `*.safetensors` files into `model`'s parameters and buffers, in
    place and under their `state_dict` names (what `save_pretrained` writes, or `twlib.train.pgrpo_fsdp`'s
    weight sync). A tied LM head may be absent (it is the embedding). Returns the number of tensors loaded;
    raises ValueError naming the file and tensor on an unknown name or a shape mismatch, before changing
    anything."""
    import torch
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors file to load weights from")
    own = model.state_dict(keep_vars=True)
    loaded: dict[str, tuple[Path, torch.Tensor]] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            if name not in own:
                raise ValueError(f"{file}: tensor {name!r} is not a parameter of the served model")
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise ValueError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, the model's is "
                                 f"{tuple(own[name].shape)}")
            loaded[name] = (file, tensor)
    with torch.no_grad():
        for name, (_, tensor) in loaded.items():
            own[name].copy_(tensor)
    return len(loaded)


class _Batcher:
    """One thread owns the engine; concurrent requests that arrive within `window` seconds run as one batch."""

    def __init__(self, engine, window: float):
        self.engine, self.window = engine, window
        self.jobs: queue.Queue = queue.Queue()
        self.batches: list[int] = []  # batch sizes, for tests and curiosity
        self.thread = threading.Thread(target=self._loop, name="twlab-batcher", daemon=True)
        self.thread.start()

    def submit(self, request: Request, sampling: SamplingParams) -> Completion:
        job = _Job(request, sampling, threading.Event())
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def call(self, fn: Callable[[], object]):
        """Run `fn` in the batcher thread between two batches (no generation runs meanwhile)."""
        job = _Job(None, None, threading.Event(), fn=fn)
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=5)

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, deadline = [first], time.monotonic() + self.window
        while (left := deadline - time.monotonic()) > 0:
            try:
                job = self.jobs.get(timeout=left)
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            jobs, stop = self._collect(first)
            groups: dict[SamplingParams, list[_Job]] = {}
            for job in jobs:
                if job.fn is not None:  # the completions collected so far run first, with the old weights
                    self._run(groups)
                    groups = {}
                    try:
                        job.result = job.fn()
                    except BaseException as e:
                        job.error = e
                    job.done.set()
                    continue
                groups.setdefault(job.sampling, []).append(job)
            self._run(groups)
            if stop:
                return

    def _run(self, groups: dict) -> None:
        if groups:
            for sampling, group in groups.items():
                self.batches.append(len(group))
                try:
                    outs = self.engine.generate([j.request for j in group], sampling)
                    for j, out in zip(group, outs):
                        j.result = out
                except BaseException as e:  # reported to every waiting handler as HTTP 500
                    for j in group:
                        j.error = e
                for j in group:
                    j.done.set()


class _BadRequest(Exception):
    pass


class _Forbidden(Exception):
    """Refused by policy (weight updates off, no or wrong token, a path outside the allowed folder): HTTP 403."""


WEIGHT_TOKEN_ENV = "TWLAB_WEIGHT_TOKEN"


def _as_stop_ids(body: dict, tokenizer) -> list[int]:
    ids = int_list(body.get("stop_token_ids") or [])
    if ids is None:
        raise _BadRequest("'stop_token_ids' must be a list of integers")
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _BadRequest("'stop' must be a string or a list of strings")
    for s in stops:
        encoded = tokenizer.encode(s, add_special_tokens=False) if tokenizer is not None else []
        if len(encoded) != 1:
            raise _BadRequest(f"stop string {s!r}: this reference server supports only stop strings that are one "
                              f"token (and needs a tokenizer for them)")
        ids.append(encoded[0])
    return list(dict.fromkeys(ids))


def _as_prompt(body: dict, tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if tokenizer is None:
            raise _BadRequest("text prompts need the server to have a tokenizer; send token ids")
        prompt = tokenizer.encode(prompt, add_special_tokens=False)
    ids = int_list(prompt)
    if not ids:
        raise _BadRequest("'prompt' must be a non-empty list of token ids or a string (one prompt per request)")
    return ids


def _number(body: dict, key: str, default, kind=float, low=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise _BadRequest(f"'{key}' must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if low is not None and value < low:
        raise _BadRequest(f"'{key}' must be >= {low}, got {value}")
    return kind(value)


class CompletionServer(ThreadingHTTPServer):
    """`serve_hf`'s server. `url` is its base URL; `close()` stops it; usable as a context manager."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, engine, tokenizer=None, model_name: str = "hf", batch_window: float = 0.005,
                 style: str = "vllm", weight_dir=None, weight_token: str | None = None):
        if style not in ("vllm", "llama.cpp"):
            raise ValueError(f"style must be 'vllm' or 'llama.cpp', got {style!r}")
        if weight_dir is not None and not weight_token:
            raise ValueError(f"weight updates need a shared token: pass weight_token (--weight-token or "
                             f"${WEIGHT_TOKEN_ENV}); POST /load_weights then requires 'Authorization: Bearer TOKEN'")
        # Resolved once, at start: a request may only name this folder or one below it (symlinks and `..`
        # resolved), and never when weight_dir is None (the route is off).
        self.weight_dir = Path(weight_dir).expanduser().resolve() if weight_dir is not None else None
        self._weight_token = weight_token.encode("utf-8") if weight_token else None
        super().__init__(address, _Handler)
        self.engine, self.tokenizer, self.model_name, self.style = engine, tokenizer, model_name, style
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(getattr(getattr(engine, "model", None), "generation_config", None), "eos_token_id", None)
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.vocab_size = engine.model.get_input_embeddings().num_embeddings
        self.batcher = _Batcher(engine, batch_window)
        self.counter, self._counter_lock = 0, threading.Lock()
        self.weight_loads = 0
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "CompletionServer":
        self._thread = threading.Thread(target=self.serve_forever, name="twlab-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5)
        self.server_close()
        self.batcher.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- weight sync (twlib.train.pgrpo_fsdp's `server` rollouts) ---------------------------------------

    def _weight_path(self, body: dict, authorization: str | None) -> Path:
        """The folder a /load_weights request may load, or _Forbidden / _BadRequest saying why not.

        Off unless the server was started with a weight folder; then the request must carry the shared
        token (`Authorization: Bearer TOKEN`, compared in constant time) and name a folder inside the
        weight folder, checked after resolving symlinks and `..`, down to each *.safetensors file."""
        import hmac

        if self.weight_dir is None:
            raise _Forbidden("weight updates are off on this server: start it with --allow-weight-updates DIR "
                             f"and a shared token (--weight-token or ${WEIGHT_TOKEN_ENV})")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Forbidden("POST /load_weights needs the shared weight token: header 'Authorization: Bearer TOKEN'")
        if not hmac.compare_digest(token.strip().encode("utf-8"), self._weight_token):
            raise _Forbidden("POST /load_weights: wrong weight token")
        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise _BadRequest("'path' must name a directory of *.safetensors files")
        folder = (self.weight_dir / path).resolve()  # an absolute path replaces weight_dir; a relative one is below it
        if not folder.is_relative_to(self.weight_dir):
            raise _Forbidden(f"path {path!r} resolves to {folder}, outside the weight folder {self.weight_dir} "
                             f"this server was started with")
        if not folder.is_dir():
            raise _BadRequest(f"path {path!r}: no such directory")
        for file in folder.glob("*.safetensors"):
            if not file.resolve().is_relative_to(self.weight_dir):
                raise _Forbidden(f"{file.name} in {path!r} links outside the weight folder {self.weight_dir}")
        return folder

    def load_weights(self, body: dict, authorization: str | None = None) -> dict:
        """POST /load_weights {"path": DIR}: load DIR's safetensors into the served model, between batches,
        and drop the prefix cache (its KV came from the old weights). Answers the number of tensors.
        Gated (see `_weight_path`): off by default, a shared token, DIR inside the folder fixed at start."""
        path = str(self._weight_path(body, authorization))

        def load():
            n = load_safetensors_dir(self.engine.model, path)
            self.engine.reset()
            return n

        n = self.batcher.call(load)
        with self._counter_lock:
            self.weight_loads += 1
        return {"loaded": n, "path": path, "weight_loads": self.weight_loads}

    def reset_prefix_cache(self) -> dict:
        self.batcher.call(self.engine.reset)
        return {"reset": True}

    # -- one completion ------------------------------------------------------------------------------

    def complete(self, body: dict) -> dict:
        if body.get("stream"):
            raise _BadRequest("streaming is not supported by this reference server")
        if body.get("n", 1) != 1:
            raise _BadRequest("only n=1 is supported")
        prompt = _as_prompt(body, self.tokenizer)
        max_tokens = _number(body, "max_tokens", 16, int, low=1)
        if len(prompt) + max_tokens > self.engine.max_context:
            raise _BadRequest(f"This model's maximum context length is {self.engine.max_context} tokens; the "
                              f"request has {len(prompt)} prompt tokens and max_tokens {max_tokens}")
        if not all(0 <= i < self.vocab_size for i in prompt):
            raise _BadRequest(f"prompt token ids must be in [0, {self.vocab_size})")
        stops = _as_stop_ids(body, self.tokenizer)
        if not body.get("ignore_eos"):  # vLLM stops at EOS unless told not to
            stops += [e for e in self.eos_ids if e not in stops]
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _BadRequest("'seed' must be an integer")
        # A seed seeds this request alone (vLLM's semantics): the batcher may batch it with any others.
        sampling = SamplingParams(_number(body, "temperature", 1.0, low=0.0), _number(body, "top_p", 1.0, low=0.0))
        done = self.batcher.submit(Request(prompt, max_tokens, tuple(stops), seed=seed), sampling)
        with self._counter_lock:
            self.counter += 1
        return self._reply(body, prompt, done, stops)

    def _text(self, ids: list[int], skip_special: bool) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def _reply(self, body: dict, prompt: list[int], done: Completion, stops: list[int]) -> dict:
        stopped = done.finish == "stop" and done.ids[-1] in stops
        if self.style == "vllm":
            choice = {"index": 0, "text": self._text(done.ids, bool(body.get("skip_special_tokens", True))),
                      "logprobs": None, "finish_reason": done.finish,
                      "stop_reason": (None if done.ids[-1] in self.eos_ids else done.ids[-1]) if stopped else None}
            if body.get("return_token_ids"):
                choice["token_ids"] = list(done.ids)
                choice["prompt_token_ids"] = list(prompt)
            counted = len(done.ids)
        else:
            # llama-cpp-python: text only, the stop cut from it; an EOS it stopped at is not counted.
            body_ids = done.ids[:-1] if stopped else done.ids
            choice = {"index": 0, "text": self._text(body_ids, False), "logprobs": None, "finish_reason": done.finish}
            counted = len(done.ids) - (1 if stopped and done.ids[-1] in self.eos_ids else 0)
        return {"id": f"cmpl-{self.counter}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": [choice],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": counted,
                          "total_tokens": len(prompt) + counted}}


class _Handler(BaseHTTPRequestHandler):
    server: CompletionServer

    def log_message(self, format, *args):  # quiet: tests and notebooks do not want access logs
        pass

    def _send(self, status: int, data: dict) -> None:
        payload = json.dumps(data).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, message: str) -> None:
        kind = {400: "BadRequestError", 403: "PermissionDeniedError", 404: "NotFoundError"}.get(
            status, "InternalServerError")
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "owned_by": "twlab",
                                                         "max_model_len": self.server.engine.max_context}]})
        elif self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self):
        routes = {"/v1/completions": self.server.complete,
                  "/load_weights": lambda body: self.server.load_weights(body, self.headers.get("Authorization")),
                  "/reset_prefix_cache": lambda body: self.server.reset_prefix_cache()}
        route = routes.get(self.path.rstrip("/"))
        if route is None:
            return self._error(404, f"no route POST {self.path} (this server has {', '.join(routes)})")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length).decode("utf-8") or "{}")
            if not isinstance(body, dict):
                raise _BadRequest("the request body must be a JSON object")
            reply = route(body)
        except _Forbidden as e:
            return self._error(403, str(e))
        except (_BadRequest, ValueError) as e:  # JSONDecodeError and the engine's own checks are ValueErrors
            return self._error(400, str(e))
        except Exception as e:
            return self._error(500, f"{type(e).__name__}: {e}")
        self._send(200, reply)


def serve_hf(engine, host: str = "127.0.0.1", port: int = 0, tokenizer=None, model_name: str = "hf",
             batch_window: float = 0.005, style: str = "vllm", weight_dir=None,
             weight_token: str | None = None) -> CompletionServer:
    """Serve `engine` (an HFEngine) at `http://host:port/v1/completions` in a background thread.

    port 0 picks a free port (see `server.url`). With a tokenizer the server also takes text prompts and
    one-token stop strings, and returns text. `style="llama.cpp"` answers as llama-cpp-python does.
    `POST /load_weights` is off unless `weight_dir` is given; it then needs `weight_token` as a bearer token
    and loads only folders inside `weight_dir`.
    """
    return CompletionServer((host, port), engine, tokenizer, model_name, batch_window, style, weight_dir,
                            weight_token).start()


def main(argv=None, prog: str | None = None) -> int:
    """`python -m twlib serve --model DIR [--port 8000] [--allow-weight-updates DIR]`: serve until Ctrl-C."""
    import os

    parser = argparse.ArgumentParser(prog=prog, description="Serve a transformers checkpoint at /v1/completions "
                                                            "(twlib's reference server; vLLM's API shape)")
    parser.add_argument("--model", required=True, help="a directory written by save_pretrained, or a cached hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default=None, help="model name reported by /v1/models (default: the directory name)")
    parser.add_argument("--style", choices=["vllm", "llama.cpp"], default="vllm")
    parser.add_argument("--batch-window", type=float, default=0.005)
    parser.add_argument("--allow-weight-updates", metavar="DIR", default=None,
                        help="turn on POST /load_weights for folders inside DIR only (off by default); needs a token")
    parser.add_argument("--weight-token", default=None,
                        help=f"the shared token /load_weights requires as 'Authorization: Bearer TOKEN' (default: "
                             f"${WEIGHT_TOKEN_ENV}; the environment keeps it out of the process list)")
    args = parser.parse_args(argv)
    token = args.weight_token or os.environ.get(WEIGHT_TOKEN_ENV) or None
    if args.allow_weight_updates is None and args.weight_token:
        parser.error("--weight-token without --allow-weight-updates DIR: weight updates stay off")
    if args.allow_weight_updates is not None and not token:
        parser.error(f"--allow-weight-updates needs a shared token: --weight-token TOKEN or ${WEIGHT_TOKEN_ENV}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.decoding import HFEngine
    from twlib.hub import ModelNotFound, resolve_model

    try:
        path = resolve_model(args.model)
    except ModelNotFound as e:
        parser.error(str(e))
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer)
    server = serve_hf(engine, args.host, args.port, tokenizer, args.name or Path(args.model).name,
                      args.batch_window, args.style, args.allow_weight_updates, token)
    gate = (f"POST /load_weights on for {server.weight_dir} (bearer token)" if server.weight_dir is not None
            else "POST /load_weights off")
    print(f"serving {args.model} at {server.url}/v1/completions; {gate} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
