"""Every result table in README.md is rendered from the committed result files (scripts/readme_tables.py)."""

from pathlib import Path

from helpers import load_script as load

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    return load("readme_tables")


def test_readme_tables_match_the_result_files():
    tables = load_script()
    readme = (ROOT / "README.md").read_text()
    blocks = tables.BLOCK.findall(readme)
    assert {name for _, name, _, _ in blocks} >= {"main", "claims", "timing", "seeds", "pgrpo", "probe"}
    assert tables.render(readme) == readme, "run: .venv/bin/python scripts/readme_tables.py --write"


def test_a_changed_number_is_caught():
    tables = load_script()
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- table:main -->")
    tampered = readme[:start] + readme[start:].replace("%", "0%", 1)
    assert tables.render(tampered) != tampered
