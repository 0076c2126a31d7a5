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
}


def _late_cases():
    from twlib.format import engine_calls
    from twlib.trie import pack

    CASES["twlib.format.replay"] = [(engine_calls(DISTANCE_EXAMPLE, DISTANCE_PROMPT), DISTANCE_PROMPT)]
    CASES["twlib.trie.dense_mask"] = [(pack(_pairs()).exits,)]


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
