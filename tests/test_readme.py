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
    assert {name for _, name, _, _ in blocks} >= {"main", "claims", "timing", "seeds", "pgrpo", "probe",
                                                   "bench_trie", "bench_decode", "bench_pgrpo", "bench_engines"}
    assert tables.render(readme) == readme, "run: .venv/bin/python scripts/readme_tables.py --write"


def test_a_changed_number_is_caught():
    tables = load_script()
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- table:main -->")
    tampered = readme[:start] + readme[start:].replace("%", "0%", 1)
    assert tables.render(tampered) != tampered


def test_a_changed_benchmark_number_is_caught():
    """README's benchmark section comes from assets/benchmarks/*.json: a digit typed into a block is caught."""
    import re

    tables = load_script()
    readme = (ROOT / "README.md").read_text()
    for name in ("bench_trie", "bench_decode", "bench_pgrpo", "bench_engines"):
        start = readme.index(f"<!-- table:{name} -->\n") + len(f"<!-- table:{name} -->\n")
        tampered = readme[:start] + re.sub(r"\d", lambda m: "9" + m.group(0), readme[start:], count=1)
        assert tables.render(tampered) != tampered, name


def test_the_notebook_table_reads_measured_times():
    """README's notebook table comes from assets/notebook_times.csv, written by scripts/run_notebooks.py --times;
    every small-configuration time fits CI's three minutes per notebook."""
    import csv

    assert "<!-- table:notebooks -->" in (ROOT / "README.md").read_text()
    with (ROOT / "assets" / "notebook_times.csv").open() as f:
        rows = list(csv.DictReader(f))
    stems = {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert rows, "assets/notebook_times.csv is empty"
    for r in rows:
        assert r["notebook"] in stems, f"assets/notebook_times.csv: no notebook {r['notebook']}"
        assert r["config"] in ("small", "full"), f"assets/notebook_times.csv: config {r['config']!r}"
        assert float(r["seconds"]) > 0
        if r["config"] == "small":
            assert float(r["seconds"]) < 180, f"{r['notebook']} took {r['seconds']} s in the small configuration"
    assert {r["notebook"] for r in rows if r["config"] == "small"} >= {s for s in stems if s[:2] <= "04"}
