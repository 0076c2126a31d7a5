"""The README's result tables, rendered from the committed result files (no number is typed by hand).

    .venv/bin/python scripts/readme_tables.py --write     # regenerate every marked block in README.md
    .venv/bin/python scripts/readme_tables.py --check     # exit 1 if README.md differs (tests/test_readme.py)

A block in README.md is delimited by `<!-- table:NAME -->` and `<!-- /table -->`; NAME is one of TABLES.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "assets" / "results"
NAMES = {"base": "base (shipped)", "parallel": "stage 1: trie SFT (mix)", "pgrpo": "**+ P-GRPO (final)**",
         "sequential": "sequential SFT", "causal": "causal (leakage ablation)",
         "parallel_forced": "stage 1, forced to open a block", "causal_forced": "causal, forced to open a block"}


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def num(value, fmt: str, empty: str = "") -> str:
    return empty if value in ("", None) else fmt.format(float(value))


def main_table() -> str:
    rows = {r["model"]: r for r in read_csv(RESULTS / "results.csv")}
    lines = ["| model | accuracy | format valid | parallel (k > 1) | token latency | mean speed-up | max | "
             "s/problem (batch 1) | training (min) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("base", "parallel", "pgrpo", "sequential", "causal", "parallel_forced", "causal_forced"):
        r = rows[name]
        lines.append(f"| {NAMES[name]} | {num(r['accuracy'], '{:.1f}%')} | {num(r['format_valid'], '{:.1f}%')} | "
                     f"{num(r['multi_group_parallel'], '{:.1f}%')} | {num(r['token_latency'], '{:.1f}')} | "
                     f"{num(r['speedup_mean'], '{:.2f}x')} | {num(r['speedup_max'], '{:.2f}x')} | "
                     f"{num(r.get('wall_s_per_problem'), '{:.3f}')} | {num(r.get('train_min'), '{:.1f}')} |")
    return "\n".join(lines)


def claims_table() -> str:
    shipped = json.loads((RESULTS / "claims.json").read_text())
    lines = ["| claim | verdict | measured |", "|---|---|---|"]
    for c in shipped["claims"]:
        measured = ", ".join(f"{k} {v:.2f}" for k, v in c["measured"].items())
        lines.append(f"| {c['name']} | **{c['verdict']}** | {measured} |")
    lines.append("")
    lines.append("Rules (`twlib.claims.ClaimRules`):")
    lines += [f"- {rule}" for rule in shipped["rules"]]
    return "\n".join(lines)


def timing_line() -> str:
    log = (RESULTS / "pipeline.log").read_text()
    stages = re.findall(r"^\[(\w+)\] (\d+) steps.*?, ([\d.]+) min", log, re.M)
    evals = re.findall(r"^\[eval\] (\w+) .*\((\d+) s\)$", log, re.M)
    total = re.findall(r"total ([\d.]+) min$", log, re.M)[-1]
    parts = ", ".join(f"{name} {minutes} min" for name, _, minutes in stages)
    ev = sum(int(s) for _, s in evals)
    return (f"Total {total} min: training {parts}; greedy evaluation ({len(evals)} decodes of the held-out "
            f"problems) {ev} s; the rest is loading, the oracle table and wall clock at batch 1.")


def seeds_table() -> str:
    lines = ["| seed | stage 1 accuracy | final accuracy | sequential | speed-up: stage 1 -> final | "
             "parallel (k > 1): stage 1 -> final | wall clock | C1 | C2 | C3 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in read_csv(RESULTS / "seeds.csv"):
        lines.append(f"| {r['seed']} | {num(r['accuracy_parallel'], '{:.1f}%')} | {num(r['accuracy_pgrpo'], '{:.1f}%')} | "
                     f"{num(r['accuracy_sequential'], '{:.1f}%')} | {num(r['speedup_parallel'], '{:.2f}x')} -> "
                     f"{num(r['speedup_pgrpo'], '{:.2f}x')} | {num(r['multi_group_parallel_parallel'], '{:.1f}%')} -> "
                     f"{num(r['multi_group_parallel_pgrpo'], '{:.1f}%')} | {num(r['wall_clock_speedup'], '{:.2f}x')} | "
                     f"{r['C1']} | {r['C2']} | {r['C3']} |")
    return "\n".join(lines)


def pgrpo_table() -> str:
    names = {"sft-parallel": "stage 1: trie SFT (mix)", "pgrpo": "P-GRPO", "pgrpo-std": "P-GRPO, std-normalised",
             "pgrpo-rho0": "P-GRPO without acceleration (rho = 0)", "sft-sequential": "sequential SFT",
             "grpo-sequential": "GRPO on the sequential model", "pgrpo-lr3e-5": "P-GRPO, lr 3e-5",
             "pgrpo-lr3e-4": "P-GRPO, lr 3e-4"}
    lines = ["| model | accuracy | parallel (k > 1) | token latency | mean speed-up vs sequential SFT | training (min) |",
             "|---|---|---|---|---|---|"]
    for r in read_csv(ROOT / "assets" / "pgrpo" / "results.csv"):
        lines.append(f"| {names.get(r['model'], r['model'])} | {num(r['accuracy'], '{:.1f}%')} | "
                     f"{num(r['multi_group_parallel'], '{:.1f}%')} | {num(r['token_latency'], '{:.1f}')} | "
                     f"{num(r['speedup_vs_sft_sequential'], '{:.2f}x')} | {num(r['train_min'], '{:.1f}')} |")
    return "\n".join(lines)


def probe_table() -> str:
    rows = read_csv(RESULTS / "lookup_probe.csv")
    contexts = list(dict.fromkeys(r["context"] for r in rows))
    lines = ["| model (questions) | " + " | ".join(contexts) + " |", "|---|" + "---|" * len(contexts)]
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = {r["context"]: r for r in rows if r["model"] == model}
        order = next(iter(cells.values()))["questions"]
        lines.append(f"| `{Path(model).name}` ({order}) | " + " | ".join(f"{float(cells[c]['error_pct']):.1f}%"
                                                                        for c in contexts) + " |")
    return "\n".join(lines)


def arc_table() -> str:
    lines = ["| arc (`python -m twlib arc ...`) | seed SFT | self-training pool | kept (with a block) | "
             "format: seed SFT -> 2nd SFT | accuracy: seed SFT -> 2nd SFT | decode (min) |", "|---|---|---|---|---|---|---|"]
    for path in sorted((ROOT / "assets" / "arc").glob("*.json")):
        r = json.loads(path.read_text())
        c, st = r["config"], r["self_train"]
        flags = f"--n-seed {c['n_seed']} --sft1-epochs {c['sft1_epochs']:g} --n-pool {c['n_pool']}"
        if r["keep"] != "format+correct":
            flags += " --keep format"
        lines.append(f"| `{flags}` (`{path.name}`) | {c['n_seed']} x {c['sft1_epochs']:g} epochs | {st['counts']['prompts']:,}, "
                     f"keep {r['keep'].replace('+', ' AND ')} | {st['counts']['kept']:,} "
                     f"({100 * st['stats']['parallel_ratio']:.0f}%) | {100 * r['sft1']['format_correct']:.1f}% -> "
                     f"{100 * r['sft2']['format_correct']:.1f}% | {100 * r['sft1']['accuracy']:.1f}% -> "
                     f"{100 * r['sft2']['accuracy']:.1f}% | {st['seconds'] / 60:.1f} |")
    p = json.loads(next((ROOT / "assets" / "arc").glob("*.json")).read_text())["paper_format_correct"]
    lines.append(f"| paper (Qwen3-8B) | 959 x 8 epochs | 53k, keep format-valid AND correct | 17,491 | "
                 f"{p['sft1']}% -> {p['sft2']}% | - | - |")
    return "\n".join(lines)


NOTEBOOK_TOPICS = {  # what a learner does in each notebook (words, no numbers)
    "00_overview": "the map: the idea, the format, the paper's numbers, the tiny task",
    "01_trajectory_format": "parse the format, derive the engine calls and the critical path",
    "02_trie_masking": "pack calls into a trie, derive the masks, prove exactness, explore the mask",
    "03_state_machine_decoding": "decode with the 5-phase state machine by hand, KV forking",
    "04_data_generation": "rewrite sequential traces into parallel ones, self-training",
    "05_trie_sft": "train with trie SFT",
    "06_pgrpo": "rewards, advantages and a short P-GRPO run",
    "07_evaluation": "measure: token latency, wall clock, speed-ups, the claims",
    "08_full_scale_qwen3_8b": "the full-scale recipe, command by command",
}


def notebook_needs(path: Path) -> str:
    """What a notebook reads besides the library, from its code cells (shipped checkpoints, results)."""
    nb = json.loads(path.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    needs = []
    if "checkpoints" in code:
        needs.append("shipped checkpoints")
    if re.search(r"assets\W+(results|pgrpo|arc|paper)", code):
        needs.append("shipped results")
    return ", ".join(needs) or "the library only"


def notebooks_table() -> str:
    times = {}
    path = ROOT / "assets" / "notebook_times.csv"
    if path.is_file():
        times = {(r["notebook"], r["config"]): r for r in read_csv(path)}
    cores = sorted({r["cpu_cores"] for r in times.values()})
    lines = [f"| notebook | what you do | runs in (small config) | runs in (full config) | needs |",
             "|---|---|---|---|---|"]
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = []
        for config in ("small", "full"):
            r = times.get((nb.stem, config))
            seconds = float(r["seconds"]) if r else None
            cells.append("not measured" if r is None else f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min")
        lines.append(f"| `{nb.name}` | {NOTEBOOK_TOPICS.get(nb.stem, '')} | {cells[0]} | {cells[1]} | "
                     f"{notebook_needs(nb)} |")
    if cores:
        lines.append("")
        loads = [float(r["load_1min"]) for r in times.values() if r.get("load_1min")]
        load = f", load average {min(loads):.1f} to {max(loads):.1f} (other work beside it)" if loads else ""
        lines.append(f"Times: `scripts/run_notebooks.py --times assets/notebook_times.csv` on a "
                     f"{'/'.join(cores)}-core CPU machine{load}, kernel start included.")
    return "\n".join(lines)


TABLES = {"main": main_table, "arc": arc_table, "claims": claims_table, "timing": timing_line, "seeds": seeds_table,
          "pgrpo": pgrpo_table, "probe": probe_table,
          "notebooks": notebooks_table}
BLOCK = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(readme: str) -> str:
    def fill(m):
        name = m.group(2)
        if name not in TABLES:
            raise KeyError(f"README.md: unknown table block {name!r}; known: {', '.join(TABLES)}")
        return m.group(1) + TABLES[name]() + "\n" + m.group(4)
    return BLOCK.sub(fill, readme)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    path = ROOT / "README.md"
    readme = path.read_text()
    new = render(readme)
    if args.write:
        path.write_text(new)
        print(f"README.md: {len(BLOCK.findall(new))} tables written")
    if args.check and new != readme:
        print("README.md tables differ from the result files: run scripts/readme_tables.py --write")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
