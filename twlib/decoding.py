"""Decoding: an `Engine` protocol, the 5-phase state machine over any engine, and an in-process engine.

The state machine (spec section 2) only ever sends ordinary completion requests:
1. sequential: decode from the context until `</Outlines>` (or EOS);
2. read the outline numbers of the newest `<Outlines>` block, de-duplicated;
3. parallel: one request per number n with context + `\\n<Thread>\\n{n}:`, stopping at `</Thread>`;
4. join: context + `\\n<Thread>\\n1:` + t1 + `<Thread>\\n2:` + t2 + ... + `\\n`;
5. continue sequentially (the model writes `</Parallel>`, more text, maybe another block).

Design choices
- Token ids end to end. Orchestrator text (`\\n<Thread>\\n{n}:`, the join glue) is encoded and appended
  to the context ids, exactly as `twlib.trie.tokenize_calls` builds training contexts, so what the model
  sees at inference is what it was trained on, token for token.
- One state machine per problem, written as a generator that yields lists of requests and receives their
  completions. A scheduler batches the pending requests of every active problem into one engine call, so
  the threads of a block and many problems share forward passes; batch size 1 is the paper's setting.
- One failure policy, every case flagged, never an exception (the reference has two variants):
  `no_outlines` (`</Outlines>` with no numbers: stop), `duplicate_outlines` (de-duplicated, go on),
  `too_many_threads` (keep the first `max_threads`), `thread_unclosed` (a thread hit its token budget) and
  `thread_eos` (EOS inside a thread): the thread is closed with `\\n</Thread>`, the block with
  `\\n</Parallel>` after the join, and decoding stops, as the reference RL does; `iteration_cap`
  (reference: 32 blocks), `token_budget` (total generated tokens summed over every call), `truncated`
  (sequential call hit the budget) and `context_overflow` (the next request would not fit the model).
- `HFEngine` runs transformers in process with a custom decode loop: the longest common prefix of a
  batch is prefilled once and its KV cache forked (repeat-interleaved) for the rows; rows of unequal
  suffix length are right-padded inside the cache with masked holes and per-row position ids; finished
  rows leave the batch. A small prefix cache keeps the KV of the last few single-row calls and reuses the
  entry with the longest common prefix (cropped), so threads and the continuation after a join do not
  prefill the shared prefix again (what prefix caching does in vLLM). Greedy by default; temperature / top-p sampling with a seed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import torch

from twlib.format import PathStats, THREAD_CLOSE, OUTLINES_CLOSE, OUTLINES_OPEN, is_valid, outline_numbers, \
    path_stats, thread_prefix

# ----------------------------------------------------------------------------------------------------
# The engine protocol


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. `seed` makes sampled decoding reproducible for the same batch; a
    request's own `Request.seed` makes it reproducible whatever the batch (see `ParallelDecoder.decode`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()  # generation ends right after one of these (it is part of the output)
    # Sampling seed of this request alone: its tokens then depend on (weights, prompt, seed), not on the
    # other requests of the batch, the batch size or the machine it runs on (vLLM's per-request seed).
    seed: int | None = None


@dataclass
class Completion:
    ids: list[int]
    finish: str  # "stop" (ended with a stop id), "length" (max_new_tokens)


class Engine(Protocol):
    """Anything that completes a batch of token-id prompts: in process (`HFEngine`, `twlib.engines.VLLMEngine`)
    or over HTTP (`twlib.engines.OpenAICompletionsEngine`). `finish == "stop"` means the last id is one of
    the request's stop ids (servers also stop at EOS whatever `stop_ids` says; include EOS in them)."""

    max_context: int

    def generate(self, requests: Sequence[Request], sampling: SamplingParams) -> list[Completion]:
        ...


# ----------------------------------------------------------------------------------------------------
# Records and configuration


@dataclass
class CallRecord:
    """One engine request made by a decoder."""

    context_ids: list[int]
    completion_ids: list[int]
    kind: str  # "sequential" | "thread"
    phase: int  # 1 (sequential before a block or the end) | 3 (thread) | 5 (continuation after a join)
    block: int | None = None
    thread: int | None = None
    finish: str = ""
    seconds: float = 0.0  # wall time of the engine call this request was part of


@dataclass
class DecodeResult:
    prompt_ids: list[int]
    response_ids: list[int]  # without the final EOS
    text: str
    calls: list[CallRecord]
    stats: PathStats
    seconds: float
    flags: list[str] = field(default_factory=list)
    finished: bool = False  # ended with EOS, not by a cap or a failure
    valid: bool = False  # the response parses (twlib.format)

    @property
    def ok(self) -> bool:
        return self.finished and self.valid and not self.flags


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 1024  # total generated tokens, summed over every call (threads included)
    max_thread_tokens: int = 512
    max_threads: int = 16
    max_iterations: int = 32  # blocks per response, as in the reference
    thread_mode: str = "batched"  # "batched" (one engine call per block) | "serial" (one thread at a time)
    sampling: SamplingParams = SamplingParams()
    # text forced at the start of every response, e.g. "<think>\n<Parallel>\n" to make a model that can
    # write both forms use the parallel one; it is part of the response (text, token counts, format check)
    response_prefix: str = ""


_OUTLINE_NUMBER = re.compile(r"<Outline>\s*(\d+)\s*:")


def _require_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text} must be a single token of the tokenizer (see twlib.tokenizer.add_thread_tokens)")
    return ids[0]


# ----------------------------------------------------------------------------------------------------
# The state machine


class ParallelDecoder:
    """The 5-phase state machine over any `Engine`. `allow_blocks=False` never opens a block (`sequential_decoder`)."""

    def __init__(self, engine: Engine, tokenizer, config: DecodeConfig = DecodeConfig(), allow_blocks: bool = True):
        if config.thread_mode not in ("batched", "serial"):
            raise ValueError(f"thread_mode must be 'batched' or 'serial', got {config.thread_mode!r}")
        self.engine, self.tokenizer, self.config, self.allow_blocks = engine, tokenizer, config, allow_blocks
        self.eos = tokenizer.eos_token_id
        if allow_blocks:
            from twlib.tokenizer import require_single_token_tags

            require_single_token_tags(tokenizer)  # every tag one token, or an error naming the fix
            self.outlines_open = _require_token(tokenizer, OUTLINES_OPEN)
            self.outlines_close = _require_token(tokenizer, OUTLINES_CLOSE)
            self.thread_close = _require_token(tokenizer, THREAD_CLOSE)
        self._encoded: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        if text not in self._encoded:
            self._encoded[text] = list(self.tokenizer.encode(text, add_special_tokens=False))
        return self._encoded[text]

    # -- one problem ---------------------------------------------------------------------------------

    def _machine(self, prompt_ids: list[int], seed: int | None = None):
        """Generator: yields lists of Requests, receives lists of (Completion, seconds); returns the result.

        With a `seed`, the n-th request of this problem carries the seed `request_seed(seed, n)`."""
        cfg = self.config
        made = 0

        def seeded(request: Request) -> Request:
            nonlocal made
            if seed is not None:
                request.seed = request_seed(seed, made)
            made += 1
            return request
        context, calls, flags = list(prompt_ids) + self.encode(cfg.response_prefix), [], []
        generated, blocks, finished = len(context) - len(prompt_ids), 0, False
        limit = self.engine.max_context
        seq_stops = (self.outlines_close, self.eos) if self.allow_blocks else (self.eos,)

        def room() -> int:
            return min(cfg.max_new_tokens - generated, limit - len(context))

        while True:
            if room() <= 0:
                flags.append("token_budget" if cfg.max_new_tokens - generated <= 0 else "context_overflow")
                break
            request = seeded(Request(list(context), room(), seq_stops))
            [(done, seconds)] = yield [request]
            calls.append(CallRecord(request.prompt_ids, done.ids, "sequential", 5 if blocks else 1,
                                    finish=done.finish, seconds=seconds))
            context += done.ids
            generated += len(done.ids)
            if done.finish != "stop":
                flags.append("context_overflow" if len(context) >= limit else "truncated")
                break
            if done.ids[-1] == self.eos:
                finished = True
                break
            # Phase 2: outline numbers of the newest <Outlines> block.
            response = context[len(prompt_ids):]
            start = len(response) - 1 - response[::-1].index(self.outlines_open) if self.outlines_open in response else 0
            region = self.tokenizer.decode(response[start:], skip_special_tokens=False)
            numbers = outline_numbers(region)
            if not numbers:
                flags.append("no_outlines")
                break
            if len(_OUTLINE_NUMBER.findall(region)) > len(numbers):
                flags.append("duplicate_outlines")
            if len(numbers) > cfg.max_threads:
                flags.append("too_many_threads")
                numbers = numbers[: cfg.max_threads]
            blocks += 1
            if blocks > cfg.max_iterations:
                flags.append("iteration_cap")
                break
            # Phase 3: one request per thread; the token budget is shared between them.
            prefixes = [self.encode(thread_prefix(n)) for n in numbers]
            longest_prefix = max(len(p) for p in prefixes)
            budget = min(cfg.max_thread_tokens, (cfg.max_new_tokens - generated) // len(numbers),
                         limit - len(context) - longest_prefix)
            if budget <= 0:
                flags.append("context_overflow" if limit - len(context) - longest_prefix <= 0 else "token_budget")
                break
            requests = [seeded(Request(context + p, budget, (self.thread_close, self.eos))) for p in prefixes]
            if cfg.thread_mode == "batched":
                results = yield requests
            else:
                results = []
                for r in requests:
                    results += (yield [r])
            completions, failed = [], False
            for n, r, (done, seconds) in zip(numbers, requests, results):
                calls.append(CallRecord(r.prompt_ids, done.ids, "thread", 3, blocks - 1, n, done.finish, seconds))
                generated += len(done.ids)
                ids = list(done.ids)
                if done.finish == "stop" and ids[-1] == self.thread_close:
                    completions.append(ids)
                    continue
                failed = True
                flags.append("thread_eos" if done.finish == "stop" else "thread_unclosed")
                if ids and ids[-1] == self.eos:
                    ids = ids[:-1]
                completions.append(ids + self.encode("\n" + THREAD_CLOSE))
            # Phase 4: the join rule, built from ids.
            joined = []
            for i, (n, ids) in enumerate(zip(numbers, completions)):
                joined += self.encode(thread_prefix(n) if i == 0 else f"<Thread>\n{n}:") + ids
            context += joined + self.encode("\n")
            if failed:
                context += self.encode("</Parallel>")
                break
        response = context[len(prompt_ids):]
        if finished:
            response = response[:-1]
        text = self.tokenizer.decode(response, skip_special_tokens=False)
        stats = path_stats(response, self.tokenizer)
        return DecodeResult(list(prompt_ids), response, text, calls, stats, 0.0, flags, finished,
                            is_valid(text))

    # -- many problems -------------------------------------------------------------------------------

    def decode(self, prompts: Sequence[Sequence[int]] | Sequence[int], batch_size: int = 1,
               progress: Callable[[int], None] | None = None,
               seeds: Sequence[int] | None = None) -> list[DecodeResult] | DecodeResult:
        """Decode prompts (token ids), `batch_size` problems at a time. A single prompt gives one result.

        `seeds` (one per prompt) seed every request of a problem on its own, so that a sampled result is a
        function of (weights, prompt, seed) alone: the same whatever the batch size, the other prompts or
        the rank that decodes it (P-GRPO's rollouts rely on this; `twlib.train.pgrpo_fsdp`)."""
        single = bool(prompts) and isinstance(prompts[0], int)
        prompt_list = [list(prompts)] if single else [list(p) for p in prompts]
        if seeds is not None:
            seeds = [seeds] if single and isinstance(seeds, int) else list(seeds)
            if len(seeds) != len(prompt_list):
                raise ValueError(f"decode: {len(seeds)} seeds for {len(prompt_list)} prompts")
        results: list[DecodeResult | None] = [None] * len(prompt_list)
        for start in range(0, len(prompt_list), batch_size):
            chunk = range(start, min(start + batch_size, len(prompt_list)))
            began = time.perf_counter()
            machines = {i: self._machine(prompt_list[i], seeds[i] if seeds is not None else None) for i in chunk}
            for i, result in self._run_batch(machines):
                results[i] = result
            # Wall time per problem: exact at batch size 1 (the paper's setting), else the batch's time
            # shared equally, so that summing over problems gives the total wall time.
            for i in chunk:
                results[i].seconds = (time.perf_counter() - began) / len(chunk)
            if progress:
                progress(len(chunk))
        return results[0] if single else results

    def _run_batch(self, machines: dict):
        pending: dict[int, list[Request]] = {}
        for i, m in list(machines.items()):
            pending[i] = next(m)
        while pending:
            order = [(i, j) for i, reqs in pending.items() for j in range(len(reqs))]
            began = time.perf_counter()
            outs = self.engine.generate([pending[i][j] for i, j in order], self.config.sampling)
            seconds = time.perf_counter() - began
            answers: dict[int, list] = {i: [] for i in pending}
            for (i, _), out in zip(order, outs):
                answers[i].append((out, seconds))
            pending = {}
            for i, answer in answers.items():
                try:
                    pending[i] = machines[i].send(answer)
                except StopIteration as stop:
                    yield i, stop.value


def request_seed(seed: int, n: int) -> int:
    """The seed of the n-th request of a problem seeded with `seed` (a 63-bit mix, stable across runs)."""
    return (seed * 6364136223846793005 + (n + 1) * 1442695040888963407) % (1 << 63)


def sequential_decoder(engine: Engine, tokenizer, config: DecodeConfig = DecodeConfig()) -> ParallelDecoder:
    """The sequential baseline's decoder: one call per problem, stopping at EOS only."""
    return ParallelDecoder(engine, tokenizer, config, allow_blocks=False)


# ----------------------------------------------------------------------------------------------------
# In-process engine on transformers


def _shallow_copy(cache):
    """A new DynamicCache over the same tensors (cache updates concatenate, so the original is kept)."""
    from transformers import DynamicCache

    copy = DynamicCache()
    for layer in cache.layers:
        copy.update(layer.keys, layer.values, len(copy.layers))
    return copy


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _sample(logits: torch.Tensor, sampling: SamplingParams, generator) -> torch.Tensor:
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / sampling.temperature).softmax(-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cache_argument(model) -> str:
    """The forward argument that takes the KV cache: `cache` since transformers 5.24, `past_key_values` before.

    The old name still works until 5.40 but warns on every new call site; we support both (pyproject asks
    for transformers>=5.0).
    """
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache of a model output, by its new name (`cache`, transformers 5.24) or its old one."""
    return out["cache"] if "cache" in out else out.past_key_values


class HFEngine:
    """transformers model in process: shared-prefix prefill, KV fork, batched rows with per-row stops."""

    def __init__(self, model, tokenizer=None, prefix_cache: bool = True, max_context: int | None = None,
                 num_threads: int | None = 1):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        # Decoding small models on a CPU is bound by per-step overhead: a second intra-op thread makes a
        # decode step slower, not faster (benchmarks/threads.py, idle machine: tiny 1.9 vs 2.3 ms, small
        # 4.2 vs 5.2 ms), and far slower when another process holds the other core. None leaves torch's
        # setting alone (GPU, or big models on many cores).
        self.num_threads = num_threads if self.device.type == "cpu" else None
        self.max_context = max_context or model.config.max_position_embeddings
        self.prefix_cache = prefix_cache
        self._cache_argument = cache_argument(model)
        self.cache_entries = 4
        self._entries: list[tuple[list[int], object]] = []  # (ids whose KV is in the cache, cache), newest last
        self.stats = {"calls": 0, "prefill_tokens": 0, "decode_steps": 0, "generated_tokens": 0}
        self._calls = 0

    def reset(self) -> None:
        self._entries = []
        self.stats = dict.fromkeys(self.stats, 0)

    def _forward(self, ids, positions, mask, cache):
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                         **{self._cache_argument: cache})
        return out.logits[:, -ids.shape[1]:], returned_cache(out)

    def _prefix(self, shared: list[int]):
        """KV cache for `shared` (batch 1), starting from the cached entry sharing its longest prefix."""
        from transformers import DynamicCache

        cache, have = DynamicCache(), 0
        for ids, cached in self._entries if self.prefix_cache else []:
            common = _common_prefix(ids, shared)
            if common > have:
                cache, have = _shallow_copy(cached), common
                if common < len(ids):
                    cache.crop(common - len(ids))  # transformers 5 crops by a negative count
        if have < len(shared):
            rest = torch.tensor([shared[have:]], device=self.device)
            positions = torch.arange(have, len(shared), device=self.device)[None]
            mask = torch.ones(1, len(shared), dtype=torch.long, device=self.device)
            _, cache = self._forward(rest, positions, mask, cache)
            self.stats["prefill_tokens"] += len(shared) - have
        return cache

    def generate(self, requests: Sequence[Request], sampling: SamplingParams = SamplingParams()) -> list[Completion]:
        if not requests:
            return []
        before = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            return self._generate(requests, sampling)
        finally:
            torch.set_num_threads(before)

    @torch.no_grad()
    def _generate(self, requests: Sequence[Request], sampling: SamplingParams) -> list[Completion]:
        self._calls += 1
        self.stats["calls"] += 1
        prompts = [list(r.prompt_ids) for r in requests]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"request {i} has an empty prompt")
            if len(p) + requests[i].max_new_tokens > self.max_context:
                raise ValueError(f"request {i}: {len(p)} prompt + {requests[i].max_new_tokens} new tokens exceed "
                                 f"the model's context of {self.max_context}")
        rows = len(prompts)
        # 1. The longest common prefix (leaving every row at least one token of its own), prefilled once.
        shared = min(len(p) for p in prompts) - 1
        for j in range(shared):
            if any(p[j] != prompts[0][j] for p in prompts):
                shared = j
                break
        cache = self._prefix(prompts[0][:shared])
        if rows > 1 and shared > 0:
            cache.batch_repeat_interleave(rows)
        # 2. Each row's own suffix, right-padded; padding is a masked hole in the cache.
        lengths = [len(p) - shared for p in prompts]
        width = max(lengths)
        pad = 0
        suffix = torch.tensor([p[shared:] + [pad] * (width - n) for p, n in zip(prompts, lengths)], device=self.device)
        positions = (shared + torch.arange(width, device=self.device)).expand(rows, -1)
        real = torch.arange(width, device=self.device)[None] < torch.tensor(lengths, device=self.device)[:, None]
        mask = torch.cat([torch.ones(rows, shared, dtype=torch.long, device=self.device), real.long()], dim=1)
        logits, cache = self._forward(suffix, positions, mask, cache)
        self.stats["prefill_tokens"] += sum(lengths)
        last = logits[torch.arange(rows), torch.tensor(lengths, device=self.device) - 1]
        next_pos = torch.tensor([len(p) for p in prompts], device=self.device)
        # 3. Decode: finished rows leave the batch.
        generator, row_generators = None, None
        if sampling.temperature > 0 and any(r.seed is not None for r in requests):
            # per-request seeds: one generator per row, so a row's tokens do not depend on its batch
            row_generators = []
            for r in requests:
                g = torch.Generator(device=self.device)
                g.manual_seed(r.seed if r.seed is not None else (sampling.seed or 0) * 1_000_003 + self._calls)
                row_generators.append(g)
        elif sampling.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed((sampling.seed or 0) * 1_000_003 + self._calls)
        outputs: list[list[int]] = [[] for _ in range(rows)]
        finish = ["length"] * rows
        active = list(range(rows))
        stops = [set(r.stop_ids) for r in requests]
        while True:
            if row_generators is None:
                tokens = _sample(last, sampling, generator).tolist()
            else:
                tokens = [int(_sample(last[slot:slot + 1], sampling, row_generators[row])[0])
                          for slot, row in enumerate(active)]
            keep = []
            for slot, (row, tok) in enumerate(zip(active, tokens)):
                outputs[row].append(tok)
                if tok in stops[row]:
                    finish[row] = "stop"
                elif len(outputs[row]) < requests[row].max_new_tokens:
                    keep.append(slot)
            self.stats["generated_tokens"] += len(active)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos = mask[index], next_pos[index]
                active = [active[s] for s in keep]
                tokens = [tokens[s] for s in keep]
            mask = torch.cat([mask, torch.ones(len(active), 1, dtype=mask.dtype, device=self.device)], dim=1)
            ids = torch.tensor(tokens, device=self.device)[:, None]
            logits, cache = self._forward(ids, next_pos[:, None], mask, cache)
            self.stats["decode_steps"] += 1
            next_pos = next_pos + 1
            last = logits[:, -1]
        # Keep the KV of a single-row call for the next request that extends it (threads, continuation).
        if self.prefix_cache and rows == 1:
            self._entries = (self._entries + [(prompts[0] + outputs[0][:-1], cache)])[-self.cache_entries:]
        return [Completion(o, f) for o, f in zip(outputs, finish)]
