"""Code that notebooks derive inline stays in sync with the library.

A notebook cell whose first line is `# sync: twlib.module.name` defines a function `name` (self-contained:
its own imports). This test executes that cell alone and checks that the notebook's function and the
library's give equal results on the cases registered in CASES below. A sync cell without cases fails,
so a new derivation cannot slip through unchecked.
"""

import json
from importlib import import_module
from pathlib import Path

import pytest

from twlib.format import DISTANCE_EXAMPLE, DISTANCE_PROMPT

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))

BLOCK = ("<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n</Outlines>\n"
         "<Thread>\n1: x\n</Thread><Thread>\n2: yy\n</Thread>\n</Parallel>\n")


def _pairs():
    return [([1, 2, 3], [4, 5]), ([1, 2, 3, 4, 5, 9], [7]), ([1, 2, 3, 4, 5, 8], [6, 6]), ([1, 2], [3, 3])]


# name -> list of argument tuples; results compared with ==, or with `compare` below
CASES = {
    "twlib.format.join_threads": [(["a\n</Thread>", "b\n</Thread>"],), (["only\n</Thread>"],)],
    "twlib.format.thread_prefix": [(1,), (12,)],
    "twlib.format.outline_numbers": [(DISTANCE_EXAMPLE,), ("<Outlines>\n<Outline>2:x</Outline>\n",), ("",)],
    "twlib.format.path_stats": [(DISTANCE_EXAMPLE,), (BLOCK,), ("plain text",), ("",)],
    "twlib.format.engine_calls": [(DISTANCE_EXAMPLE, DISTANCE_PROMPT), (BLOCK, "Q\n"), ("no blocks", "Q\n")],
    "twlib.format.replay": [],  # filled below
    "twlib.trie.pack": [(_pairs(),)],
    "twlib.trie.dense_mask": [],  # filled below
    "twlib.sft.batch_loss": [],  # filled below
    "twlib.sft.lr_factor": [(0, 100, 5, 0.1), (3, 100, 5, 0.1), (5, 100, 5, 0.1), (50, 100, 5, 0.1),
                            (99, 100, 5, 0.1), (150, 100, 5, 0.1), (0, 1, 0, 0.0), (0, 5, 0, 0.1),
                            (7, 13, 2, 0.2), (12, 13, 2, 0.2)],
    "twlib.rewards.acceleration_reward": [],  # filled below
    "twlib.datagen.thread_shares": [([1, 3],), ([0, 0],), ([5],), ([2, 2, 4],), ([],)],
    "twlib.datagen.trajectory_stats": [([DISTANCE_EXAMPLE],), ([BLOCK, "plain text"],), ([],),
                                       (["<Parallel>", DISTANCE_EXAMPLE, BLOCK + BLOCK],)],
    "twlib.pgrpo.group_advantages": [
        ([1.0, 0.0, 1.2, 0.0],), ([1.10, 1.12, 1.10, 1.14],), ([1.10, 1.12, 1.10, 1.14], True),
        ([1.2, 1.0, 0.0, 0.0], True), ([1.0, 1.0], True), ([0.5, 0.25, 1.2], True, 1e-3), ([],), ([-1.0, 1.0],),
    ],
}


def _late_cases():
    from twlib.format import engine_calls
    from twlib.trie import pack

    CASES["twlib.format.replay"] = [(engine_calls(DISTANCE_EXAMPLE, DISTANCE_PROMPT), DISTANCE_PROMPT)]
    CASES["twlib.trie.dense_mask"] = [(pack(_pairs()).exits,)]

    from twlib.format import PathStats, path_stats

    stats = [PathStats(100, 90, 0.1, 100 / 90), PathStats(100, 40, 0.6, 2.5), PathStats(57, 57, 0.0, 1.0),
             path_stats(BLOCK), path_stats(DISTANCE_EXAMPLE)]
    CASES["twlib.rewards.acceleration_reward"] = (
        [(s, form) for s in stats for form in ("paper", "code", "readme", "none")]
        + [(stats[0],), (stats[1], "paper", 1.0, 0.5), (stats[3], "readme", 0.25, 0.1), (stats[4], "code", 2.0, 0.3)])

    from twlib.models import build_model
    from twlib.tokenizer import build_tokenizer
    from twlib.trie import collate

    tokenizer = build_tokenizer()
    model = build_model("tiny", tokenizer, seed=0)
    rows = collate([pack(_pairs()), pack(engine_calls(BLOCK, "Q\n"), tokenizer),
                    pack(engine_calls(DISTANCE_EXAMPLE, DISTANCE_PROMPT), tokenizer, loss="paper")])
    CASES["twlib.sft.batch_loss"] = [(model, rows), (model, rows, "float"), (model, rows, "bool", 500.0),
                                     (model, pack(_pairs()))]


_late_cases()


def same(a, b):
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    if hasattr(a, "__dataclass_fields__") and hasattr(b, "__dataclass_fields__"):
        fa, fb = vars(a), vars(b)
        return fa.keys() == fb.keys() and all(same(fa[k], fb[k]) for k in fa)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def sync_cells():
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            if cell["cell_type"] == "code" and src.startswith("# sync: "):
                yield pytest.param(path.name, src, id=f"{path.stem}-cell{i}")


@pytest.mark.parametrize("notebook, source", list(sync_cells()))
def test_notebook_function_matches_library(notebook, source):
    target = source.splitlines()[0].removeprefix("# sync: ").strip()
    module_name, name = target.rsplit(".", 1)
    library = getattr(import_module(module_name), name)
    namespace: dict = {}
    exec(compile(source, f"{notebook}:{target}", "exec"), namespace)
    assert name in namespace, f"{notebook}: the sync cell for {target} does not define {name}"
    cases = CASES.get(target)
    assert cases, f"{notebook}: no test cases registered for {target} in tests/test_notebook_sync.py"
    for args in cases:
        assert same(namespace[name](*args), library(*args)), f"{notebook}: {target}{args!r:.80} differs"


def test_some_notebook_derives_library_code():
    assert list(sync_cells()), "no notebook has a `# sync:` cell"
