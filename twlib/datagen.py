"""Data generation, the pure steps: rewriting a sequential trace into a parallel trajectory (stage 1), and the
paper's Table 8 statistics of a set of trajectories.

The paper (spec section 7) builds its training data in two stages. Stage 1, rewriting by a strong model,
five steps per correct sequential trace:
1. mark (LLM): the reasoning is shown with line numbers; the model answers a small JSON object naming
   blocks of consecutive lines and how each block splits into threads;
2. extract (deterministic): cut the threads out of the trace; a block where one thread holds more than
   `max_thread_share` of the block's tokens is dropped (its lines stay sequential), since it would save
   almost nothing on the critical path;
3. edit (LLM): minimal edits that make each thread self-contained, as find/replace pairs;
4. outline (LLM): one outline line per thread;
5. filter (deterministic): `twlib.format.parse`, the answer unchanged, and thread-independence checks.
Stage 2 (self-training) and the arc: `twlib.infra.arc`; stage 1's I/O: `twlib.infra.chat`, `.rewrite`.

Design choices
- Every LLM step is a pure prompt builder (`mark_messages`, ...) and a pure reply checker (`parse_marks`,
  `parse_edits`, `parse_outlines`); the deterministic steps (`extract_threads`, `apply_edits`, `assemble`,
  `format_filter`) are pure functions too. A failure is a `StepError(step, kind, reason)`; the runner
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
  block. Heuristics that favour precision: a good sample may be dropped, a leaking one rarely passes.
- `trajectory_stats`: the paper's Table 8 for any list of texts.

Deviations from the paper
- Our own prompts, reply formats and thread-dominance threshold (0.75); threads are adjacent line
  ranges of the original trace (the paper's model may regroup steps freely).
- Only the reasoning inside `<think>...</think>` is rewritten; the answer after `</think>` is kept verbatim.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

from twlib.format import TAGS, Block, FormatError, parse, path_stats
from twlib.rewards import is_correct
from twlib.tasks import extract_answer

__all__ = [
    "StepError", "Trace", "split_trace", "number_lines", "parse_json_reply",
    "MARK_SYSTEM", "EDIT_SYSTEM", "OUTLINE_SYSTEM", "mark_messages", "parse_marks",
    "DraftBlock", "Draft", "thread_shares", "extract_threads",
    "Edit", "edit_messages", "parse_edits", "apply_edits",
    "outline_messages", "parse_outlines", "with_outlines", "assemble",
    "FilterConfig", "sibling_references", "leaked_names", "format_filter",
    "trajectory_stats", "format_stats",
]

STEPS = ("input", "mark", "extract", "edit", "outline", "filter")


class StepError(Exception):
    """A sample cannot go on: `step` (one of STEPS), a short `kind` for counting, a readable `reason`."""

    def __init__(self, step: str, kind: str, reason: str):
        super().__init__(f"{step}/{kind}: {reason}")
        self.step, self.kind, self.reason = step, kind, reason


def snip(text: str, limit: int = 80) -> str:
    """`text` on one line, cut to `limit` characters (for error messages)."""
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
        raise StepError(step, "not_json", f"the reply holds no JSON object: {snip(text)}")
    try:
        data = json.loads(candidate[start:end + 1])
    except json.JSONDecodeError as e:
        raise StepError(step, "not_json", f"the reply is not valid JSON ({e.msg} at char {e.pos}): {snip(text)}")
    if not isinstance(data, dict):
        raise StepError(step, "not_json", f"the reply is JSON but not an object: {snip(text)}")
    return data


def is_int(x) -> bool:
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
    if not (isinstance(pair, list) and len(pair) == 2 and all(is_int(x) for x in pair)):
        raise StepError("mark", "bad_shape", f"{where}: expected [first_line, last_line], got {snip(json.dumps(pair))}")
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
        if not (isinstance(e, dict) and is_int(e.get("block")) and is_int(e.get("thread"))
                and isinstance(e.get("find"), str) and isinstance(e.get("replace"), str)):
            raise StepError("edit", "bad_shape", f"edit {n}: expected block, thread (integers), find, replace "
                            f"(strings), got {snip(json.dumps(e))}")
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
            raise StepError("edit", "not_found", f"block {e.block}, thread {e.thread}: {snip(e.find, 40)} occurs "
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
                                f"characters, got {snip(o)}")
            if any(tag in o for tag in TAGS):
                raise StepError("outline", "bad_outline", f"{where}: contains a format tag: {snip(o)}")
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
            reasons.append(f"independence: block {b}, thread {i} points at a sibling ({snip(found[0], 30)})")
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
        "self_parallelism": mean([p.self_parallelism for p in paths]),
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
