"""The library's layout stays one a reader can hold (issue 14).

- No underscore name crosses a module boundary: no `from twlib.x import _name`, no `x._name` on an imported
  twlib module. A private name is private to its module; what two modules share gets a public name.
- No import cycle among twlib modules, neither through module-level imports nor through imports placed
  inside functions (those hide a cycle from Python, not from a reader; keep them for heavy optional
  dependencies such as vllm, peft, flex attention).
- No twlib module over MAX_LINES lines, except those listed in LONG_MODULES with the reason.

Run as a script for the numbers: `python tests/test_layout.py` (lines per module, long functions, the
import graph's cycles and the cross-module private names).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "twlib"
MAX_LINES = 600
MAX_FUNCTION_LINES = 80
# module -> why it may be longer than MAX_LINES (keep this list short and the reasons honest)
LONG_MODULES: dict[str, str] = {}
# "module.function" -> why it may be longer than MAX_FUNCTION_LINES
LONG_FUNCTIONS: dict[str, str] = {
    "twlib.decoding._machine": "the 5-phase state machine, read as one function beside notebook 03 (a lesson "
                               "module of issue 15)",
    "twlib.viz.token_view_figure": "one plotly figure built in order (a lesson module of issue 15)",
}


def module_files() -> dict[str, Path]:
    """twlib module name -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve_from(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, top_level_only: bool):
    """Yield (imported module, imported name or None, node) for the twlib imports of a file."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    is_package = path.name == "__init__.py"
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "twlib" or alias.name.startswith("twlib."):
                    yield alias.name, None, node, alias
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(module, node, is_package)
            if target and (target == "twlib" or target.startswith("twlib.")):
                for alias in node.names:
                    yield target, alias.name, node, alias


def private_uses(modules: dict[str, Path]) -> list[str]:
    """`file:line: what` for every underscore name used outside the twlib module that defines it."""
    problems = []
    for module, path in modules.items():
        aliases = {}  # local name -> twlib module it refers to
        for target, name, node, alias in imports(module, path, top_level_only=False):
            if name is None:
                aliases[alias.asname or target.split(".")[0]] = target if alias.asname else "twlib"
                continue
            full = f"{target}.{name}"
            if full in modules:  # `from twlib import sft`: a module
                aliases[alias.asname or name] = full
            elif name.startswith("_") and not name.startswith("__") and target != module:
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {target} import {name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if not isinstance(base, ast.Name) or base.id not in aliases:
                continue
            owner = ".".join([aliases[base.id], *reversed(chain[1:])])
            if owner in modules and owner != module:
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner}.{node.attr}")
    return problems


def import_graph(modules: dict[str, Path], top_level_only: bool = True) -> dict[str, set[str]]:
    """Module-level twlib imports: module -> the twlib modules it imports (`from twlib.x import y` -> x,
    or x.y when y is itself a module). A package's own __init__ is not an edge (importing any submodule
    runs it)."""
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for target, name, _, _ in imports(module, path, top_level_only):
            dep = f"{target}.{name}" if name and f"{target}.{name}" in modules else target
            if dep in modules and dep != module and dep != "twlib":
                graph[module].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def line_counts(modules: dict[str, Path]) -> dict[str, int]:
    return {m: len(p.read_text().splitlines()) for m, p in modules.items()}


def long_functions(modules: dict[str, Path], limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    out = {}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out[f"{module}.{node.name}"] = n
    return out


def test_no_private_name_crosses_a_module():
    problems = private_uses(module_files())
    assert not problems, "underscore names used outside their module (give them a public name):\n" + \
        "\n".join(problems)


def test_no_import_cycle_at_module_level():
    found = cycles(import_graph(module_files()))
    assert not found, f"import cycles among twlib modules (module-level imports): {found}"


def test_no_import_cycle_hidden_in_functions():
    """Counting the imports placed inside functions too: moving an import into a function hides a cycle
    from Python, not from a reader."""
    found = cycles(import_graph(module_files(), top_level_only=False))
    assert not found, f"import cycles among twlib modules (imports inside functions counted): {found}"


def test_exceptions_are_still_needed():
    """An exception whose module or function got short (or went away) is taken off the list."""
    counts, functions = line_counts(module_files()), long_functions(module_files())
    stale = [m for m in LONG_MODULES if counts.get(m, 0) <= MAX_LINES]
    stale += [f for f in LONG_FUNCTIONS if f not in functions]
    assert not stale, f"no longer needed in LONG_MODULES / LONG_FUNCTIONS: {stale}"


def test_modules_stay_short():
    counts = line_counts(module_files())
    over = {m: n for m, n in counts.items() if n > MAX_LINES and m not in LONG_MODULES}
    assert not over, f"modules over {MAX_LINES} lines (split them, or list one in LONG_MODULES with a reason): {over}"


def test_functions_stay_short():
    over = {f: n for f, n in long_functions(module_files()).items() if f not in LONG_FUNCTIONS}
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines (split them, or list one in LONG_FUNCTIONS): {over}"


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """The detectors find a private import, a private attribute use and a cycle in a made-up package."""
    pkg = tmp_path / "twlib"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from twlib.b import _hidden\nfrom twlib import b\nx = b._other\n")
    (pkg / "b.py").write_text("import twlib.a\n_hidden = _other = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    modules = module_files()
    found = private_uses(modules)
    assert any("import _hidden" in p for p in found) and any("twlib.b._other" in p for p in found), found
    assert cycles(import_graph(modules)) == [["twlib.a", "twlib.b"]]


def report() -> str:
    modules = module_files()
    counts = line_counts(modules)
    lines = ["lines per module:"] + [f"  {m:34s} {n:5d}" for m, n in counts.items()]
    lines.append(f"  {'total':34s} {sum(counts.values()):5d} in {len(counts)} modules")
    lines.append(f"functions over {MAX_FUNCTION_LINES} lines:")
    lines += [f"  {f}: {n}" for f, n in long_functions(modules).items()] or ["  none"]
    lines.append(f"import cycles, module-level imports: {cycles(import_graph(modules)) or 'none'}")
    lines.append(f"import cycles, counting imports inside functions too: "
                 f"{cycles(import_graph(modules, top_level_only=False)) or 'none'}")
    inner = sum(len({id(x[2]) for x in imports(m, p, False)}) - len({id(x[2]) for x in imports(m, p, True)})
                for m, p in modules.items())
    lines.append(f"twlib imports placed inside functions: {inner}")
    private = private_uses(modules)
    lines.append(f"underscore names used outside their module: {len(private)}")
    lines += [f"  {p}" for p in private]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
