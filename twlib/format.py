"""The ThreadWeaver trajectory format: parse, render, the state machine's calls, critical-path stats.

A parallel block, character for character (spec section 1):

    <Parallel>\\n<Outlines>\\n<Outline>1:{o1}</Outline>\\n<Outline>2:{o2}</Outline>\\n</Outlines>\\n
    <Thread>\\n1:{t1}\\n</Thread><Thread>\\n2:{t2}\\n</Thread>{tail}</Parallel>

(one line in the text; `{tail}` is `\\n` in the canonical form). Everything outside blocks is free text.

Design choices
- One strict grammar. `parse` accepts exactly the canonical layout, so every valid text has one
  `Trajectory` and `render(parse(s)) == s` for every `s` that parses. A model that writes an extra blank
  line inside a block has made a format error, and the error names it (line, column, what was expected).
- Outline and thread texts are stored raw, after `{n}:` (so `<Outline>1: plan</Outline>` keeps its space),
  and a thread body excludes the one `\\n` before `</Thread>` that the format itself requires.
- The tail (text after the last `</Thread>`) must start with the `\\n` that the join rule inserts; the model
  may write more before `</Parallel>`. It counts on the sequential path.
- `engine_calls` is the exact list of completion requests the 5-phase state machine makes; `replay`
  re-runs the join rule over their completions. Completions include their stop tag (`</Outlines>`,
  `</Thread>`) so that training on them teaches the model to stop.
- `path_stats` never raises: it also measures malformed model outputs, counting what structure it sees.
  Only response tokens are counted (the reference also counts the prompt; see the spec's decision).
- Deviation from the reference code: `<Conclusion>` and capitalised `<Think>` are not tags here (the
  released data uses neither); they are reported as unknown tags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence, Union

# ----------------------------------------------------------------------------------------------------
# Tags

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PARALLEL_OPEN, PARALLEL_CLOSE = "<Parallel>", "</Parallel>"
OUTLINES_OPEN, OUTLINES_CLOSE = "<Outlines>", "</Outlines>"
OUTLINE_OPEN, OUTLINE_CLOSE = "<Outline>", "</Outline>"
THREAD_OPEN, THREAD_CLOSE = "<Thread>", "</Thread>"
TAGS = (
    THINK_OPEN, THINK_CLOSE, PARALLEL_OPEN, PARALLEL_CLOSE, OUTLINES_OPEN, OUTLINES_CLOSE,
    OUTLINE_OPEN, OUTLINE_CLOSE, THREAD_OPEN, THREAD_CLOSE,
)
_TAG_NAMES = {t.strip("</>").lower(): t.strip("</>") for t in TAGS}
# Anything that looks like one of our tags: `<Name>` / `</Name>` with a letter first. Lower-case words
# that are not (a case variant of) a tag name are left alone as text (`a<b>c` in math is not a tag).
_TAG_LIKE = re.compile(r"</?([A-Za-z][A-Za-z_]*)>")
_NUMBER = re.compile(r"(\d+):")


class FormatError(ValueError):
    """A malformed trajectory. `offset` is 0-based in the text; `line` and `col` are 1-based."""

    def __init__(self, message: str, text: str = "", offset: int = 0):
        self.offset = offset
        self.line = text.count("\n", 0, offset) + 1
        self.col = offset - (text.rfind("\n", 0, offset) + 1) + 1
        self.reason = message
        super().__init__(f"line {self.line}, col {self.col}: {message}")


def _show(s: str, limit: int = 24) -> str:
    """A short, escaped excerpt for error messages."""
    s = s[:limit] + ("..." if len(s) > limit else "")
    return repr(s) if s else "end of text"


# ----------------------------------------------------------------------------------------------------
# Data model


@dataclass(frozen=True)
class Block:
    """One `<Parallel>` block: outline i and thread i belong together (numbers are 1..k)."""

    outlines: tuple[str, ...]
    threads: tuple[str, ...]
    tail: str = "\n"

    def __post_init__(self):
        object.__setattr__(self, "outlines", tuple(self.outlines))
        object.__setattr__(self, "threads", tuple(self.threads))

    def render(self) -> str:
        parts = [PARALLEL_OPEN, "\n", OUTLINES_OPEN, "\n"]
        parts += [f"{OUTLINE_OPEN}{i}:{o}{OUTLINE_CLOSE}\n" for i, o in enumerate(self.outlines, 1)]
        parts += [OUTLINES_CLOSE, "\n"]
        parts += [f"{THREAD_OPEN}\n{i}:{t}\n{THREAD_CLOSE}" for i, t in enumerate(self.threads, 1)]
        parts += [self.tail, PARALLEL_CLOSE]
        return "".join(parts)


Segment = Union[str, Block]


@dataclass(frozen=True)
class Trajectory:
    """A response: free text and parallel blocks, in order. Adjacent texts are merged, empty ones dropped."""

    segments: tuple[Segment, ...] = field(default_factory=tuple)

    def __post_init__(self):
        merged: list[Segment] = []
        for seg in self.segments:
            if isinstance(seg, str):
                if not seg:
                    continue
                if merged and isinstance(merged[-1], str):
                    merged[-1] += seg
                    continue
            elif not isinstance(seg, Block):
                raise TypeError(f"a segment must be str or Block, got {type(seg).__name__}")
            merged.append(seg)
        object.__setattr__(self, "segments", tuple(merged))

    @property
    def blocks(self) -> list[Block]:
        return [s for s in self.segments if isinstance(s, Block)]

    @property
    def is_parallel(self) -> bool:
        return bool(self.blocks)

    def render(self) -> str:
        return "".join(s if isinstance(s, str) else s.render() for s in self.segments)

    def __str__(self) -> str:
        return self.render()


def render(trajectory: Trajectory) -> str:
    """Canonical text of a trajectory (same as `trajectory.render()`)."""
    return trajectory.render()


# ----------------------------------------------------------------------------------------------------
# Parsing


def _check_unknown_tags(text: str) -> None:
    """Reject tag-like words that are not tags: `<Think>`, `<thread>`, `<Conclusion>`, ..."""
    for m in _TAG_LIKE.finditer(text):
        tag = m.group(0)
        if tag in TAGS:
            continue
        name = m.group(1)
        if name.lower() in _TAG_NAMES:
            wanted = tag.replace(name, _TAG_NAMES[name.lower()])
            raise FormatError(f"unknown tag {tag} (tags are case-sensitive: did you mean {wanted}?)", text, m.start())
        if name[0].isupper():
            raise FormatError(f"unknown tag {tag}", text, m.start())


class _Parser:
    """Recursive descent over the text with a cursor; every failure is a FormatError at the cursor."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self, message: str, offset: int | None = None):
        raise FormatError(message, self.text, self.pos if offset is None else offset)

    def next_tag(self, start: int) -> tuple[int, str | None]:
        """Offset and name of the next tag at or after `start` (len(text), None when there is none)."""
        best, best_tag = len(self.text), None
        i = self.text.find("<", start)
        while i != -1:
            for tag in TAGS:
                if self.text.startswith(tag, i):
                    return i, tag
            i = self.text.find("<", i + 1)
        return best, best_tag

    def expect(self, literal: str, where: str):
        if not self.text.startswith(literal, self.pos):
            self.fail(f"expected {literal!r} {where}, found {_show(self.text[self.pos:])}")
        self.pos += len(literal)

    def number(self, what: str, expected: int) -> None:
        m = _NUMBER.match(self.text, self.pos)
        if not m:
            self.fail(f"{what} without a number: expected '{expected}:', found {_show(self.text[self.pos:])}")
        if int(m.group(1)) != expected:
            rule = "outline numbers must be 1..k in order" if what == "outline" else \
                "thread numbers must equal the outline numbers, in order"
            self.fail(f"{rule}: expected {expected}, found {m.group(1)}")
        self.pos = m.end()

    def text_until(self, closing: str, opened: str, opened_at: int) -> str:
        """Raw text up to the next tag, which must be `closing`; the cursor ends after `closing`."""
        at, tag = self.next_tag(self.pos)
        if tag is None:
            self.fail(f"unclosed {opened}: no {closing} before the end of the text", opened_at)
        if tag != closing:
            if tag in (PARALLEL_OPEN, OUTLINES_OPEN, OUTLINE_OPEN, THREAD_OPEN) and tag != opened:
                self.fail(f"{tag} inside {opened}: blocks do not nest (single level only)", at)
            self.fail(f"unclosed {opened}: found {tag} before {closing}", at)
        body = self.text[self.pos:at]
        self.pos = at + len(closing)
        return body

    def block(self) -> Block:
        start = self.pos - len(PARALLEL_OPEN)
        self.expect("\n" + OUTLINES_OPEN + "\n", "right after <Parallel>")
        outlines = []
        while self.text.startswith(OUTLINE_OPEN, self.pos):
            opened_at = self.pos
            self.pos += len(OUTLINE_OPEN)
            self.number("outline", len(outlines) + 1)
            outlines.append(self.text_until(OUTLINE_CLOSE, OUTLINE_OPEN, opened_at))
            self.expect("\n", "after </Outline>")
        if not self.text.startswith(OUTLINES_CLOSE, self.pos):
            if self.pos >= len(self.text):
                self.fail("unclosed <Outlines>", start)
            self.fail(f"expected <Outline> or </Outlines>, found {_show(self.text[self.pos:])}")
        if not outlines:
            self.fail("empty <Outlines>: a block needs at least one outline")
        self.pos += len(OUTLINES_CLOSE)
        self.expect("\n" + THREAD_OPEN, "after </Outlines> (the first thread)")
        self.pos -= len(THREAD_OPEN)
        threads = []
        while True:
            opened_at = self.pos
            self.expect(THREAD_OPEN + "\n", "to open a thread")
            self.number("thread", len(threads) + 1)
            body = self.text_until(THREAD_CLOSE, THREAD_OPEN, opened_at)
            if not body.endswith("\n"):
                self.fail("expected '\\n' right before </Thread>", self.pos - len(THREAD_CLOSE))
            if not body.strip():
                self.fail(f"empty thread {len(threads) + 1}", opened_at)
            threads.append(body[:-1])
            if self.text.startswith(THREAD_OPEN, self.pos):
                continue
            at, tag = self.next_tag(self.pos)
            if tag == THREAD_OPEN:
                self.fail("text between sibling threads: expected '</Thread><Thread>'")
            break
        if len(threads) != len(outlines):
            plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else "s")
            self.fail(f"block has {plural(len(outlines), 'outline')} but {plural(len(threads), 'thread')}")
        tail_at = self.pos
        tail = self.text_until(PARALLEL_CLOSE, PARALLEL_OPEN, start)
        if not tail.startswith("\n"):
            self.fail("expected '\\n' after the last </Thread>", tail_at)
        return Block(tuple(outlines), tuple(threads), tail)

    def trajectory(self) -> Trajectory:
        segments: list[Segment] = []
        think_at = None
        while True:
            at, tag = self.next_tag(self.pos)
            segments.append(self.text[self.pos:at])
            if tag is None:
                break
            self.pos = at + len(tag)
            if tag == PARALLEL_OPEN:
                segments.append(self.block())
            elif tag == THINK_OPEN:
                if think_at is not None:
                    self.fail("nested <think>", at)
                think_at = at
                segments.append(tag)
            elif tag == THINK_CLOSE:
                if think_at is None:
                    self.fail("</think> without <think>", at)
                think_at = None
                segments.append(tag)
            else:
                self.fail(f"{tag} outside a <Parallel> block", at)
        if think_at is not None:
            self.fail("unclosed <think>", think_at)
        return Trajectory(tuple(segments))


def parse(text: str) -> Trajectory:
    """Parse a response into a `Trajectory`. Raises `FormatError` (and nothing else) on any malformed input."""
    if not isinstance(text, str):
        raise FormatError(f"expected a str, got {type(text).__name__}")
    _check_unknown_tags(text)
    return _Parser(text).trajectory()


def is_valid(text: str) -> bool:
    try:
        parse(text)
        return True
    except FormatError:
        return False


# ----------------------------------------------------------------------------------------------------
# The state machine's calls


def thread_prefix(n: int) -> str:
    """What the orchestrator appends to the context to start thread n (phase 3)."""
    return f"\n<Thread>\n{n}:"


def join_threads(completions: Sequence[str], numbers: Sequence[int] | None = None) -> str:
    """Phase 4, the join rule: `\\n<Thread>\\n1:` + t1 + `<Thread>\\n2:` + t2 + ... + `\\n`.

    Each completion ends with its `</Thread>` stop tag; there is a newline before the first thread only.
    """
    if numbers is None:
        numbers = range(1, len(completions) + 1)
    text = ""
    for i, (n, completion) in enumerate(zip(numbers, completions)):
        newline = "\n" if i == 0 else ""
        text += f"{newline}<Thread>\n{n}:" + completion
    return text + "\n"


def outline_numbers(context: str) -> list[int]:
    """Phase 2: outline numbers of the newest `<Outlines>` block, de-duplicated, in order of appearance."""
    start = context.rfind("<Outlines>")
    if start == -1:
        return []
    end = context.find("</Outlines>", start)
    region = context[start:] if end == -1 else context[start:end]
    numbers = []
    for match in re.finditer(r"<Outline>\s*(\d+)\s*:", region):
        if int(match.group(1)) not in numbers:
            numbers.append(int(match.group(1)))
    return numbers


@dataclass(frozen=True)
class Call:
    """One completion request of the state machine: the engine sees `context`, writes `completion`."""

    context: str
    completion: str
    kind: str  # "sequential" or "thread"
    block: int | None = None  # index of the block a thread call belongs to
    thread: int | None = None  # thread number (1..k)


def engine_calls(trajectory: str | Trajectory, prompt: str = "") -> list[Call]:
    """The exact requests the 5-phase state machine makes to produce `trajectory` after `prompt`.

    Sequential calls run until `</Outlines>` (or the end); then one call per thread with the context
    `prefix + "\\n<Thread>\\n{n}:"`; the join rule rebuilds the context and decoding continues.
    """
    if isinstance(trajectory, str):
        trajectory = parse(trajectory)
    calls, context, pending, block_index = [], prompt, "", 0
    for segment in trajectory.segments:
        if isinstance(segment, str):
            pending += segment
            continue
        text = segment.render()
        header = text[: text.index("</Outlines>") + len("</Outlines>")]
        calls.append(Call(context, pending + header, "sequential"))  # phase 1
        context += pending + header
        completions = [body + "\n</Thread>" for body in segment.threads]
        for n, completion in enumerate(completions, 1):  # phase 3
            calls.append(Call(context + thread_prefix(n), completion, "thread", block_index, n))
        context += join_threads(completions)  # phase 4
        pending = segment.tail[1:] + "</Parallel>"  # phase 5 starts here
        block_index += 1
    if pending or not calls:
        calls.append(Call(context, pending, "sequential"))
    return calls


def replay(calls: Sequence[Call], prompt: str = "") -> str:
    """Re-run the state machine over recorded completions and return the response text.

    Checks that every call's context is exactly what the state machine would send (ValueError if not).
    """
    context, i = prompt, 0
    while i < len(calls):
        call = calls[i]
        if call.kind != "sequential" or call.context != context:
            raise ValueError(f"call {i}: expected a sequential call on the current context")
        context += call.completion  # phase 1 (or 5)
        i += 1
        if not call.completion.endswith("</Outlines>"):
            continue
        numbers = outline_numbers(context)  # phase 2
        threads = calls[i : i + len(numbers)]  # phase 3
        if len(threads) != len(numbers):
            raise ValueError(f"expected {len(numbers)} thread calls, found {len(threads)}")
        for n, thread in zip(numbers, threads):
            if thread.kind != "thread" or thread.context != context + thread_prefix(n):
                raise ValueError(f"thread {n} does not start from the shared prefix")
        context += join_threads([t.completion for t in threads], numbers)  # phase 4
        i += len(numbers)
    return context[len(prompt):]


# The worked example used throughout the docs, tests and notebooks: one block, two threads, 4 calls.
DISTANCE_PROMPT = "What is the distance between the points (1, 2) and (7, 10)?\n"
DISTANCE_EXAMPLE = (
    "<think>\n"
    "The distance is sqrt((x2-x1)^2 + (y2-y1)^2). The two squares do not depend on each other.\n"
    "<Parallel>\n<Outlines>\n"
    "<Outline>1: Compute (x2-x1)^2.</Outline>\n"
    "<Outline>2: Compute (y2-y1)^2.</Outline>\n"
    "</Outlines>\n"
    "<Thread>\n1: x2-x1 = 7-1 = 6, so (x2-x1)^2 = 36.\n</Thread>"
    "<Thread>\n2: y2-y1 = 10-2 = 8, so (y2-y1)^2 = 64.\n</Thread>\n"
    "</Parallel>\n"
    "The sum is 36 + 64 = 100, and sqrt(100) = 10.\n"
    "</think>\n\n"
    "The distance is \\boxed{10}."
)


# ----------------------------------------------------------------------------------------------------
# Critical-path statistics


@dataclass(frozen=True)
class PathStats:
    """total T, longest (critical) path L, eta = 1 - L/T (a fraction saved), self_parallelism = T/L."""

    total: int
    longest: int
    eta: float
    self_parallelism: float  # T/L (not a speed-up: that is eval.compare's T_seq/L)
    blocks: int = 0
    threads: int = 0


def char_units(text: str) -> list[str]:
    """Tokens when no tokenizer is given: each tag is one token, every other character is one token."""
    pieces = re.split("(" + "|".join(re.escape(tag) for tag in TAGS) + ")", text)
    return [u for i, piece in enumerate(pieces) for u in ([piece] if i % 2 else list(piece))]


def count_path(tokens: list[str]) -> PathStats:
    """Spec section 3 over a token sequence (tags given as their strings, other tokens as anything else).

    Outside blocks every token is sequential (`<Parallel>`, `</Parallel>` included). Inside a block the
    outlines, the `<Thread>`/`</Thread>` wrappers and the tail are sequential; the tokens between
    `<Thread>` and `</Thread>` (the `\\n{n}:`, the body and its last `\\n`) count once per block as the max
    over threads. Tolerant: an unclosed thread or block ends where the text ends.
    """
    sequential = blocks = threads = 0
    lengths = None  # body lengths of the open block's threads; None outside blocks
    in_body = False
    for token in tokens:
        if in_body and token not in ("</Thread>", "</Parallel>"):
            lengths[-1] += 1  # a thread body token: runs in parallel
            continue
        in_body = False
        sequential += 1  # every other token is on the critical path
        if token == "<Parallel>" and lengths is None:
            lengths, blocks = [], blocks + 1
        elif token == "<Thread>" and lengths is not None:
            lengths.append(0)
            in_body, threads = True, threads + 1
        elif token == "</Parallel>" and lengths is not None:
            sequential += max(lengths, default=0)  # the block waits for its longest thread
            lengths = None
    if lengths is not None:  # unclosed block: close it at the end of the text
        sequential += max(lengths, default=0)

    # T = every response token;  L = sequential tokens + sum over blocks of max over threads |body|
    total, longest = len(tokens), sequential
    # eta = 1 - L / T  (the fraction of tokens off the critical path);  self-parallelism = T / L
    eta = 1.0 - longest / total if total else 0.0
    parallelism = total / longest if longest else 1.0
    return PathStats(total, longest, eta, parallelism, blocks, threads)


def path_stats(token_ids_or_text, tokenizer=None) -> PathStats:
    """Critical-path statistics of a response (response tokens only: pass no prompt).

    - `path_stats(text)`: every tag is one token and every other character one token (this is exactly
      what `twlib.tokenizer`'s character-level tokenizer produces).
    - `path_stats(text, tokenizer)` / `path_stats(ids, tokenizer)`: tokens of that tokenizer; tags must be
      single tokens in it (see `twlib.tokenizer.add_thread_tokens`).
    """
    if tokenizer is None:
        if not isinstance(token_ids_or_text, str):
            raise ValueError("path_stats(token_ids) needs the tokenizer that produced them")
        return count_path(char_units(token_ids_or_text))
    ids = token_ids_or_text
    if isinstance(ids, str):
        ids = tokenizer.encode(ids, add_special_tokens=False)
    return count_path(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))
