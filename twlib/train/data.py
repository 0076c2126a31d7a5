"""Training data of trie SFT: problems -> tries -> packed rows, and the order the loop visits them.

Design choices
- Rows are built once, deterministically: one trie per trajectory (`twlib.trie.pack`), first-fit-decreasing
  packed into rows of at most `tokens_per_batch` trie tokens (`twlib.trie.collate`). Every rank of an
  FSDP2 run builds the same rows (compared by `fingerprint`).
- Each epoch visits the rows in a permutation drawn from `(seed, epoch)` alone (`epoch_order`), so the
  data position is a pure function of the step: resuming needs only the step number.
- A trajectory that fails `twlib.format.parse` is skipped with one warning that counts them and names the
  problem ids; if all fail, it is an error. A trajectory over the row budget is an error with the fix.
- P-GRPO draws its prompts through `load_problems` too (the same train split as SFT's).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Sequence

import torch

from twlib.config import ConfigError, DataError
from twlib.format import FormatError, engine_calls, parse
from twlib.tasks import get_task, make_splits
from twlib.infra.problems import load_parquet
from twlib.tokenizer import require_single_token_tags
from twlib.trie import PackedTrie, collate, pack, tokenize_calls

__all__ = ["get_task_config", "load_problems", "eval_problems", "trajectory_pairs", "build_trajectories",
           "build_rows", "select_rows", "fingerprint", "steps_per_epoch", "epoch_order", "training_rows",
           "require_tags"]


def get_task_config(task: str, options: dict | None, source: str = "config"):
    """The task's config object from `task_options` (None when there are none: the task's defaults)."""
    if not options:
        return None
    try:
        return get_task(task).config_cls(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: field 'task_options': {e}") from None


def load_problems(config, source: str | None = None) -> list:
    """The training problems: from `config.data` (Parquet) or generated (train split of `make_splits`)."""
    where = f" (field 'data' of {source})" if source else ""
    if config.data is not None:
        path = Path(config.data)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} not found{where}; write one with `python -m twlib data` "
                                    f"or set data: null to generate the problems")
        problems = load_parquet(path)
        if config.n_train is not None:
            problems = problems[:config.n_train]
    else:
        task_config = get_task_config(config.task, config.task_options, source or "config")
        problems, _ = make_splits(config.task, config.n_train, config.n_eval, config.data_seed, task_config)
    if not problems:
        raise DataError(f"no training problems{where}: the data set is empty")
    return problems


def eval_problems(config) -> list:
    """The held-out split that goes with generated training problems (same task, sizes and seed)."""
    if config.data is not None:
        raise ValueError("eval_problems() needs generated data (data: null); load your eval Parquet instead")
    task_config = get_task_config(config.task, config.task_options)
    return make_splits(config.task, config.n_train, config.n_eval, config.data_seed, task_config)[1]


def trajectory_pairs(problem, tokenizer, mode: str) -> list[tuple[list[int], list[int]]]:
    """The (context ids, completion ids) pairs one problem trains on, after validating its text with `parse`.

    parallel: the state machine's calls (final call ends with EOS); sequential / causal: one pair
    (prompt, response + EOS) with the sequential / the parallel response text.
    """
    if mode == "parallel":
        return tokenize_calls(engine_calls(problem.parallel, problem.prompt), tokenizer)
    text = problem.sequential if mode == "sequential" else problem.parallel
    parse(text)  # a malformed text raises FormatError, like engine_calls does in parallel mode
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encode = lambda s: list(tokenizer.encode(s, add_special_tokens=False)) if s else []  # noqa: E731
    return [(encode(problem.prompt), encode(text) + eos)]


def build_trajectories(problems, tokenizer, mode: str = "parallel", loss_policy: str = "completions",
                       ) -> tuple[list[str], list[PackedTrie]]:
    """One trie per problem (chains for sequential/causal). Problems whose text fails to parse are skipped
    with one warning naming them; if all fail, ValueError. Returns (problem ids, tries)."""
    ids, tries, failed = [], [], []
    for problem in problems:
        try:
            pairs = trajectory_pairs(problem, tokenizer, mode)
        except FormatError as e:
            failed.append((problem.id, str(e)))
            continue
        ids.append(problem.id)
        tries.append(pack(pairs, loss=loss_policy))
    if failed:
        shown = "; ".join(f"{pid}: {msg}" for pid, msg in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        message = f"skipped {len(failed)} of {len(problems)} problems whose {mode} trajectory does not parse: {shown}{more}"
        if not tries:
            raise DataError("every trajectory failed to parse; " + message)
        warnings.warn(message, stacklevel=2)
    return ids, tries


def build_rows(ids: Sequence[str], tries: Sequence[PackedTrie], tokens_per_batch: int, pad_id: int = 0,
               max_positions: int | None = None) -> PackedTrie:
    """First-fit-decreasing packing of the tries into rows of at most `tokens_per_batch` tokens."""
    for pid, t in zip(ids, tries):
        n = t.shape[1]
        if n > tokens_per_batch:
            raise DataError(
                f"problem {pid}: its trajectory has {n} trie tokens, more than tokens_per_batch="
                f"{tokens_per_batch}; raise the budget (e.g. --set tokens_per_batch={next_pow2(n)})")
        depth = int(t.position_ids.max()) + 1
        if max_positions is not None and depth > max_positions:
            raise DataError(f"problem {pid}: a path of {depth} tokens exceeds the model's "
                             f"max_position_embeddings={max_positions}")
    return collate(list(tries), max_tokens=tokens_per_batch, pad_id=pad_id)


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def select_rows(rows: PackedTrie, index) -> PackedTrie:
    """Rows `index` of a packed batch, trimmed to their longest real content (padding sits at the end)."""
    index = torch.as_tensor(index, dtype=torch.long)
    picked = {k: getattr(rows, k).index_select(0, index) for k in ("input_ids", "position_ids", "parents",
                                                                    "labels", "exits", "sample_ids")}
    length = int((picked["sample_ids"] >= 0).sum(1).max())
    return PackedTrie(**{k: v[:, :length].contiguous() for k, v in picked.items()})


def fingerprint(rows: PackedTrie) -> str:
    h = hashlib.sha1()
    for k in ("input_ids", "parents", "labels", "sample_ids"):
        h.update(getattr(rows, k).numpy().tobytes())
    return h.hexdigest()


def steps_per_epoch(n_rows: int, rows_per_step: int) -> int:
    return -(-n_rows // rows_per_step)


def epoch_order(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n_rows, generator=g)


def training_rows(config, tokenizer, model, source: str | None, log) -> tuple[list, list, PackedTrie]:
    """(problems, tries, packed rows) of a config; skipped-trajectory warnings go to `log` and are re-raised
    as warnings. Every rank builds the same rows."""
    problems = load_problems(config, source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, tries = build_trajectories(problems, tokenizer, config.mode, config.loss_policy)
    for w in caught:
        log(f"warning: {w.message}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    rows = build_rows(ids, tries, config.tokens_per_batch, pad_id=tokenizer.pad_token_id or 0,
                      max_positions=getattr(model.config, "max_position_embeddings", None))
    return problems, tries, rows


def require_tags(tokenizer, config) -> None:
    """Trie rows and the tags' stop tokens need every tag as one token (sequential rows do not)."""
    if config.mode != "sequential":
        require_single_token_tags(tokenizer, config.model)
