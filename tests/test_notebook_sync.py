"""Code that a notebook derives is the library's code, text for text.

The convention (notebooks/*.ipynb and notebooks/solutions/*.ipynb): a code cell that derives a library
function begins with one comment line per derived name,

    # derives: twlib.format.path_stats

and defines that name (a `def` or a `class`) at the top level of the cell. This test parses the cell and
the library's source and compares the two definitions' syntax trees after dropping docstrings, comments
and type annotations (argument and return annotations; an annotated assignment in a function body counts
as a plain assignment, one without a value as nothing; a class field keeps its name but not its type).
Everything else must match: names, defaults, decorators, every statement and expression. On a mismatch the
test names the notebook, the cell, the function and the first differing line, the notebook's line beside
the library's, so either side can be edited to agree (simplify the library where the notebook reads
better; keep the library's tests green).

After the derivation the notebook uses the library's version: a later code cell imports the name from its
module (`from twlib.format import path_stats`), the reasoning-from-scratch pattern. Helpers the derived
function calls are not compared unless they carry their own `# derives:` line.

Design choices
- Syntax trees, not outputs: an earlier version of this test ran both functions on a few inputs, and a
  notebook function twice as long as the library's passed. Equal trees mean the learner reads the code
  that runs in the library.
- The module in `# derives:` is imported by name, so a module that moves is reported as such (update the
  line), not as a difference.
"""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")) + \
    sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
MARK = "# derives: "


def cell_source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def derived_names(source: str) -> list[str]:
    """The dotted names of the `# derives:` lines that open a cell."""
    names = []
    for line in source.splitlines():
        if not line.startswith(MARK):
            break
        names.append(line.removeprefix(MARK).strip())
    return names


def derivations():
    """(notebook path, cell index, dotted name) for every `# derives:` line."""
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                for name in derived_names(cell_source(cell)):
                    yield path, i, name


# ----------------------------------------------------------------------------------------------------
# Normalising a definition: no docstrings, no annotations (comments never reach the syntax tree)


class _Normalise(ast.NodeTransformer):
    def __init__(self):
        self.in_class = []

    def _drop_docstring(self, node):
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.copy_location(ast.Pass(), body[0])]

    def visit_FunctionDef(self, node):
        self._drop_docstring(node)
        node.returns = None
        node.type_comment = None
        args = node.args
        for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
            if a is not None:
                a.annotation = None
                a.type_comment = None
        self.in_class.append(False)
        self.generic_visit(node)
        self.in_class.pop()
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._drop_docstring(node)
        self.in_class.append(True)
        self.generic_visit(node)
        self.in_class.pop()
        return node

    def visit_AnnAssign(self, node):
        if self.in_class and self.in_class[-1]:  # a class field (a dataclass's): its name matters, not its type
            node.annotation = ast.copy_location(ast.Constant(None), node.annotation)
            return node
        if node.value is None:
            return None
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)


def normalise(node: ast.AST) -> ast.AST:
    return _Normalise().visit(node)


def dump(node) -> str:
    return ast.dump(node, include_attributes=False) if isinstance(node, ast.AST) else repr(node)


def first_difference(a: ast.AST, b: ast.AST, where=None):
    """The innermost pair of located nodes (with line numbers) at which two trees first differ, or None."""
    if dump(a) == dump(b):
        return None
    if hasattr(a, "lineno") and hasattr(b, "lineno"):
        where = (a, b)
    if type(a) is not type(b):
        return where
    for field in a._fields:
        x, y = getattr(a, field, None), getattr(b, field, None)
        if dump(x) == dump(y) if not isinstance(x, list) else [dump(u) for u in x] == [dump(v) for v in y or []]:
            continue
        if isinstance(x, list) and isinstance(y, list):
            for u, v in zip(x, y):
                if dump(u) != dump(v):
                    if isinstance(u, ast.AST) and isinstance(v, ast.AST):
                        return first_difference(u, v, where)
                    return where
            # one list is longer: point at its first extra element, and at the other side's last one
            extra = x[len(y)] if len(x) > len(y) else y[len(x)]
            last = (y or x)[-1] if len(x) > len(y) else (x or y)[-1]
            pair = (extra, last) if len(x) > len(y) else (last, extra)
            if all(hasattr(n, "lineno") for n in pair):
                return pair
            return where
        if isinstance(x, ast.AST) and isinstance(y, ast.AST):
            return first_difference(x, y, where)
        return where
    return where


# ----------------------------------------------------------------------------------------------------
# The tests


def library_definition(dotted: str, notebook: str):
    module_name, name = dotted.rsplit(".", 1)
    try:
        module = import_module(module_name)
    except ImportError as error:
        pytest.fail(f"{notebook}: `# derives: {dotted}`: cannot import {module_name} ({error}); "
                    f"did the module move? Update the `# derives:` line")
    if not hasattr(module, name):
        pytest.fail(f"{notebook}: `# derives: {dotted}`: {module_name} has no {name}")
    obj = getattr(module, name)
    lines, start = inspect.getsourcelines(obj)
    source = textwrap.dedent("".join(lines))
    node = ast.parse(source).body[0]
    file = Path(inspect.getsourcefile(obj)).resolve()
    try:
        file = file.relative_to(ROOT)
    except ValueError:
        pass
    return node, source.splitlines(), start, file


def notebook_definition(source: str, name: str, where: str):
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        pytest.fail(f"{where}: the cell does not parse: {error}")
    found = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
             and n.name == name]
    if not found:
        pytest.fail(f"{where}: the cell says `# derives: ...{name}` but defines no top-level {name}")
    return found[-1]


def compare(source: str, dotted: str, where: str) -> str | None:
    """None when the cell's definition equals the library's, else a message naming the first difference."""
    name = dotted.rsplit(".", 1)[1]
    mine = notebook_definition(source, name, where)
    theirs, lib_lines, start, file = library_definition(dotted, where)
    mine_n, theirs_n = normalise(mine), normalise(theirs)
    if dump(mine_n) == dump(theirs_n):
        return None
    pair = first_difference(mine_n, theirs_n)
    cell_lines = source.splitlines()
    if pair is None:  # e.g. the top-level nodes differ in kind
        pair = (mine, theirs)
    a, b = pair
    return (f"{where}: {name} differs from {dotted} (after dropping docstrings, comments and annotations).\n"
            f"  first difference:\n"
            f"    notebook line {a.lineno}: {cell_lines[a.lineno - 1].strip()}\n"
            f"    library  {file}:{start + b.lineno - 1}: {lib_lines[b.lineno - 1].strip()}")


def _params():
    return [pytest.param(path, i, name, id=f"{path.stem}-cell{i}-{name.rsplit('.', 1)[1]}")
            for path, i, name in derivations()]


@pytest.mark.parametrize("path, index, dotted", _params())
def test_derived_function_is_the_library_function(path, index, dotted):
    source = cell_source(json.loads(path.read_text())["cells"][index])
    message = compare(source, dotted, f"{path.relative_to(ROOT)} cell {index}")
    assert message is None, message


@pytest.mark.parametrize("path, index, dotted", _params())
def test_the_notebook_imports_the_library_version_after_deriving(path, index, dotted):
    module_name, name = dotted.rsplit(".", 1)
    cells = json.loads(path.read_text())["cells"]
    for cell in cells[index + 1:]:
        if cell["cell_type"] != "code":
            continue
        try:
            tree = ast.parse(cell_source(cell))
        except SyntaxError:  # IPython syntax (magics): not an import of ours
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == module_name \
                    and any(alias.name == name and alias.asname in (None, name) for alias in node.names):
                return
    pytest.fail(f"{path.relative_to(ROOT)} cell {index} derives {dotted}, but no later cell has "
                f"`from {module_name} import {name}`: after deriving, use the library's version")


def test_notebooks_derive_library_code():
    assert list(derivations()), "no notebook has a `# derives:` cell"


# The checker itself: a difference is found and named at the right line.

LIBRARY_LIKE = '''
def f(x: int, y=2) -> int:
    """Doc."""
    total: int = x + y  # a comment
    for i in range(3):
        total += i
    return total
'''


def test_docstrings_comments_and_annotations_do_not_count():
    same = "def f(x, y=2):\n    total = x + y\n    for i in range(3):\n        total += i  # why\n    return total\n"
    a, b = normalise(ast.parse(same).body[0]), normalise(ast.parse(LIBRARY_LIKE).body[0])
    assert dump(a) == dump(b)


@pytest.mark.parametrize("changed, line", [
    ("def f(x, y=3):\n    total = x + y\n    for i in range(3):\n        total += i\n    return total\n", 1),
    ("def f(x, y=2):\n    total = x + y\n    for i in range(4):\n        total += i\n    return total\n", 3),
    ("def f(x, y=2):\n    total = x + y\n    for i in range(3):\n        total -= i\n    return total\n", 4),
    ("def f(x, y=2):\n    total = x + y\n    for i in range(3):\n        total += i\n        print(i)\n"
     "    return total\n", 5),
    ("def f(x, y=2):\n    total = x + y\n    return total\n", 3),
])
def test_the_first_differing_line_is_named(changed, line):
    a, b = normalise(ast.parse(changed).body[0]), normalise(ast.parse(LIBRARY_LIKE).body[0])
    assert dump(a) != dump(b)
    pair = first_difference(a, b)
    assert pair is not None and pair[0].lineno == line, (pair and ast.unparse(pair[0]))



def test_no_cell_uses_the_old_sync_mark():
    old = [f"{path.relative_to(ROOT)} cell {i}" for path in NOTEBOOKS
           for i, cell in enumerate(json.loads(path.read_text())["cells"])
           if cell["cell_type"] == "code" and cell_source(cell).startswith("# sync:")]
    assert not old, f"`# sync:` is the old convention (outputs compared); write `# derives:` instead: {old}"
