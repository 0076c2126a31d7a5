"""Seeded synthetic tasks with a sequential and a parallel trajectory per problem, and graders.

Every `Problem` carries the question, the prompt the model is conditioned on, a sequential response, a
parallel response that contains the SAME reasoning text rearranged into a `<Parallel>` block, and the
answer. Two tasks:

- `"groupsum"` (tiny, for from-scratch CPU models): grouped running sums mod 10. The question is
  `A:q3r5s8 B:e7f1g4`: groups `A, B, ...` of digit items, each item behind a unique lowercase label. The
  reasoning for group A is `A:q3:0+3=3\nr5:3+5=8\ns8:8+8=6\nA=6\n` (label and item copied from the
  question, previous running value, item, new value mod 10; then the group result), and the answer is
  every group's result in order: `</think>\n\\boxed{62}`.
- `"multiply"` (for real Qwen3 models; the reference's public RL task): the product of 5-8 integers in
  [0, 1000], in prose; the parallel form multiplies disjoint groups of numbers in 2-4 threads and then
  combines the partial products.

Design choices, and why
- Same reasoning, rearranged. A group's section is byte-identical in the sequential and the parallel
  response (the thread body is the section without its last `\\n`, which the format re-inserts before
  `</Thread>`), so the skill a sequential base model learns transfers into threads unchanged. The
  prototype (tiny-task-findings.md) saw threads fail exactly here, when the base copied by position.
- Labels are unique within a problem and items are looked up in the question BY LABEL, never by
  position. By default each group's labels are a run of consecutive letters at a random place in the
  alphabet (the next label is the successor; the group's first label is looked up); `labels="random"`
  makes every label a lookup, which a 1.3M model did not learn in an early 6-minute probe.
- Cheap blocks: an outline is just the group name (`<Outline>1:A</Outline>\\n`, 6 tokens) and threads
  are whole groups, so work per thread (9 tokens per item) dominates the fixed cost of a block.
- When to parallelise is a visible, learnable rule: eligible iff the question has at least
  `min_groups_to_parallelize` groups (and `min_items_to_parallelize` items); eligible problems get the
  parallel form with probability `p_parallel`, all others have `parallel == sequential`. The default mix
  includes single-group problems, which stay sequential.
- No combine step: the answer lists the group results, so nothing after the block sits on the critical
  path but the answer itself (a combine line cost ~6 tokens per group on it).
- The oracle ceiling of these trajectories (`twlib.eval.oracle_ceiling`) counts tokens with
  `twlib.format.path_stats` (tags one token, every other character one token; response tokens only);
  Parquet and JSON-lines files of problems: `twlib.infra.problems`.
- Deterministic: one `random.Random(seed)` stream per call; ids hash the question, so they are stable.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import string
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable, Sequence

__all__ = [
    "Problem",
    "GroupSumConfig",
    "MultiplyConfig",
    "Task",
    "TASKS",
    "get_task",
    "generate",
    "make_splits",
    "split",
    "extract_answer",
    "grade",
    "make_groupsum_problem",
    "make_multiply_problem",
]


# ----------------------------------------------------------------------------------------------------
# The problem record


@dataclass(frozen=True)
class Problem:
    """One problem. `prompt` is what the model is conditioned on; `sequential` and `parallel` are responses."""

    id: str
    task: str
    question: str
    prompt: str
    sequential: str
    parallel: str
    answer: str
    meta: dict = field(default_factory=dict, compare=True, hash=False)

    @property
    def is_parallel(self) -> bool:
        return self.parallel != self.sequential


def _problem_id(task: str, question: str) -> str:
    return f"{task}-{hashlib.sha1(question.encode()).hexdigest()[:12]}"


# ----------------------------------------------------------------------------------------------------
# Answers and grading


_BOXED = "\\boxed{"


def _boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` with balanced braces, in order; unclosed ones are skipped."""
    out = []
    start = text.find(_BOXED)
    while start != -1:
        i = start + len(_BOXED)
        depth = 1
        j = i
        while j < len(text):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    out.append(text[i:j])
                    break
            j += 1
        start = text.find(_BOXED, start + 1)
    return out


def extract_answer(response: Any) -> str | None:
    """Content of the last balanced `\\boxed{...}` after the last `</think>` (whole text if none). Never raises."""
    try:
        if not isinstance(response, str):
            return None
        end = response.rfind("</think>")
        text = response[end + len("</think>"):] if end != -1 else response
        found = _boxed_contents(text)
        return found[-1] if found else None
    except Exception:  # pragma: no cover - defensive: grading must never crash a training loop
        return None


def _normalize(s: str, task: str | None) -> str:
    s = re.sub(r"\s+", "", s)
    if task == "multiply":
        s = s.replace("{,}", "").replace("\\,", "").replace(",", "")
    return s


def grade(response: Any, answer: Any, task: str | None = None) -> bool:
    """Exact match of `extract_answer(response)` with `answer` after normalisation. Never raises.

    Normalisation strips all whitespace; for `task="multiply"` also thousands separators (`,`, `{,}`, `\\,`),
    as the reference does. Missing, unclosed or garbage answers grade False.
    """
    try:
        got = extract_answer(response)
        if got is None or answer is None:
            return False
        want = _normalize(str(answer), task)
        return bool(want) and _normalize(got, task) == want
    except Exception:  # pragma: no cover - defensive
        return False


# ----------------------------------------------------------------------------------------------------
# Tiny task: grouped running sums mod 10


GROUP_NAMES = string.ascii_uppercase
LABELS = string.ascii_lowercase


@dataclass(frozen=True)
class GroupSumConfig:
    """Knobs of the `groupsum` task (defaults: the default mix; see `oracle_ceiling` for its ceiling).

    - Number of groups k: from `min_groups..max_groups`, weighted by `group_weights` (one weight per k,
      None = uniform). Items per group: uniform in `min_items..max_items`; sizes are redrawn until the
      total is at most `max_total_items` (<= 26: labels are unique letters).
    - Parallel policy: a problem is eligible iff k >= `min_groups_to_parallelize` and its item count is
      >= `min_items_to_parallelize`; an eligible problem gets the parallel form with probability
      `p_parallel` (else `parallel == sequential`).
    - `max_threads`: None = one thread per group; else consecutive groups are packed into at most this
      many threads (balanced by item count, order kept), and the outline lists the groups (`1:AB`).
    - `labels`: "runs" (default) gives each group a run of consecutive letters starting at a random
      letter, the runs of different groups disjoint and in random order (`A:klm B:cde`): the next label
      inside a group is the alphabetical successor and only a group's first label and every item are
      looked up in the question. "random" is a random permutation of the alphabet, so every label is a
      lookup: in an early ad-hoc 6-minute probe (small preset, ~1M tokens, a shared machine; not a
      committed command) a model learnt only the format with it (loss plateau ~1.07 nats), hence the default.
    - `question_order`: "shuffled" (default) lists the groups in the question in a random order
      (`C:stu A:jkl B:abc`) while the reasoning, the threads and the answer still go A, B, C; "groups"
      lists them as A, B, C (the layout of the project's first recipes).
      With "groups" a 0.43M model learns to copy the j-th item of the question at the j-th step of the
      response, a positional shortcut that breaks inside threads (teacher-forced on the long recipe's
      sequential model: 0% item errors in place, 89% when the reasoning starts at group B, 96% after an
      outline block). Shuffled groups rule the shortcut out: a group is found by its name.
    - `section_order`: "shuffled" makes the sequential reasoning visit the groups in a random order (the
      answer stays A, B, C), so a model must read the name it has just written to find a group, as every
      thread after the first must (`<Thread>\n2:B:`). For pre-training data (the base); the parallel form
      is unchanged.

    Default mix: k = 1..5 with weights 1 : 1.5 : 2 : 3 : 3 (about 10% single-group, sequential-only
    problems), 4-6 items per group. Perfect trajectories (1,500 problems, seed 123): self-parallelism 1.98,
    oracle speed-up 1.59 (k=2: 1.15, k=3: 1.46, k=4: 1.74, k=5: 1.93); sequential response 184 tokens on
    average, 263 at most; prompt + response at most 394 tokens.
    """

    min_groups: int = 1
    max_groups: int = 5
    group_weights: tuple[float, ...] | None = (1.0, 1.5, 2.0, 3.0, 3.0)
    min_items: int = 4
    max_items: int = 6
    max_total_items: int = 26
    min_groups_to_parallelize: int = 2
    min_items_to_parallelize: int = 0
    p_parallel: float = 1.0
    max_threads: int | None = None
    labels: str = "runs"
    question_order: str = "shuffled"
    section_order: str = "groups"

    def __post_init__(self):
        if self.labels not in ("runs", "random"):
            raise ValueError(f"labels must be 'runs' or 'random', got {self.labels!r}")
        if self.question_order not in ("groups", "shuffled"):
            raise ValueError(f"question_order must be 'groups' or 'shuffled', got {self.question_order!r}")
        if self.section_order not in ("groups", "shuffled"):
            raise ValueError(f"section_order must be 'groups' or 'shuffled', got {self.section_order!r}")
        if not 1 <= self.min_groups <= self.max_groups <= len(GROUP_NAMES):
            raise ValueError(f"need 1 <= min_groups <= max_groups <= 26, got {self.min_groups}..{self.max_groups}")
        if not 1 <= self.min_items <= self.max_items:
            raise ValueError(f"need 1 <= min_items <= max_items, got {self.min_items}..{self.max_items}")
        if not 1 <= self.max_total_items <= len(LABELS):
            raise ValueError(f"max_total_items must be in 1..26 (labels are unique letters), got {self.max_total_items}")
        if self.min_groups * self.min_items > self.max_total_items:
            raise ValueError("min_groups * min_items exceeds max_total_items: no problem fits")
        if self.group_weights is not None:
            w = tuple(float(x) for x in self.group_weights)
            if len(w) != self.max_groups - self.min_groups + 1 or any(x < 0 for x in w) or sum(w) <= 0:
                raise ValueError("group_weights needs one non-negative weight per k in min_groups..max_groups")
            object.__setattr__(self, "group_weights", w)
        if not 0.0 <= self.p_parallel <= 1.0:
            raise ValueError(f"p_parallel must be in [0, 1], got {self.p_parallel}")
        if self.max_threads is not None and self.max_threads < 2:
            raise ValueError("max_threads must be None or >= 2")


def _group_section(name: str, labels: Sequence[str], items: Sequence[int]) -> tuple[str, int]:
    """`A:q3:0+3=3\nr5:3+5=8\n...\nA=6\n` and the group result.

    Each step repeats the question's `label digit` pair (`q3`), so the digit is a plain induction copy
    (the current token is the label, found once in the question), then adds it to the previous value
    mod 10 with every operand written right before the result. The first step follows `A:`, as the
    first label follows `A:` in the question.
    """
    lines, value = [], 0
    for label, item in zip(labels, items):
        new = (value + item) % 10
        lines.append(f"{label}{item}:{value}+{item}={new}")
        value = new
    lines.append(f"{name}={value}")
    return f"{name}:" + "\n".join(lines) + "\n", value


def _pack(sizes: Sequence[int], n_threads: int) -> list[list[int]]:
    """Split group indices 0..k-1 into `n_threads` consecutive runs, minimising the largest item count."""
    k = len(sizes)
    if n_threads >= k:
        return [[i] for i in range(k)]
    best = None
    # Exhaustive search over cut points when cheap (always, for sensible k); greedy split otherwise.
    if math.comb(k - 1, n_threads - 1) <= 20000:
        for cuts in combinations(range(1, k), n_threads - 1):
            bounds = (0, *cuts, k)
            runs = [list(range(bounds[j], bounds[j + 1])) for j in range(n_threads)]
            cost = max(sum(sizes[i] for i in r) for r in runs)
            if best is None or cost < best[0]:
                best = (cost, runs)
        return best[1]
    target = sum(sizes) / n_threads  # pragma: no cover - only for huge k
    runs, cur = [], []
    for i in range(k):
        cur.append(i)
        if sum(sizes[j] for j in cur) >= target and len(runs) < n_threads - 1:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def render_groupsum_parallel(sections: Sequence[str], outlines: Sequence[str], combine: str, answer: str) -> str:
    """The parallel response: one block, thread i = sections[i] without its last newline."""
    head = "<think>\n<Parallel>\n<Outlines>\n"
    head += "".join(f"<Outline>{i}:{o}</Outline>\n" for i, o in enumerate(outlines, 1))
    head += "</Outlines>\n"
    threads = "".join(f"<Thread>\n{i}:{s[:-1]}\n</Thread>" for i, s in enumerate(sections, 1))
    return head + threads + "\n</Parallel>\n" + combine + f"</think>\n\\boxed{{{answer}}}"


def _draw_labels(rng: random.Random, sizes: Sequence[int], kind: str) -> list[str]:
    """Labels for all items, group after group (see GroupSumConfig.labels)."""
    n = sum(sizes)
    if kind == "random":
        return rng.sample(LABELS, n)
    order = list(range(len(sizes)))
    rng.shuffle(order)  # the groups' runs appear in this order along the alphabet
    gaps = [0] * (len(sizes) + 1)
    for _ in range(len(LABELS) - n):  # spread the unused letters over the gaps at random
        gaps[rng.randrange(len(gaps))] += 1
    start, at = {}, gaps[0]
    for slot, g in enumerate(order):
        start[g] = at
        at += sizes[g] + gaps[slot + 1]
    return [LABELS[start[g] + j] for g, m in enumerate(sizes) for j in range(m)]


def make_groupsum_problem(rng: random.Random, config: GroupSumConfig | None = None) -> Problem:
    """Draw one `groupsum` problem from `rng` (consumes the stream deterministically)."""
    cfg = config or GroupSumConfig()
    ks = list(range(cfg.min_groups, cfg.max_groups + 1))
    k = rng.choices(ks, weights=cfg.group_weights)[0] if cfg.group_weights else rng.choice(ks)
    while True:
        sizes = [rng.randint(cfg.min_items, cfg.max_items) for _ in range(k)]
        if sum(sizes) <= cfg.max_total_items:
            break
    n = sum(sizes)
    labels = _draw_labels(rng, sizes, cfg.labels)
    items = [rng.randrange(10) for _ in range(n)]

    groups, sections, results, pos = [], [], [], 0
    for g, m in enumerate(sizes):
        name = GROUP_NAMES[g]
        lab, it = labels[pos:pos + m], items[pos:pos + m]
        pos += m
        groups.append(name + ":" + "".join(f"{a}{d}" for a, d in zip(lab, it)))
        section, value = _group_section(name, lab, it)
        sections.append(section)
        results.append(value)
    if cfg.question_order == "shuffled":  # the question lists the groups in a random order
        rng.shuffle(groups)
    question = " ".join(groups)
    # Every group's result, labelled (`A=7 B=7 C=6`): each answer digit is then an induction copy of its
    # group's result line `B=7`, not "the j-th result line", which a 2-layer model finds hard to count
    # (teacher-forced probe: 59% of unlabelled answer digits wrong while every result line was right).
    answer = " ".join(f"{GROUP_NAMES[g]}={v}" for g, v in enumerate(results))
    combine = ""
    order = list(range(k))
    if cfg.section_order == "shuffled":  # the sequential reasoning visits the groups in a random order
        rng.shuffle(order)
    sequential = "<think>\n" + "".join(sections[g] for g in order) + combine + f"</think>\n\\boxed{{{answer}}}"

    eligible = k >= cfg.min_groups_to_parallelize and n >= cfg.min_items_to_parallelize and k >= 2
    use_parallel = eligible and rng.random() < cfg.p_parallel
    threads: list[list[int]] = []
    if use_parallel:
        threads = _pack(sizes, cfg.max_threads or k)
        thread_sections = ["".join(sections[i] for i in run) for run in threads]
        outlines = ["".join(GROUP_NAMES[i] for i in run) for run in threads]
        parallel = render_groupsum_parallel(thread_sections, outlines, combine, answer)
    else:
        parallel = sequential
    meta = {
        "k": k,
        "sizes": sizes,
        "n_items": n,
        "group_results": results,
        "eligible": eligible,
        "parallel": use_parallel,
        "threads": [[GROUP_NAMES[i] for i in run] for run in threads],
    }
    return Problem(_problem_id("groupsum", question), "groupsum", question, question + "\n",
                   sequential, parallel, answer, meta)


# ----------------------------------------------------------------------------------------------------
# Multiplication task of the reference (prose, for real Qwen3 models)


@dataclass(frozen=True)
class MultiplyConfig:
    """Knobs of the `multiply` task. Reference: 5-8 integers in [0, 1000].

    Threads: uniform in `min_threads..min(max_threads, n // 2)` (every thread multiplies >= 2 numbers), the
    numbers split into that many consecutive groups of random sizes. `sequential_style="grouped"` makes the
    sequential response walk the same groups as the threads (same reasoning, rearranged); `"chain"`
    multiplies left to right instead. Eligible problems get the parallel form with probability `p_parallel`.
    """

    min_numbers: int = 5
    max_numbers: int = 8
    low: int = 0
    high: int = 1000
    min_threads: int = 2
    max_threads: int = 4
    p_parallel: float = 1.0
    sequential_style: str = "grouped"

    def __post_init__(self):
        if not 2 <= self.min_numbers <= self.max_numbers:
            raise ValueError("need 2 <= min_numbers <= max_numbers")
        if not 0 <= self.low <= self.high:
            raise ValueError("need 0 <= low <= high")
        if not 2 <= self.min_threads <= self.max_threads:
            raise ValueError("need 2 <= min_threads <= max_threads")
        if not 0.0 <= self.p_parallel <= 1.0:
            raise ValueError("p_parallel must be in [0, 1]")
        if self.sequential_style not in ("grouped", "chain"):
            raise ValueError("sequential_style must be 'grouped' or 'chain'")


def _and_list(xs: Sequence[str]) -> str:
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def _chain_lines(nums: Sequence[int]) -> tuple[list[str], int]:
    """`a × b = ab.` then `ab × c = abc.` ...; returns the lines and the product."""
    lines, acc = [], nums[0]
    for x in nums[1:]:
        new = acc * x
        lines.append(f"{acc:,} × {x:,} = {new:,}.")
        acc = new
    return lines, acc


def _random_composition(rng: random.Random, n: int, parts: int, minimum: int) -> list[int]:
    """Random sizes, each >= minimum, summing to n."""
    spare = n - parts * minimum
    cuts = sorted(rng.randint(0, spare) for _ in range(parts - 1))
    bounds = [0, *cuts, spare]
    return [minimum + bounds[i + 1] - bounds[i] for i in range(parts)]


def make_multiply_problem(rng: random.Random, config: MultiplyConfig | None = None) -> Problem:
    """Draw one `multiply` problem from `rng`."""
    cfg = config or MultiplyConfig()
    n = rng.randint(cfg.min_numbers, cfg.max_numbers)
    nums = [rng.randint(cfg.low, cfg.high) for _ in range(n)]
    answer_int = math.prod(nums)
    answer = str(answer_int)
    question = f"Compute the product of {_and_list([str(x) for x in nums])}."

    hi = min(cfg.max_threads, n // 2)
    eligible = hi >= cfg.min_threads
    t = rng.randint(cfg.min_threads, hi) if eligible else 1
    sizes = _random_composition(rng, n, t, 2) if eligible else [n]
    use_parallel = eligible and rng.random() < cfg.p_parallel
    chunks, pos = [], 0
    for s in sizes:
        chunks.append(nums[pos:pos + s])
        pos += s

    bodies, outlines, partials = [], [], []
    for i, chunk in enumerate(chunks, 1):
        lines, p = _chain_lines(chunk)
        partials.append(p)
        bodies.append(" " + "\n".join(lines) + f"\nGroup {i} gives {p:,}.")
        outlines.append(" Multiply " + _and_list([f"{x:,}" for x in chunk]) + ".")
    combine, _ = _chain_lines(partials)
    end = (f"So the product is {answer_int:,}.\n</think>\n\n"
           f"The product of the numbers is \\boxed{{{answer_int:,}}}.")
    intro = f"I will multiply the numbers in {len(chunks)} groups and then combine the partial products.\n"
    combine_text = "Now I combine the partial products.\n" + "".join(line + "\n" for line in combine)

    if cfg.sequential_style == "grouped" and len(chunks) > 1:
        seq_body = intro + "".join(
            f"Group {i}:{o}\n{b[1:]}\n" for i, (o, b) in enumerate(zip(outlines, bodies), 1)) + combine_text
    else:
        lines, _ = _chain_lines(nums)
        seq_body = "I will multiply the numbers from left to right.\n" + "".join(line + "\n" for line in lines)
    sequential = "<think>\n" + seq_body + end
    if use_parallel:
        block = "<Parallel>\n<Outlines>\n"
        block += "".join(f"<Outline>{i}:{o}</Outline>\n" for i, o in enumerate(outlines, 1))
        block += "</Outlines>\n"
        block += "".join(f"<Thread>\n{i}:{b}\n</Thread>" for i, b in enumerate(bodies, 1))
        block += "\n</Parallel>\n"
        parallel = "<think>\n" + intro + block + combine_text + end
    else:
        parallel = sequential
    meta = {
        "n_numbers": n,
        "numbers": nums,
        "groups": [list(c) for c in chunks],
        "partial_products": [str(p) for p in partials],
        "eligible": eligible,
        "parallel": use_parallel,
        "threads": len(chunks) if use_parallel else 0,
    }
    return Problem(_problem_id("multiply", question), "multiply", question, question,
                   sequential, parallel, answer, meta)


# ----------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Task:
    """A task: how to draw one problem from an rng, its config class, and its grader."""

    name: str
    make_problem: Callable[[random.Random, Any], Problem]
    config_cls: type
    ceiling_key: str  # meta key used for the per-size breakdown of `oracle_ceiling`

    def grade(self, response: Any, answer: Any) -> bool:
        return grade(response, answer, task=self.name)


TASKS: dict[str, Task] = {
    "groupsum": Task("groupsum", make_groupsum_problem, GroupSumConfig, "k"),
    "multiply": Task("multiply", make_multiply_problem, MultiplyConfig, "n_numbers"),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


# ----------------------------------------------------------------------------------------------------
# Generators and splits


def _draw_unique(task: Task, n: int, rng: random.Random, config, exclude: set[str]) -> list[Problem]:
    out: list[Problem] = []
    seen = set(exclude)
    misses = 0
    while len(out) < n:
        p = task.make_problem(rng, config)
        if p.question in seen:
            misses += 1
            if misses > 1000 + 10 * n:
                raise ValueError(f"could not draw {n} distinct {task.name} questions (space too small?)")
            continue
        seen.add(p.question)
        out.append(p)
    return out


def generate(task: str, n: int, seed: int, config=None) -> list[Problem]:
    """`n` problems with distinct questions, deterministic for `(task, n, seed, config)`.

    A prefix property holds: `generate(t, n, s)[:m] == generate(t, m, s)` for m <= n.
    """
    spec = get_task(task)
    if n < 0:
        raise ValueError("n must be >= 0")
    return _draw_unique(spec, n, random.Random(seed), config, set())


def make_splits(task: str, n_train: int, n_eval: int, seed: int, config=None) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out eval sets with no question in common (the eval set is drawn first)."""
    spec = get_task(task)
    rng = random.Random(f"{task}:{seed}:splits")
    eval_set = _draw_unique(spec, n_eval, rng, config, set())
    train = _draw_unique(spec, n_train, rng, config, {p.question for p in eval_set})
    return train, eval_set


def split(problems: Sequence[Problem], n_eval: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Split an existing list into (train, eval) by question: duplicates of a question stay on one side."""
    by_q: dict[str, list[Problem]] = {}
    for p in problems:
        by_q.setdefault(p.question, []).append(p)
    questions = list(by_q)
    random.Random(seed).shuffle(questions)
    if not 0 <= n_eval <= len(questions):
        raise ValueError(f"n_eval must be in 0..{len(questions)} (distinct questions)")
    eval_q = set(questions[:n_eval])
    train = [p for p in problems if p.question not in eval_q]
    evals = [p for p in problems if p.question in eval_q]
    return train, evals
