"""Strip outputs, execution counts and widget state from notebooks (run before committing).

Cells without an id (nbformat 4.5 asks for one; a cell pasted in by hand may lack it) get a new one.

    python scripts/strip_notebooks.py            # every notebooks/*.ipynb
    python scripts/strip_notebooks.py a.ipynb    # given files
"""

import json
import sys
from pathlib import Path


def strip(path: Path) -> bool:
    nb = json.loads(path.read_text())
    before = json.dumps(nb, sort_keys=True)
    ids = {cell.get("id") for cell in nb["cells"]}
    for i, cell in enumerate(nb["cells"]):
        if "id" not in cell and nb.get("nbformat_minor", 0) >= 5:
            cell["id"] = next(f"cell-{i}-{n}" for n in range(len(ids) + 1) if f"cell-{i}-{n}" not in ids)
            ids.add(cell["id"])
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        cell.get("metadata", {}).pop("execution", None)
    nb.get("metadata", {}).pop("widgets", None)
    nb["metadata"]["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    changed = json.dumps(nb, sort_keys=True) != before
    if changed:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return changed


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    paths = [Path(p) for p in sys.argv[1:]] or sorted((root / "notebooks").glob("*.ipynb"))
    for p in paths:
        print(("stripped " if strip(p) else "clean    ") + str(p))
