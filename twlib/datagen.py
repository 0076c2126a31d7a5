"""Data generation: rewriting sequential traces into parallel trajectories, and self-training.

    python -m twlib.datagen rewrite --url http://127.0.0.1:8000 --model NAME --data traces.parquet --out runs/rewrite
    python -m twlib.datagen arc --out runs/arc --model runs/tiny/base/final

The paper (spec section 7) builds its training data in two stages.

Stage 1, rewriting (a strong model, here any OpenAI-compatible `/v1/chat/completions` endpoint), five steps
per correct sequential trace:
1. mark (LLM): the reasoning is shown with line numbers; the model answers a small JSON object naming
   blocks of consecutive lines and how each block splits into threads;
2. extract (deterministic): cut the threads out of the trace; a block where one thread holds more than
   `max_thread_share` of the block's tokens is dropped (its lines stay sequential), since it would save
   almost nothing on the critical path;
3. edit (LLM): minimal edits that make each thread self-contained, as find/replace pairs;
4. outline (LLM): one outline line per thread;
5. filter (deterministic): `twlib.format.parse`, the answer unchanged, and thread-independence checks.
Stage 2, self-training: the SFT model decodes a prompt pool with the 5-phase state machine and keeps the
trajectories that are format-valid and answer-correct; they become the second SFT's data. `run_arc`
plays the paper's whole arc (first SFT, self-training, second SFT) on the tiny task.

Design choices
- Every LLM step is a pure prompt builder (`mark_messages`, ...) and a pure reply checker (`parse_marks`,
  `parse_edits`, `parse_outlines`); the deterministic steps (`extract_threads`, `apply_edits`, `assemble`,
  `format_filter`) are pure functions too. A failure is a `StepError(step, kind, reason)`; `rewrite_sample`
  turns it into a rejection with that step and reason, so a model that answers nonsense costs samples,
  never the run.
- Small strict reply formats: one JSON object per step (a ```json fence or prose around it is tolerated).
  Threads are adjacent line ranges, so extraction can neither lose nor reorder a line.
- Edits are find/replace pairs, not rewritten threads: cheaper in output tokens, minimal by construction,
  and checkable (the find text must occur exactly once; a thread may change by at most `max_edit_change`,
  measured with difflib's similarity ratio).
- Thread independence (step 5) is checked three ways: no words that point at a sibling (regexes such as
  "thread 2", "the other branch"); no two identical threads; no leaked names: a thread may not use a name
  that only a sibling assigns (`X = ...` at the start of a line) unless the name was assigned before the
  block. These are heuristics that favour precision: a good sample may be dropped, a leaking one rarely
  passes.
- Engineering: a response cache on disk (JSONL, keyed by a hash of the whole request body: model, messages,
  sampling fields), so re-running sends no request twice; resume (samples already in accepted.jsonl or
  rejected.jsonl are skipped; transport failures go to errors.jsonl and are retried by the next run);
  bounded concurrency (a thread pool; one sample's five steps run in order on one worker); usage and
  cost accounting (the reply's `usage` fields, prices per 1M tokens in `ChatConfig`); a summary.json.
- HTTP reuses `twlib.engines.request_json` (timeouts, retries with back-off on 429/5xx/connection errors,
  named `EngineError`s).
- `trajectory_stats` is the paper's Table 8 for any list of texts: parallel ratio, mean longest (critical
  path) and total tokens, self-parallelism, blocks per sample, tokens and threads per block.

Deviations from the paper
- Our own prompts and reply formats; the paper's prompts are not used.
- Threads must be adjacent line ranges of the original trace (the paper's model may regroup steps freely).
- The thread-dominance threshold (0.75 by default) is ours; the paper gives none.
- Only the reasoning inside `<think>...</think>` is rewritten; the answer after `</think>` is kept verbatim.
- Self-training decodes greedily by default (`temperature` is a knob); the paper does not say.
- In `run_arc` the rewritten traces are stood in for by the task generator's parallel trajectories (the
  tiny task has no strong model to rewrite for it); stage 1 itself runs on groupsum traces in the tests
  and notebook 04 with a scripted model (`GroupSumRewriter`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import html
import json
import os
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from twlib.engines import BadResponse, EngineError, HTTPConfig, request_json
from twlib.format import TAGS, Block, FormatError, parse, path_stats
from twlib.rewards import is_correct
from twlib.tasks import Problem, extract_answer

__all__ = [
    "StepError", "Trace", "split_trace", "number_lines", "parse_json_reply",
    "MARK_SYSTEM", "EDIT_SYSTEM", "OUTLINE_SYSTEM", "mark_messages", "parse_marks",
    "DraftBlock", "Draft", "thread_shares", "extract_threads",
    "Edit", "edit_messages", "parse_edits", "apply_edits",
    "outline_messages", "parse_outlines", "with_outlines", "assemble",
    "FilterConfig", "sibling_references", "leaked_names", "format_filter",
    "ChatConfig", "ChatReply", "ChatClient", "FunctionChat", "ResponseCache",
    "RewriteConfig", "SampleResult", "rewrite_sample", "run_stage1", "read_jsonl", "load_accepted",
    "GroupSumRewriter",
    "trajectory_stats", "format_stats", "SelfTrainConfig", "SelfTrainResult", "keep_reason", "self_train",
    "ArcConfig", "run_arc", "trajectory_html",
]

STEPS = ("input", "mark", "extract", "edit", "outline", "filter")


class StepError(Exception):
    """A sample cannot go on: `step` (one of STEPS), a short `kind` for counting, a readable `reason`."""

    def __init__(self, step: str, kind: str, reason: str):
        super().__init__(f"{step}/{kind}: {reason}")
        self.step, self.kind, self.reason = step, kind, reason


def _snip(text: str, limit: int = 80) -> str:
    text = str(text)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


# ----------------------------------------------------------------------------------------------------
# The trace: reasoning lines between <think>\n and </think>


@dataclass(frozen=True)
class Trace:
    """A sequential response cut into `head` (up to `<think>\\n`), reasoning `lines` (each with its `\\n`,
    the last one maybe without) and `tail` (from `</think>` on: the answer, kept verbatim)."""

    head: str
    lines: tuple[str, ...]
    tail: str


def split_trace(text: str) -> Trace:
    start, end = text.find("<think>\n"), text.find("</think>")
    if start == -1 or end < start + len("<think>\n"):
        raise StepError("input", "no_think", "the trace has no '<think>\\n ... </think>' section")
    body = text[start + len("<think>\n"):end]
    if not body.strip():
        raise StepError("input", "empty", "the reasoning between <think> and </think> is empty")
    # split("\n") rather than splitlines(): only "\n" ends a line, as in the format.
    parts = body.split("\n")
    lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    return Trace(text[:start + len("<think>\n")], tuple(lines), text[end:])


def number_lines(lines: Sequence[str]) -> str:
    """`  1 | text` per line: what the strong model sees in step 1."""
    width = len(str(len(lines)))
    return "\n".join(f"{i:>{width}} | {line.rstrip(chr(10))}" for i, line in enumerate(lines, 1))


def parse_json_reply(text: Any, step: str) -> dict:
    """The JSON object of a reply. A ```json fence or prose around one object is tolerated."""
    if not isinstance(text, str) or not text.strip():
        raise StepError(step, "not_json", "the reply is empty")
    fenced = re.search(r"```(?:json)?\s*\n(.*?)```", text, re.DOTALL)
    candidate = fenced.group(1) if fenced else text
    start, end = candidate.find("{"), candidate.rfind("}")
    if start == -1 or end < start:
        raise StepError(step, "not_json", f"the reply holds no JSON object: {_snip(text)}")
    try:
        data = json.loads(candidate[start:end + 1])
    except json.JSONDecodeError as e:
        raise StepError(step, "not_json", f"the reply is not valid JSON ({e.msg} at char {e.pos}): {_snip(text)}")
    if not isinstance(data, dict):
        raise StepError(step, "not_json", f"the reply is JSON but not an object: {_snip(text)}")
    return data


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------------
# Step 1: mark blocks and threads (LLM)

MARK_SYSTEM = """\
You prepare training data for a model that can split its reasoning into parallel threads.
You get a solved problem whose reasoning is shown with line numbers. Find stretches of consecutive lines
that split into two or more parts that do not need each other: each part could be written by a separate
writer who sees everything before the stretch but none of the other parts. Text after the stretch may use
the results of every part.

Rules:
- A block is a range of consecutive lines. Its threads cut that range into adjacent ranges, in order:
  thread 1 starts on the block's first line, each next thread starts on the line after the previous one ends.
- A block has at least two threads. Blocks do not overlap. Lines outside every block stay as they are.
- Prefer threads of similar length. Work that must happen in order is not a block.
- Use only the line numbers shown.

Answer with one JSON object and nothing else:
{"blocks": [{"threads": [[first_line, last_line], [first_line, last_line]]}]}
Answer {"blocks": []} when nothing can run in parallel."""


def _messages(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def mark_messages(question: str, trace: Trace) -> list[dict]:
    user = (f"Problem:\n{question.strip()}\n\nReasoning ({len(trace.lines)} lines):\n"
            f"{number_lines(trace.lines)}")
    return _messages(MARK_SYSTEM, user)


def _mark_range(pair, n_lines: int, where: str) -> tuple[int, int]:
    if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(x) for x in pair)):
        raise StepError("mark", "bad_shape", f"{where}: expected [first_line, last_line], got {_snip(json.dumps(pair))}")
    first, last = pair
    for x in (first, last):
        if not 1 <= x <= n_lines:
            raise StepError("mark", "line_range", f"{where}: line {x} is not among the lines 1..{n_lines}")
    if first > last:
        raise StepError("mark", "line_range", f"{where}: first line {first} comes after last line {last}")
    return first, last


def parse_marks(reply: str, n_lines: int) -> list[list[tuple[int, int]]]:
    """Step 1's answer as blocks of (first, last) line ranges, 1-based and inclusive; StepError if it breaks
    a rule (shape, line numbers, adjacency, one thread, overlap). An empty list is a valid answer."""
    data = parse_json_reply(reply, "mark")
    blocks = data.get("blocks")
    if not isinstance(blocks, list):
        raise StepError("mark", "bad_shape", f"expected {{'blocks': [...]}}, got keys {sorted(data)}")
    out, previous_end = [], 0
    for b, block in enumerate(blocks, 1):
        threads = block.get("threads") if isinstance(block, dict) else None
        if not isinstance(threads, list):
            raise StepError("mark", "bad_shape", f"block {b}: expected {{'threads': [[first, last], ...]}}")
        if len(threads) < 2:
            raise StepError("mark", "one_thread", f"block {b} has {len(threads)} thread(s): a block needs 2 or more")
        ranges = [_mark_range(t, n_lines, f"block {b}, thread {i}") for i, t in enumerate(threads, 1)]
        for i in range(1, len(ranges)):
            if ranges[i][0] != ranges[i - 1][1] + 1:
                raise StepError("mark", "not_adjacent", f"block {b}: thread {i} ends on line {ranges[i - 1][1]}, "
                                f"thread {i + 1} starts on line {ranges[i][0]} (must be {ranges[i - 1][1] + 1})")
        if ranges[0][0] <= previous_end:
            raise StepError("mark", "overlap", f"block {b} starts on line {ranges[0][0]}, before the previous "
                            f"block ends (line {previous_end})")
        previous_end = ranges[-1][1]
        out.append(ranges)
    return out


# ----------------------------------------------------------------------------------------------------
# Step 2: extract the threads, dropping dominated blocks (deterministic)


@dataclass(frozen=True)
class DraftBlock:
    threads: tuple[str, ...]
    lines: tuple[int, int]  # first and last line of the original trace (1-based, inclusive)
    outlines: tuple[str, ...] = ()


@dataclass(frozen=True)
class Draft:
    """The trajectory being built: shared text (str) and blocks, in order."""

    segments: tuple[Union[str, DraftBlock], ...]

    @property
    def blocks(self) -> list[DraftBlock]:
        return [s for s in self.segments if isinstance(s, DraftBlock)]

    def replace_blocks(self, blocks: Sequence[DraftBlock]) -> "Draft":
        new = iter(blocks)
        return Draft(tuple(next(new) if isinstance(s, DraftBlock) else s for s in self.segments))


def count_units(text: str) -> int:
    """Default token count: every tag one token, every other character one (the lab tokenizer's count)."""
    return path_stats(text).total


def thread_shares(counts: Sequence[int]) -> list[float]:
    """Each thread's fraction of its block's tokens (all zero for an empty block)."""
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def _thread_text(lines: Sequence[str]) -> str:
    text = "".join(lines)
    return text[:-1] if text.endswith("\n") else text  # the format writes the "\n" before </Thread> itself


def _merge_text(segments) -> tuple:
    """Adjacent texts joined (a dropped block's lines join their neighbours), empty ones removed."""
    out: list = []
    for seg in segments:
        if isinstance(seg, str) and out and isinstance(out[-1], str):
            out[-1] += seg
        elif not (isinstance(seg, str) and not seg):
            out.append(seg)
    return tuple(out)


def extract_threads(trace: Trace, marks: Sequence[Sequence[tuple[int, int]]], max_share: float = 0.75,
                    count: Callable[[str], int] | None = None) -> tuple[Draft, list[str]]:
    """Cut the marked threads out of the trace. Returns the draft and a note per dropped block.

    A block whose largest thread holds more than `max_share` of the block's tokens is dropped: its lines
    stay sequential text. StepError when a thread is empty or no block is left.
    """
    count = count or count_units
    segments: list[Union[str, DraftBlock]] = []
    notes, position = [], 1
    for b, ranges in enumerate(marks, 1):
        first, last = ranges[0][0], ranges[-1][1]
        segments.append("".join(trace.lines[position - 1:first - 1]))
        threads = tuple(_thread_text(trace.lines[a - 1:z]) for a, z in ranges)
        for i, t in enumerate(threads, 1):
            if not t.strip():
                raise StepError("extract", "empty_thread", f"block {b}, thread {i} (lines {ranges[i - 1][0]}-"
                                f"{ranges[i - 1][1]}) holds no text")
        shares = thread_shares([count(t) for t in threads])
        top = max(range(len(shares)), key=shares.__getitem__)
        if shares[top] > max_share:
            notes.append(f"block {b} (lines {first}-{last}) dropped: thread {top + 1} holds {shares[top]:.0%} of "
                         f"its tokens (limit {max_share:.0%})")
            segments.append("".join(trace.lines[first - 1:last]))
        else:
            segments.append(DraftBlock(threads, (first, last)))
        position = last + 1
    segments.append("".join(trace.lines[position - 1:]))
    draft = Draft(_merge_text(segments))
    if not draft.blocks:
        why = "; ".join(notes) if notes else "the model marked no block"
        raise StepError("extract", "no_block", f"no parallel block left: {why}")
    return draft, notes


# ----------------------------------------------------------------------------------------------------
# Step 3: minimal edits that remove references to sibling threads (LLM)

EDIT_SYSTEM = """\
You make parallel threads self-contained with the smallest possible edits.
Each thread below will be written on its own: its writer sees the problem and the shared text before the
block, never the other threads of the same block. Look for words in a thread that point at a sibling
thread or use something that only a sibling states (for example "as in the first case", "the other half",
a value that another thread computes), and replace them with text that stands on its own.
Change nothing else: keep every calculation and every result.

Answer with one JSON object and nothing else:
{"edits": [{"block": 1, "thread": 2, "find": "exact text that occurs once in that thread", "replace": "new text"}]}
Answer {"edits": []} when every thread already stands on its own."""


def render_draft(draft: Draft) -> str:
    """The draft as the edit and outline steps show it: shared text and headed threads."""
    parts, b = [], 0
    for seg in draft.segments:
        if isinstance(seg, str):
            parts.append(f"--- shared text ---\n{seg.rstrip(chr(10))}")
            continue
        b += 1
        for i, t in enumerate(seg.threads, 1):
            parts.append(f"### Block {b} / Thread {i}\n{t}")
    return "\n".join(parts)


def edit_messages(question: str, draft: Draft) -> list[dict]:
    user = f"Problem:\n{question.strip()}\n\nReasoning with its parallel blocks:\n{render_draft(draft)}"
    return _messages(EDIT_SYSTEM, user)


@dataclass(frozen=True)
class Edit:
    block: int  # 1-based
    thread: int  # 1-based
    find: str
    replace: str


def parse_edits(reply: str, draft: Draft) -> list[Edit]:
    data = parse_json_reply(reply, "edit")
    edits = data.get("edits")
    if not isinstance(edits, list):
        raise StepError("edit", "bad_shape", f"expected {{'edits': [...]}}, got keys {sorted(data)}")
    blocks, out = draft.blocks, []
    for n, e in enumerate(edits, 1):
        if not (isinstance(e, dict) and _is_int(e.get("block")) and _is_int(e.get("thread"))
                and isinstance(e.get("find"), str) and isinstance(e.get("replace"), str)):
            raise StepError("edit", "bad_shape", f"edit {n}: expected block, thread (integers), find, replace "
                            f"(strings), got {_snip(json.dumps(e))}")
        if not 1 <= e["block"] <= len(blocks) or not 1 <= e["thread"] <= len(blocks[e["block"] - 1].threads):
            raise StepError("edit", "bad_target", f"edit {n}: there is no block {e['block']}, thread {e['thread']}")
        if not e["find"]:
            raise StepError("edit", "bad_shape", f"edit {n}: empty 'find'")
        out.append(Edit(e["block"], e["thread"], e["find"], e["replace"]))
    return out


def apply_edits(draft: Draft, edits: Sequence[Edit], max_change: float = 0.3) -> Draft:
    """Apply find/replace edits; each find must occur exactly once in its thread, and no thread may change
    by more than `max_change` (1 - difflib similarity ratio): edits are minimal or the sample goes."""
    blocks = [list(b.threads) for b in draft.blocks]
    for e in edits:
        text = blocks[e.block - 1][e.thread - 1]
        found = text.count(e.find)
        if found != 1:
            raise StepError("edit", "not_found", f"block {e.block}, thread {e.thread}: {_snip(e.find, 40)} occurs "
                            f"{found} times (must occur exactly once)")
        blocks[e.block - 1][e.thread - 1] = text.replace(e.find, e.replace)
    for b, (old, new) in enumerate(zip(draft.blocks, blocks), 1):
        for i, (before, after) in enumerate(zip(old.threads, new), 1):
            if not after.strip():
                raise StepError("edit", "emptied", f"block {b}, thread {i}: the edits leave it empty")
            similarity = difflib.SequenceMatcher(None, before, after, autojunk=False).ratio()
            if similarity < 1 - max_change:
                raise StepError("edit", "too_much", f"block {b}, thread {i}: rewritten, not minimally edited "
                                f"(similarity {similarity:.2f} < {1 - max_change:.2f})")
    return draft.replace_blocks([dataclasses.replace(b, threads=tuple(t)) for b, t in zip(draft.blocks, blocks)])


# ----------------------------------------------------------------------------------------------------
# Step 4: one outline per thread (LLM)

OUTLINE_SYSTEM = """\
You write the plan line of each parallel thread.
Before a block's threads run, the model writes one outline per thread; each thread's writer then sees all
outlines and must do exactly the work its own outline names. For every thread below write one short line
that says what the thread does, specific enough to keep the threads apart, without stating its results.

Answer with one JSON object and nothing else, one list of outlines per block, in thread order:
{"blocks": [{"outlines": ["outline of thread 1", "outline of thread 2"]}]}"""


def outline_messages(question: str, draft: Draft, max_chars: int = 120) -> list[dict]:
    user = (f"Problem:\n{question.strip()}\n\nReasoning with its parallel blocks:\n{render_draft(draft)}\n\n"
            f"Each outline: one line, at most {max_chars} characters.")
    return _messages(OUTLINE_SYSTEM, user)


def parse_outlines(reply: str, draft: Draft, max_chars: int = 120) -> list[list[str]]:
    data = parse_json_reply(reply, "outline")
    blocks = data.get("blocks")
    if not isinstance(blocks, list) or not all(isinstance(b, dict) and isinstance(b.get("outlines"), list)
                                               for b in blocks):
        raise StepError("outline", "bad_shape", "expected {'blocks': [{'outlines': [...]}, ...]}")
    if len(blocks) != len(draft.blocks):
        raise StepError("outline", "count", f"{len(blocks)} outline lists for {len(draft.blocks)} blocks")
    out = []
    for b, (given, block) in enumerate(zip(blocks, draft.blocks), 1):
        outlines = given["outlines"]
        if len(outlines) != len(block.threads):
            raise StepError("outline", "count", f"block {b}: {len(outlines)} outlines for {len(block.threads)} threads")
        for i, o in enumerate(outlines, 1):
            where = f"block {b}, outline {i}"
            if not isinstance(o, str) or not o.strip():
                raise StepError("outline", "bad_outline", f"{where}: empty or not a string")
            if "\n" in o.strip() or len(o.strip()) > max_chars:
                raise StepError("outline", "bad_outline", f"{where}: must be one line of at most {max_chars} "
                                f"characters, got {_snip(o)}")
            if any(tag in o for tag in TAGS):
                raise StepError("outline", "bad_outline", f"{where}: contains a format tag: {_snip(o)}")
        out.append([o.strip() for o in outlines])
    return out


def with_outlines(draft: Draft, outlines: Sequence[Sequence[str]]) -> Draft:
    return draft.replace_blocks([dataclasses.replace(b, outlines=tuple(o)) for b, o in zip(draft.blocks, outlines)])


# ----------------------------------------------------------------------------------------------------
# Step 5: assemble and filter (deterministic)


def _gap(text: str, gap: str) -> str:
    return text if not gap or text[:1].isspace() else gap + text


def assemble(trace: Trace, draft: Draft, gap: str = "") -> str:
    """The parallel trajectory: head, shared text and canonical blocks (each followed by the `\\n` that ends
    the block's last line), then the trace's tail verbatim. `gap` goes between `n:` and an outline or thread
    ("" for groupsum's `1:A`, " " for prose's `1: plan`)."""
    parts = [trace.head]
    for seg in draft.segments:
        if isinstance(seg, str):
            parts.append(seg)
            continue
        outlines = [_gap(o, gap) for o in seg.outlines]
        threads = [_gap(t, gap) for t in seg.threads]
        parts.append(Block(tuple(outlines), tuple(threads), "\n").render() + "\n")
    parts.append(trace.tail)
    return "".join(parts)


SIBLING_PATTERNS = (
    r"\bthreads?\s*#?\s*\d+",
    r"\b(?:other|another|previous|next|sibling|first|second|third|parallel|earlier|later)\s+(?:thread|branch)(?:es|s)?\b",
    r"\b(?:the\s+)?other\s+(?:half|halves|part|parts|case|cases|group|groups)\b",
)


@dataclass(frozen=True)
class FilterConfig:
    """Step 5's checks. `sibling_patterns` are case-insensitive regexes that no thread may match."""

    require_parallel: bool = True
    min_threads: int = 2
    sibling_patterns: tuple[str, ...] = SIBLING_PATTERNS
    check_leaks: bool = True


_ASSIGNED = re.compile(r"(?m)^[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*=(?!=)")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def sibling_references(thread: str, patterns: Sequence[str] = SIBLING_PATTERNS) -> list[str]:
    """Text in a thread that points at a sibling thread."""
    return [m.group(0) for p in patterns for m in re.finditer(p, thread, re.IGNORECASE)]


def leaked_names(before: str, threads: Sequence[str]) -> list[tuple[int, str, int]]:
    """(thread j, name, thread i): thread j uses `name`, which only sibling i assigns (`name = ...` at the
    start of a line) and which was not assigned before the block nor in thread j itself. 1-based."""
    visible = set(_ASSIGNED.findall(before))
    assigned = [set(_ASSIGNED.findall(t)) - visible for t in threads]
    leaks = []
    for j, t in enumerate(threads):
        used = set(_WORD.findall(t)) - assigned[j]
        for i, names in enumerate(assigned):
            if i != j:
                leaks += [(j + 1, name, i + 1) for name in sorted(used & names)]
    return leaks


def _independence(before: str, block: Block, b: int, config: FilterConfig) -> list[str]:
    reasons = []
    for i, t in enumerate(block.threads, 1):
        found = sibling_references(t, config.sibling_patterns)
        if found:
            reasons.append(f"independence: block {b}, thread {i} points at a sibling ({_snip(found[0], 30)})")
    bodies = [t.strip() for t in block.threads]
    for i in range(len(bodies)):
        for j in range(i + 1, len(bodies)):
            if bodies[i] == bodies[j]:
                reasons.append(f"independence: block {b}, threads {i + 1} and {j + 1} are identical")
    if config.check_leaks:
        for j, name, i in leaked_names(before, block.threads):
            reasons.append(f"independence: block {b}, thread {j} uses {name!r}, which only thread {i} assigns")
    return reasons


def format_filter(candidate: str, original: str, answer: str | None = None, task: str | None = None,
                  config: FilterConfig = FilterConfig(), prompt: str = "") -> list[str]:
    """Step 5's verdict on a candidate trajectory: the reasons to reject it (empty: accepted).

    Checks: it parses (`twlib.format.parse`); it has a block (if required) and every block has at least
    `min_threads` threads; its answer equals the original trace's (and the ground truth, if given); its
    threads are independent (see `sibling_references` and `leaked_names`; `prompt` counts as visible text).
    """
    try:
        trajectory = parse(candidate)
    except FormatError as e:
        return [f"format: {e}"]
    reasons = []
    if config.require_parallel and not trajectory.blocks:
        reasons.append("format: no <Parallel> block")
    got, want = extract_answer(candidate), extract_answer(original)
    if got != want:
        reasons.append(f"answer: changed from {want!r} to {got!r}")
    elif answer is not None and not is_correct(candidate, answer, task):
        reasons.append(f"answer: {got!r} does not match the ground truth {answer!r}")
    before, b = prompt, 0
    for seg in trajectory.segments:
        if isinstance(seg, str):
            before += seg
            continue
        b += 1
        if len(seg.threads) < config.min_threads:
            reasons.append(f"format: block {b} has {len(seg.threads)} thread(s), fewer than {config.min_threads}")
        reasons += _independence(before, seg, b, config)
        before += seg.render()
    return reasons


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
        raise BadResponse(f"{where}: no 'choices' in the reply: {_snip(json.dumps(data), 200)}")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = [usage.get(k) if _is_int(usage.get(k)) else 0 for k in ("prompt_tokens", "completion_tokens")]
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


# ----------------------------------------------------------------------------------------------------
# Stage 1: one sample, then many


@dataclass
class RewriteConfig:
    """Stage 1. Output files in `out_dir`: accepted.jsonl (Problems with the new `.parallel`),
    rejected.jsonl (id, step, kind, reason), errors.jsonl (transport failures: retried next run),
    cache.jsonl (or `cache_path`), summary.json."""

    out_dir: str = "runs/rewrite"
    concurrency: int = 4
    max_thread_share: float = 0.75
    max_edit_change: float = 0.3
    max_outline_chars: int = 120
    gap: str = ""  # between `n:` and an outline/thread: "" for groupsum, " " for prose
    check_input: bool = True  # reject traces that are already parallel or whose answer is wrong
    use_cache: bool = True
    cache_path: str | None = None
    filter: FilterConfig = field(default_factory=FilterConfig)
    count_tokens: Callable[[str], int] | None = field(default=None, repr=False)  # None: count_units


@dataclass
class SampleResult:
    id: str
    status: str  # "accepted" | "rejected" | "error"
    step: str = ""
    kind: str = ""
    reason: str = ""
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)
    requests: int = 0  # chat requests sent (cache misses)
    cache_hits: int = 0
    prompt_tokens: int = 0  # of the requests sent
    completion_tokens: int = 0
    seconds: float = 0.0

    def record(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "problem"}
        if self.problem is not None:
            out["problem"] = asdict(self.problem)
        return out


class _Asker:
    """One sample's access to the strong model: cache first, then the client; counts what it spends."""

    def __init__(self, client, cache: ResponseCache | None, result: SampleResult):
        self.client, self.cache, self.result = client, cache, result

    def __call__(self, messages: list[dict]) -> str:
        key = ResponseCache.key(self.client.body(messages)) if self.cache is not None else None
        reply = self.cache.get(key) if key is not None else None
        if reply is not None:
            self.result.cache_hits += 1
            return reply.content
        self.result.requests += 1
        reply = self.client.chat(messages)
        self.result.prompt_tokens += reply.prompt_tokens
        self.result.completion_tokens += reply.completion_tokens
        if key is not None:
            self.cache.put(key, self.client.model, reply)
        return reply.content


def _check_input(problem: Problem, trace: Trace) -> None:
    text = problem.sequential
    try:
        if parse(text).blocks:
            raise StepError("input", "already_parallel", "the trace already has a <Parallel> block")
    except FormatError as e:
        raise StepError("input", "format", f"the trace does not parse: {e}")
    if not is_correct(text, problem.answer, problem.task):
        raise StepError("input", "wrong_answer", f"the trace's answer {extract_answer(text)!r} is not "
                        f"{problem.answer!r} (only correct traces are rewritten)")


def _rewrite(problem: Problem, ask: Callable[[list[dict]], str], config: RewriteConfig, result: SampleResult) -> str:
    trace = split_trace(problem.sequential)
    if config.check_input:
        _check_input(problem, trace)
    marks = parse_marks(ask(mark_messages(problem.question, trace)), len(trace.lines))
    draft, result.notes = extract_threads(trace, marks, config.max_thread_share, config.count_tokens)
    edits = parse_edits(ask(edit_messages(problem.question, draft)), draft)
    draft = apply_edits(draft, edits, config.max_edit_change)
    reply = ask(outline_messages(problem.question, draft, config.max_outline_chars))
    draft = with_outlines(draft, parse_outlines(reply, draft, config.max_outline_chars))
    candidate = assemble(trace, draft, config.gap)
    reasons = format_filter(candidate, problem.sequential, problem.answer, problem.task, config.filter, problem.prompt)
    if reasons:
        kinds = sorted({r.split(":", 1)[0] for r in reasons})
        raise StepError("filter", "+".join(kinds), "; ".join(reasons))
    return candidate


def rewrite_sample(problem: Problem, client, config: RewriteConfig = RewriteConfig(),
                   cache: ResponseCache | None = None) -> SampleResult:
    """The five steps on one sample. Never raises: a StepError is a rejection (step, kind, reason); a
    transport failure (EngineError) or an unexpected exception is an error, retried by the next run."""
    result = SampleResult(problem.id, "error")
    ask = _Asker(client, cache, result)
    began = time.perf_counter()
    try:
        candidate = _rewrite(problem, ask, config, result)
        meta = {**problem.meta, "datagen": {"model": client.model, "dropped_blocks": result.notes}}
        result.status, result.problem = "accepted", dataclasses.replace(problem, parallel=candidate, meta=meta)
    except StepError as e:
        result.status, result.step, result.kind, result.reason = "rejected", e.step, e.kind, e.reason
    except EngineError as e:
        result.step, result.kind, result.reason = _current_step(result), "http", f"{type(e).__name__}: {e}"
    except Exception as e:  # a bug must not end the run; it is reported and the sample retried next time
        result.step, result.kind, result.reason = _current_step(result), "exception", f"{type(e).__name__}: {e}"
    result.seconds = time.perf_counter() - began
    return result


def _current_step(result: SampleResult) -> str:
    """The LLM step a transport failure happened in: the (n+1)-th request of a sample is step n+1."""
    asked = result.requests + result.cache_hits
    return ("mark", "edit", "outline")[min(max(asked - 1, 0), 2)]


def _finished_ids(out: Path) -> set[str]:
    return {r["id"] for name in ("accepted.jsonl", "rejected.jsonl") for r in read_jsonl(out / name) if "id" in r}


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _summary(results: Sequence[SampleResult], skipped: int, total: int, client, config_price, seconds: float,
             interrupted: bool, out: Path) -> dict:
    by_step: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for r in results:
        if r.status != "accepted":
            by_step[r.step] = by_step.get(r.step, 0) + 1
            by_kind[f"{r.status}:{r.step}/{r.kind}"] = by_kind.get(f"{r.status}:{r.step}/{r.kind}", 0) + 1
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    price_in, price_out = config_price
    accepted_all = len(read_jsonl(out / "accepted.jsonl"))
    rejected_all = len(read_jsonl(out / "rejected.jsonl"))
    return {
        "this_run": {
            "samples": total, "skipped_done": skipped, "processed": len(results),
            "accepted": sum(r.status == "accepted" for r in results),
            "rejected": sum(r.status == "rejected" for r in results),
            "errors": sum(r.status == "error" for r in results),
            "not_accepted_by_step": dict(sorted(by_step.items())), "reasons": dict(sorted(by_kind.items())),
            # requests = cache misses of this run; http_attempts = the client's attempts so far (retries included)
            "requests": sum(r.requests for r in results), "http_attempts": getattr(client, "attempts", None),
            "cache_hits": sum(r.cache_hits for r in results),
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "cost": prompt_tokens * price_in / 1e6 + completion_tokens * price_out / 1e6,
            "seconds": round(seconds, 3), "interrupted": interrupted,
        },
        "overall": {"accepted": accepted_all, "rejected": rejected_all,
                    "acceptance_rate": accepted_all / max(accepted_all + rejected_all, 1)},
    }


def run_stage1(problems: Sequence[Problem], client, config: RewriteConfig = RewriteConfig(),
               on_result: Callable[[SampleResult], None] | None = None, quiet: bool = True) -> dict:
    """Rewrite `problems` (their `.sequential` traces) with `client` (a ChatClient or FunctionChat).

    Resumable: samples already accepted or rejected in `out_dir` are skipped; with the cache on, no request
    is ever sent twice. `on_result` runs in the calling thread after each sample is written (raising from it
    stops the run there, as an interruption would). Returns the summary (also written to summary.json).
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("accepted.jsonl", "rejected.jsonl", "errors.jsonl"):
        end_with_newline(out / name)
    done = _finished_ids(out)
    unique = list({p.id: p for p in problems}.values())
    todo = [p for p in unique if p.id not in done]
    cache = ResponseCache(config.cache_path or out / "cache.jsonl") if config.use_cache else None
    price = (getattr(getattr(client, "config", None), "price_input_per_1m", 0.0),
             getattr(getattr(client, "config", None), "price_output_per_1m", 0.0))
    results: list[SampleResult] = []
    began, interrupted = time.perf_counter(), True
    pool = ThreadPoolExecutor(max(1, config.concurrency), thread_name_prefix="twlab-datagen")
    try:
        futures = [pool.submit(rewrite_sample, p, client, config, cache) for p in todo]
        for future in as_completed(futures):
            result = future.result()
            name = {"accepted": "accepted.jsonl", "rejected": "rejected.jsonl"}.get(result.status, "errors.jsonl")
            _append(out / name, result.record())
            results.append(result)
            if not quiet:
                print(f"[{len(results)}/{len(todo)}] {result.id}: {result.status} {result.step} {result.reason}"[:160],
                      flush=True)
            if on_result is not None:
                on_result(result)
        interrupted = False
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # samples in flight finish; their replies are cached
        summary = _summary(results, len(unique) - len(todo), len(unique), client, price,
                           time.perf_counter() - began, interrupted, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def load_accepted(out_dir) -> list[Problem]:
    """The accepted samples of a stage-1 run, as Problems (`.parallel` = the rewritten trajectory)."""
    return [Problem(**r["problem"]) for r in read_jsonl(Path(out_dir) / "accepted.jsonl") if "problem" in r]


# ----------------------------------------------------------------------------------------------------
# A scripted strong model for the groupsum task (tests, notebook 04, offline demos)


_NUMBERED = re.compile(r"(?m)^\s*(\d+) \| (.*)$")
_THREAD_HEADER = re.compile(r"(?m)^### Block (\d+) / Thread (\d+)\n")


def draft_threads(user: str) -> dict[int, list[str]]:
    """The threads of a rendered draft (`render_draft`), by block number."""
    heads = list(_THREAD_HEADER.finditer(user))
    blocks: dict[int, list[str]] = {}
    for h, nxt in zip(heads, heads[1:] + [None]):
        end = nxt.start() if nxt else len(user)
        body = user[h.end():end]
        cut = re.search(r"(?m)^--- shared text ---$|\n\nEach outline:", body)
        blocks.setdefault(int(h.group(1)), []).append((body[:cut.start()] if cut else body).rstrip("\n"))
    return blocks


class GroupSumRewriter:
    """Answers the three LLM steps correctly for groupsum traces, by reading the prompt: one thread per
    group (a group runs from its `X:` line to its `X=d` line), no edits, the group names as outlines
    (`A`, as the task's own parallel form). The result equals the task's parallel trajectory."""

    def __call__(self, messages: list[dict]) -> str:
        system, user = messages[0]["content"], messages[-1]["content"]
        if system == MARK_SYSTEM:
            return json.dumps(self.marks(user))
        if system == EDIT_SYSTEM:
            return json.dumps({"edits": []})
        if system == OUTLINE_SYSTEM:
            return json.dumps({"blocks": [{"outlines": ["".join(re.findall(r"(?m)^([A-Z]):", t)) for t in threads]}
                                          for _, threads in sorted(draft_threads(user).items())]})
        return "I do not know this step."

    @staticmethod
    def marks(user: str) -> dict:
        starts, ranges = None, []
        for number, text in _NUMBERED.findall(user):
            if re.match(r"[A-Z]:", text):
                starts = int(number)
            elif re.match(r"[A-Z]=\d", text) and starts is not None:
                ranges.append([starts, int(number)])
                starts = None
        return {"blocks": [{"threads": ranges}] if len(ranges) >= 2 else []}


# ----------------------------------------------------------------------------------------------------
# Table 8: statistics of a set of trajectories


def trajectory_stats(texts: Sequence[str], tokenizer=None) -> dict:
    """The paper's Table 8 for any list of response texts (response tokens only; without a tokenizer every
    tag is one token and every other character one).

    parallel_ratio    fraction with at least one block
    mean_longest      mean critical path L;  mean_total: mean of all tokens T
    self_parallelism  mean over trajectories of T/L  (self_parallelism_of_means: mean T / mean L)
    blocks_per_sample mean blocks per trajectory (all trajectories)
    tokens_per_block  mean tokens of a block, `<Parallel>` to `</Parallel>`; threads_per_block
    Texts that fail `parse` count in `invalid`; they enter the path statistics (path_stats is tolerant)
    but not the per-block ones. Empty input gives n = 0 and None elsewhere.
    """
    def count(text):
        return path_stats(text).total if tokenizer is None else len(tokenizer.encode(text, add_special_tokens=False))

    def mean(values):
        return statistics.fmean(values) if values else None

    paths, block_tokens, block_threads, invalid = [], [], [], 0
    for text in texts:
        paths.append(path_stats(text, tokenizer))  # tolerant: also measures malformed texts
        try:
            blocks = parse(text).blocks
        except FormatError:
            invalid += 1  # no per-block statistics for these
            continue
        block_tokens += [count(b.render()) for b in blocks]
        block_threads += [len(b.threads) for b in blocks]
    mean_total, mean_longest = mean([p.total for p in paths]), mean([p.longest for p in paths])
    return {
        "n": len(paths),
        "invalid": invalid,
        "parallel_ratio": mean([float(p.blocks > 0) for p in paths]),
        "mean_longest": mean_longest,
        "mean_total": mean_total,
        "self_parallelism": mean([p.speedup for p in paths]),
        "self_parallelism_of_means": mean_total / mean_longest if mean_longest else None,
        "blocks_per_sample": mean([float(p.blocks) for p in paths]),
        "tokens_per_block": mean(block_tokens),
        "threads_per_block": mean(block_threads),
    }


def format_stats(columns: dict[str, dict]) -> str:
    """Table-8-style text table: one column per named `trajectory_stats` result."""
    rows = [("samples", "n", "{:.0f}"), ("parallel ratio", "parallel_ratio", "{:.1%}"),
            ("mean longest (L)", "mean_longest", "{:.1f}"), ("mean total (T)", "mean_total", "{:.1f}"),
            ("self-parallelism T/L", "self_parallelism", "{:.3f}"), ("blocks / sample", "blocks_per_sample", "{:.2f}"),
            ("tokens / block", "tokens_per_block", "{:.1f}"), ("threads / block", "threads_per_block", "{:.2f}")]
    names = list(columns)
    width = max(12, *(len(n) for n in names))
    lines = [f"{'':22s}" + "".join(f"{n:>{width + 2}s}" for n in names)]
    for label, key, fmt in rows:
        cells = [columns[n].get(key) for n in names]
        lines.append(f"{label:22s}" + "".join(f"{(fmt.format(c) if c is not None else '-'):>{width + 2}s}"
                                              for c in cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Stage 2: self-training


@dataclass(frozen=True)
class SelfTrainConfig:
    """How the SFT model decodes the prompt pool and what is kept.

    Greedy by default (temperature 0); with temperature > 0 and `samples_per_prompt` > 1 each prompt gets
    several sampled trajectories and at most `keep_per_prompt` distinct kept ones.
    """

    max_new_tokens: int = 512
    max_thread_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    samples_per_prompt: int = 1
    keep_per_prompt: int = 1
    batch_size: int = 16
    require_correct: bool = True
    require_parallel: bool = False
    progress: bool = False


@dataclass
class SelfTrainResult:
    problems: list[Problem]  # kept: `.parallel` is the decoded trajectory
    rows: list[dict]  # one per decoded trajectory: id, kept, reason, valid, correct, parallel, total, longest
    counts: dict
    stats: dict  # trajectory_stats of the kept trajectories
    decoded_stats: dict  # ... of every decoded trajectory
    seconds: float


def keep_reason(problem: Problem, result, config: SelfTrainConfig = SelfTrainConfig()) -> str | None:
    """Why a decoded trajectory (a DecodeResult) is not kept, or None: format first (it must parse, end
    with EOS and carry no decoder flag), then the answer (the problem's grader, `twlib.rewards.is_correct`:
    math-verify for `task: math` prompt pools), then (optionally) parallelism."""
    if not result.valid:
        return "format: does not parse"
    if result.flags or not result.finished:
        return "format: " + (", ".join(result.flags) or "did not end with EOS")
    if config.require_correct and not is_correct(result.text, problem.answer, problem.task):
        return "answer: wrong"
    if config.require_parallel and result.stats.blocks == 0:
        return "sequential: no block"
    return None


def self_train(model, tokenizer, problems: Sequence[Problem], config: SelfTrainConfig = SelfTrainConfig(),
               engine=None) -> SelfTrainResult:
    """Decode `problems` with the parallel state machine; keep format-valid (and answer-correct) trajectories.

    `engine` defaults to an `HFEngine` over `model`; any `twlib.decoding.Engine` works (a server, a script).
    """
    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, SamplingParams

    began = time.perf_counter()
    engine = engine if engine is not None else HFEngine(model, tokenizer)
    sampling = SamplingParams(config.temperature, config.top_p, config.seed)
    decoder = ParallelDecoder(engine, tokenizer, DecodeConfig(max_new_tokens=config.max_new_tokens,
                                                              max_thread_tokens=config.max_thread_tokens,
                                                              sampling=sampling))
    k = config.samples_per_prompt
    jobs = [p for p in problems for _ in range(k)]
    bar = None
    if config.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc="self-train decode")
    results = decoder.decode([tokenizer.encode(p.prompt, add_special_tokens=False) for p in jobs],
                             batch_size=config.batch_size, progress=bar.update if bar else None)
    if bar:
        bar.close()
    kept, rows, kept_texts = [], [], {}
    for p, r in zip(jobs, results):
        reason = keep_reason(p, r, config)
        texts = kept_texts.setdefault(p.id, [])
        if reason is None and (r.text in texts or len(texts) >= config.keep_per_prompt):
            reason = "duplicate" if r.text in texts else "enough kept for this prompt"
        if reason is None:
            texts.append(r.text)
            meta = {**p.meta, "source": "self-train", "sample": len(texts) - 1}
            kept.append(dataclasses.replace(p, parallel=r.text, meta=meta))
        rows.append({"id": p.id, "kept": reason is None, "reason": reason or "", "valid": r.valid,
                     "correct": is_correct(r.text, p.answer, p.task), "parallel": r.stats.blocks > 0,
                     "total": r.stats.total, "longest": r.stats.longest, "text": r.text})
    n = max(len(rows), 1)
    counts = {"prompts": len(problems), "decoded": len(rows), "kept": len(kept),
              "format_valid": sum(r["valid"] for r in rows) / n, "accuracy": sum(r["correct"] for r in rows) / n,
              "parallel_rate": sum(r["parallel"] for r in rows) / n, "yield": len(kept) / n}
    return SelfTrainResult(kept, rows, counts, trajectory_stats([p.parallel for p in kept], tokenizer),
                           trajectory_stats([r["text"] for r in rows], tokenizer), time.perf_counter() - began)


# ----------------------------------------------------------------------------------------------------
# The paper's arc on the tiny task: SFT on a seed set, self-training, SFT on the kept trajectories

PAPER_FORMAT = {"sft1": 56.4, "sft2": 77.0}  # format correctness (%), spec section 7


@dataclass
class ArcConfig:
    """The arc's sizes and steps. Defaults are the full-size run (32 min on 2 CPU cores; assets/arc/); tests shrink them.

    model        the start model: a sequential base (the shipped `assets/checkpoints/tiny-base`), a preset name
                 (`tiny`: from scratch) or any parallel checkpoint
    n_seed       first SFT's data: the task generator's parallel trajectories, standing in for the ~1k
                 rewritten traces (paper: 959)
    n_pool       self-training prompts (paper: 53k) ; n_eval: held-out problems, scored after each SFT
    sft1, sft2   SFTConfig fields for the two SFTs (paper: 8 epochs on the seed set, then 1 epoch on the
                 kept trajectories, continuing from the first SFT's model); `mix_seed` adds the seed set
                 to the second SFT's data
    """

    out: str = "runs/arc"
    model: str = "assets/checkpoints/tiny-base"
    task: str = "groupsum"
    task_options: dict = field(default_factory=dict)
    data_seed: int = 0
    n_seed: int = 1000
    n_pool: int = 20000
    n_eval: int = 500
    sft1: dict = field(default_factory=lambda: {"epochs": 8, "lr": 1e-3, "tokens_per_batch": 1024,
                                                "rows_per_micro_batch": 2, "threads": 1, "checkpoint_every": 100})
    sft2: dict = field(default_factory=lambda: {"epochs": 1, "lr": 5e-4, "tokens_per_batch": 1024,
                                                "rows_per_micro_batch": 2, "threads": 1, "checkpoint_every": 100})
    self_train: SelfTrainConfig = field(default_factory=lambda: SelfTrainConfig(batch_size=32))
    mix_seed: bool = False
    eval_max_new_tokens: int = 512
    eval_batch: int = 32
    quiet: bool = False


def _say(config: ArcConfig, text: str) -> None:
    if not config.quiet:
        print(text, flush=True)


def _arc_data(config: ArcConfig, out: Path) -> dict[str, list[Problem]]:
    from twlib.sft import get_task_config
    from twlib.tasks import load_parquet, make_splits, save_parquet

    names = ("seed", "pool", "eval")
    paths = {n: out / "data" / f"{n}.parquet" for n in names}
    if all(p.is_file() for p in paths.values()):
        return {n: load_parquet(p) for n, p in paths.items()}
    task_config = get_task_config(config.task, config.task_options)
    train, evals = make_splits(config.task, config.n_seed + config.n_pool, config.n_eval, config.data_seed, task_config)
    sets = {"seed": train[:config.n_seed], "pool": train[config.n_seed:], "eval": evals}
    paths["seed"].parent.mkdir(parents=True, exist_ok=True)
    for n in names:
        save_parquet(sets[n], paths[n])
    return sets


def _arc_sft(config: ArcConfig, name: str, model: str, data: Path, overrides: dict) -> Path:
    from twlib.sft import SFTConfig, train

    out = Path(config.out) / name
    if (out / "final" / "config.json").is_file():
        _say(config, f"[{name}] done already ({out / 'final'})")
        return out / "final"
    fields_ = dict(model=model, data=str(data), n_train=None, mode="parallel", out_dir=str(out), resume=True,
                   progress=False if config.quiet else None)
    fields_.update(overrides)
    _say(config, f"[{name}] trie SFT from {model} on {data}")
    train(SFTConfig(**fields_), quiet=config.quiet, source=f"run_arc {name}")
    return out / "final"


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def _arc_eval(config: ArcConfig, name: str, checkpoint: Path, problems: Sequence[Problem]) -> dict:
    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder
    from twlib.eval import evaluate, summarize

    path = Path(config.out) / f"eval_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tok = _load(checkpoint)
    decoder = ParallelDecoder(HFEngine(model, tok), tok, DecodeConfig(max_new_tokens=config.eval_max_new_tokens))
    rows = evaluate(decoder, problems, tok, batch_size=config.eval_batch, progress=False)
    s = summarize(rows)
    result = {"format_correct": s["format_valid"], "accuracy": s["accuracy"], "parallel_rate": s["parallel_rate"],
              "mean_longest": s["mean_token_latency"], "mean_total": s["mean_total_tokens"], "problems": len(rows)}
    path.write_text(json.dumps(result, indent=1))
    _say(config, f"[eval {name}] format {100 * result['format_correct']:.1f}%, accuracy "
                 f"{100 * result['accuracy']:.1f}%, parallel {100 * result['parallel_rate']:.1f}%")
    return result


def _arc_self_train(config: ArcConfig, checkpoint: Path, pool: Sequence[Problem]) -> dict:
    from twlib.tasks import save_parquet

    out = Path(config.out) / "self_train"
    if (out / "summary.json").is_file() and (out / "kept.parquet").is_file():
        return json.loads((out / "summary.json").read_text())
    model, tok = _load(checkpoint)
    _say(config, f"[self-train] decoding {len(pool)} prompts x {config.self_train.samples_per_prompt}")
    result = self_train(model, tok, pool, config.self_train)
    out.mkdir(parents=True, exist_ok=True)
    save_parquet(result.problems, out / "kept.parquet")
    summary = {"counts": result.counts, "stats": result.stats, "decoded_stats": result.decoded_stats,
               "seconds": result.seconds}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _say(config, f"[self-train] kept {result.counts['kept']} of {result.counts['decoded']} "
                 f"(format {100 * result.counts['format_valid']:.1f}%, accuracy {100 * result.counts['accuracy']:.1f}%)")
    return summary


def run_arc(config: ArcConfig = ArcConfig()) -> dict:
    """First SFT on the seed set, self-training on the pool, second SFT on the kept trajectories; format
    correctness and accuracy on held-out problems after each SFT. Every stage is skipped when its output
    exists, so an interrupted arc continues (SFT resumes from its checkpoint). Writes `out/arc.json`."""
    from twlib.tasks import load_parquet, save_parquet

    out = Path(config.out)
    sets = _arc_data(config, out)
    seed_stats = trajectory_stats([p.parallel for p in sets["seed"]])
    sft1 = _arc_sft(config, "sft1", config.model, out / "data" / "seed.parquet", config.sft1)
    report = {"seed": {"problems": len(sets["seed"]), "stats": seed_stats},
              "sft1": _arc_eval(config, "sft1", sft1, sets["eval"])}
    report["self_train"] = _arc_self_train(config, sft1, sets["pool"])
    kept = load_parquet(out / "self_train" / "kept.parquet")
    data = out / "self_train" / "kept.parquet"
    if config.mix_seed:
        data = out / "self_train" / "kept_and_seed.parquet"
        save_parquet(kept + list(sets["seed"]), data)
    if kept:
        sft2 = _arc_sft(config, "sft2", str(sft1), data, config.sft2)
        report["sft2"] = _arc_eval(config, "sft2", sft2, sets["eval"])
    else:
        report["sft2"] = {"skipped": "self-training kept no trajectory"}
    report["keep"] = "format+correct" if config.self_train.require_correct else "format"
    report["config"] = {"model": config.model, "n_seed": config.n_seed, "n_pool": config.n_pool,
                        "n_eval": config.n_eval, "sft1_epochs": config.sft1.get("epochs"),
                        "sft2_epochs": config.sft2.get("epochs"), "mix_seed": config.mix_seed}
    report["paper_format_correct"] = PAPER_FORMAT
    (out / "arc.json").write_text(json.dumps(report, indent=1))
    _say(config, format_arc(report))
    return report


def format_arc(report: dict) -> str:
    lines = [f"{'stage':12s} {'format':>8s} {'accuracy':>9s} {'parallel':>9s} {'paper format':>13s}"]
    for stage in ("sft1", "sft2"):
        r = report.get(stage, {})
        if "format_correct" in r:
            lines.append(f"{stage:12s} {100 * r['format_correct']:7.1f}% {100 * r['accuracy']:8.1f}% "
                         f"{100 * r['parallel_rate']:8.1f}% {PAPER_FORMAT[stage]:12.1f}%")
        else:
            lines.append(f"{stage:12s} {r.get('skipped', 'not run')}")
    counts = report.get("self_train", {}).get("counts", {})
    if counts:
        lines.append(f"self-training kept {counts['kept']} of {counts['decoded']} decoded trajectories "
                     f"({report.get('keep', 'format+correct')}; decoded: format {100 * counts['format_valid']:.1f}%, "
                     f"accuracy {100 * counts['accuracy']:.1f}%, parallel {100 * counts['parallel_rate']:.1f}%)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# A trajectory viewer: threads side by side, one colour per thread

THREAD_COLOURS = ("#dbeafe", "#dcfce7", "#fef3c7", "#fce7f3", "#ede9fe", "#ffedd5", "#cffafe", "#f1f5f9")


def _pre(text: str, style: str = "") -> str:
    return (f"<pre style='margin:0;padding:4px 6px;white-space:pre-wrap;font-size:12px;{style}'>"
            f"{html.escape(text)}</pre>")


def trajectory_html(text: str, title: str = "") -> str:
    """HTML of a trajectory: shared text in grey, each block's threads side by side in columns, one colour
    per thread number, its outline on top. A text that does not parse is shown raw with the error."""
    head = f"<div style='font-weight:bold;margin:4px 0'>{html.escape(title)}</div>" if title else ""
    try:
        trajectory = parse(text)
    except FormatError as e:
        return (f"<div style='font-family:monospace'>{head}<div style='color:#b91c1c'>format error: "
                f"{html.escape(str(e))}</div>{_pre(text, 'background:#fee2e2')}</div>")
    parts = [head]
    for seg in trajectory.segments:
        if isinstance(seg, str):
            parts.append(_pre(seg, "color:#334155;background:#f8fafc"))
            continue
        columns = []
        for i, (outline, thread) in enumerate(zip(seg.outlines, seg.threads)):
            colour = THREAD_COLOURS[i % len(THREAD_COLOURS)]
            columns.append(f"<div style='flex:1;min-width:0;background:{colour};border-radius:4px'>"
                           f"<div style='font-size:11px;font-weight:bold;padding:2px 6px'>thread {i + 1}: "
                           f"{html.escape(outline.strip())}</div>{_pre(thread)}</div>")
        parts.append("<div style='display:flex;gap:6px;margin:4px 0;border-left:3px solid #64748b;padding-left:4px'>"
                     + "".join(columns) + "</div>")
    return "<div style='font-family:monospace'>" + "".join(parts) + "</div>"


# ----------------------------------------------------------------------------------------------------
# Command line


def _rewrite_command(args) -> int:
    from twlib.tasks import load_parquet

    problems = load_parquet(args.data)[: args.limit]
    chat = ChatConfig(base_url=args.url, model=args.model, api_key_env=args.api_key_env,
                      price_input_per_1m=args.price_in, price_output_per_1m=args.price_out,
                      temperature=None if args.temperature < 0 else args.temperature)
    config = RewriteConfig(out_dir=args.out, concurrency=args.concurrency, gap=args.gap)
    summary = run_stage1(problems, ChatClient(chat), config, quiet=False)
    print(json.dumps(summary, indent=1))
    return 0


def _arc_command(args) -> int:
    config = ArcConfig(out=args.out, model=args.model, n_seed=args.n_seed, n_pool=args.n_pool, n_eval=args.n_eval,
                       mix_seed=args.mix_seed)
    config.sft1["epochs"], config.sft2["epochs"] = args.sft1_epochs, args.sft2_epochs
    config.self_train = dataclasses.replace(config.self_train, temperature=args.temperature,
                                            samples_per_prompt=args.samples_per_prompt,
                                            require_correct=args.keep == "correct")
    run_arc(config)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twlib.datagen", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rewrite", help="stage 1: rewrite sequential traces with a strong model (chat endpoint)")
    p.add_argument("--url", required=True, help="base URL of an OpenAI-compatible server (…/v1/chat/completions)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="Parquet of Problems (twlib.tasks.save_parquet); .sequential is rewritten")
    p.add_argument("--out", default="runs/rewrite")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--api-key-env", default=None, help="name of the environment variable holding the API key")
    p.add_argument("--price-in", type=float, default=0.0, help="price per 1M prompt tokens")
    p.add_argument("--price-out", type=float, default=0.0, help="price per 1M completion tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="< 0: do not send one (model default)")
    p.add_argument("--gap", default="", help="text between 'n:' and outlines/threads (' ' for prose)")
    p.set_defaults(fn=_rewrite_command)
    p = sub.add_parser("arc", help="first SFT, self-training, second SFT on the tiny task (resumable)")
    p.add_argument("--out", default="runs/arc")
    p.add_argument("--model", default="assets/checkpoints/tiny-base", help="start model (a sequential base)")
    p.add_argument("--n-seed", type=int, default=1000)
    p.add_argument("--n-pool", type=int, default=20000)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--sft1-epochs", type=float, default=8)
    p.add_argument("--sft2-epochs", type=float, default=1)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--mix-seed", action="store_true", help="train the second SFT on kept + seed trajectories")
    p.add_argument("--keep", choices=["correct", "format"], default="correct",
                   help="self-training keeps format-valid AND correct trajectories (the paper), or format-valid "
                        "ones only (for a model that solves almost nothing)")
    p.set_defaults(fn=_arc_command)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
