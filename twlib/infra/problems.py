"""Problems on disk: Parquet (the trainers' `data`), `datasets.Dataset`, and JSON-lines prompt pools.

Design choices
- One string column per `twlib.tasks.Problem` field, `meta` as a JSON string: the exact round trip is
  tested, and any Parquet reader (pandas, `datasets`, DuckDB) opens the file.
- A bad JSON-lines record is an error that names the file, line and field; nothing is skipped silently.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Sequence

from twlib.tasks import Problem

__all__ = ["to_dataset", "from_dataset", "problems_from_jsonl", "save_parquet", "load_parquet"]

_COLUMNS = [f.name for f in fields(Problem)]


def _records(problems: Sequence[Problem]) -> dict[str, list]:
    cols: dict[str, list] = {c: [] for c in _COLUMNS}
    for p in problems:
        d = asdict(p)
        d["meta"] = json.dumps(p.meta, sort_keys=True)
        for c in _COLUMNS:
            cols[c].append(d[c])
    return cols


def _from_record(r: dict) -> Problem:
    return Problem(**{c: (json.loads(r[c]) if c == "meta" else r[c]) for c in _COLUMNS})


def to_dataset(problems: Sequence[Problem]):
    """A `datasets.Dataset` with one string column per field; `meta` is a JSON string."""
    import datasets

    features = datasets.Features({c: datasets.Value("string") for c in _COLUMNS})
    return datasets.Dataset.from_dict(_records(problems), features=features)


def from_dataset(ds) -> list[Problem]:
    return [_from_record(r) for r in ds]


def problems_from_jsonl(path, prompt_field: str = "problem", answer_field: str = "answer", task: str = "math",
                        template: str = "{prompt}", id_field: str | None = None) -> list[Problem]:
    """A prompt pool (P-GRPO's `data`, a self-training pool) from a JSON-lines file of records such as
    `{"problem": "...", "answer": "..."}` (what the RL sets of the paper's lineage, e.g. DeepScaleR or
    MATH, look like once exported with `datasets`' `to_json`). `template` wraps the prompt text
    (`{prompt}`: e.g. a chat template with the thinking prefix). Responses are left empty.

    Raises ValueError naming the file, line and field on a bad line; an empty file is an error too."""
    if "{prompt}" not in template:
        raise ValueError(f"template must contain '{{prompt}}' (got {template!r})")
    problems = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            for name in (prompt_field, answer_field):
                value = record.get(name)
                if value is None or (isinstance(value, str) and not value.strip()):
                    raise ValueError(f"{path}:{n}: field {name!r} is missing or empty "
                                     f"(fields here: {', '.join(sorted(record)) or 'none'})")
            question = str(record[prompt_field])
            pid = str(record[id_field]) if id_field and record.get(id_field) is not None else f"{Path(path).stem}-{n}"
            problems.append(Problem(pid, task, question, template.replace("{prompt}", question), "", "",
                                    str(record[answer_field]), {"source": str(path), "line": n}))
    if not problems:
        raise ValueError(f"{path}: no records")
    return problems


def save_parquet(problems: Sequence[Problem], path) -> None:
    """Write problems to Parquet (string columns, `meta` as JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = _records(problems)
    table = pa.table({c: pa.array(cols[c], type=pa.string()) for c in _COLUMNS})
    pq.write_table(table, str(path))


def load_parquet(path) -> list[Problem]:
    """Read problems written by `save_parquet` (exact round trip)."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(path))
    missing = [c for c in _COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    return [_from_record(r) for r in table.to_pylist()]
