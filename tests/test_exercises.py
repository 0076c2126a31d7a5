"""Exercises: each notebook's solutions pass the notebook's own checks, and the committed cells are empty.

A notebook's exercise N is a markdown cell opening with `### Exercise N`, an EMPTY code cell for the learner,
and a check cell that prints `Exercise N: correct` or says what is wrong (`Exercise N: not tried yet` while
the cell is empty, so the headless run of tests/test_notebooks.py passes). The solutions live apart, in
`notebooks/solutions/<notebook stem>.py`: one `# %% Exercise N` block per exercise, the content of that
empty cell.

This test puts every block into its cell and executes the notebook in a fresh kernel (small configuration,
the notebook folder as working directory), then reads each check cell's output.

Design choices
- The checks are the notebook's own cells, not a copy: a solution passes exactly what a learner's answer
  must pass, and a check that stops recognising the right answer fails here.
- A notebook whose exercise section opens with a code cell starting `# Exercise setup` is self-contained
  from there to its last check: only that part runs (CI time: notebooks 05 and 06 train models before it).
  Other notebooks run whole.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SOLUTIONS = NOTEBOOKS / "solutions"
HEADING = re.compile(r"^###\s+Exercise\s+(\d+)\b")
SETUP_MARK = "# Exercise setup"


def source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def solution_blocks(path: Path) -> dict[int, str]:
    """{N: code} from the `# %% Exercise N` blocks of a solutions file."""
    blocks: dict[int, str] = {}
    current = None
    for line in path.read_text().splitlines(keepends=True):
        match = re.match(r"#\s*%%\s*Exercise\s+(\d+)", line)
        if match:
            current = int(match.group(1))
            assert current not in blocks, f"{path.name}: two blocks for exercise {current}"
            blocks[current] = ""
        elif current is not None:
            blocks[current] += line
    return {n: code.strip("\n") + "\n" for n, code in blocks.items()}


def exercise_cells(cells) -> dict[int, int]:
    """{N: index of the first empty code cell after the `### Exercise N` heading}."""
    found, current = {}, None
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "markdown":
            match = HEADING.match(source(cell).lstrip())
            if match:
                current = int(match.group(1))
        elif current is not None and current not in found and not source(cell).strip():
            found[current] = i
    return found


def checked_exercises(cells) -> set[int]:
    """The exercise numbers some code cell reports on (`Exercise N:` in its text)."""
    return {int(n) for cell in cells if cell["cell_type"] == "code"
            for n in re.findall(r"Exercise (\d+):", source(cell))}


PAIRS = sorted((NOTEBOOKS / f"{p.stem}.ipynb", p) for p in SOLUTIONS.glob("[0-9][0-9]_*.py"))


def test_every_solutions_file_has_its_notebook():
    for notebook, solutions in PAIRS:
        assert notebook.is_file(), f"{solutions.relative_to(ROOT)}: no notebook {notebook.name}"


@pytest.mark.parametrize("notebook, solutions", PAIRS, ids=lambda p: p.stem)
def test_committed_exercises_are_empty_and_checked(notebook, solutions):
    cells = json.loads(notebook.read_text())["cells"]
    blocks = solution_blocks(solutions)
    empty = exercise_cells(cells)
    assert len(blocks) >= 2, f"{solutions.name}: {len(blocks)} solutions; every notebook has at least two exercises"
    for n in blocks:
        assert n in empty, (f"{notebook.name}: exercise {n} has a solution but no `### Exercise {n}` heading "
                            f"followed by an empty code cell")
        assert n in checked_exercises(cells[empty[n] + 1:]), f"{notebook.name}: no check cell prints `Exercise {n}:`"
    missing = set(empty) - set(blocks)
    assert not missing, f"{solutions.name}: no `# %% Exercise N` block for exercises {sorted(missing)}"


def with_solutions(cells, blocks):
    """The notebook's cells with every exercise's empty cell filled in, cut to the self-contained section."""
    cells = [dict(cell) for cell in cells]
    for n, index in exercise_cells(cells).items():
        cells[index]["source"] = blocks[n]
    start = next((i for i, cell in enumerate(cells)
                  if cell["cell_type"] == "code" and source(cell).startswith(SETUP_MARK)), None)
    if start is None:
        return cells
    last_check = max(i for i, cell in enumerate(cells)
                     if cell["cell_type"] == "code" and re.search(r"Exercise \d+:", source(cell)))
    return cells[start:last_check + 1]


@pytest.mark.notebooks
@pytest.mark.parametrize("notebook, solutions", PAIRS, ids=lambda p: p.stem)
def test_solutions_pass_the_notebook_checks(notebook, solutions, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    blocks = solution_blocks(solutions)
    nb.cells = [nbformat.from_dict(c) for c in with_solutions([dict(c) for c in nb.cells], blocks)]
    monkeypatch.setenv("TWLAB_SMALL", "1")
    NotebookClient(nb, timeout=240, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    printed = "\n".join("".join(o.get("text", "")) for cell in nb.cells if cell.cell_type == "code"
                        for o in cell.get("outputs", []) if o.get("output_type") == "stream")
    for n in sorted(blocks):
        lines = [line for line in printed.splitlines() if line.startswith(f"Exercise {n}:")]
        assert lines, f"{notebook.name}: the check of exercise {n} printed nothing"
        assert all(line.startswith(f"Exercise {n}: correct") for line in lines), \
            f"{notebook.name}: with {solutions.name}'s block the check says: {lines}"


def test_the_cell_finder_reads_headings_and_empty_cells():
    cells = [{"cell_type": "markdown", "source": "### Exercise 1: a"}, {"cell_type": "code", "source": "x = 1"},
             {"cell_type": "code", "source": ""}, {"cell_type": "code", "source": "print('Exercise 1: correct')"},
             {"cell_type": "markdown", "source": "### Exercise 2\n"}, {"cell_type": "code", "source": "\n"}]
    assert exercise_cells(cells) == {1: 2, 2: 5}
    assert checked_exercises(cells) == {1}
    filled = with_solutions(cells, {1: "a = 1\n", 2: "b = 2\n"})
    assert [source(c) for c in filled][2] == "a = 1\n" and source(filled[5]) == "b = 2\n"
    assert source(cells[2]) == ""   # the committed cells are not touched
