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


BENCHMARKS = ROOT / "assets" / "benchmarks"


def read_benchmark(name: str) -> dict:
    """assets/benchmarks/NAME.json, written by `benchmarks/NAME.py --out` (benchmarks/result_file.py)."""
    path = BENCHMARKS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path.relative_to(ROOT)}: missing; run benchmarks/{name}.py --out {path.relative_to(ROOT)}")
    record = json.loads(path.read_text())
    for field in ("command", "date", "machine", "load_1min_before", "load_1min_after", "rows"):
        if field not in record:
            raise KeyError(f"{path.relative_to(ROOT)}: no field {field!r}")
    return record


def measured_on(record: dict) -> str:
    """The sentence under a benchmark: its command, date, machine and how busy the machine was."""
    m = record["machine"]
    before, after = record["load_1min_before"], record["load_1min_after"]
    load = ("load average not available" if before is None else
            f"1-minute load average {before:.2f} before the run, {after:.2f} after ({m['usable_cpus']} cores: above "
            f"{m['usable_cpus']}, jobs wait for a core; the machine is shared with other work)")
    nice = f", nice {m['niceness']}" if m.get("niceness") else ""
    engine = record.get("setup", {}).get("engine_threads")
    threads = f"HFEngine decoding on {engine} torch thread{'s' if engine > 1 else ''}" if engine else f"{m['torch_threads']} torch threads"
    return (f"Measured {record['date'][:16].replace('T', ' ')} UTC with `{record['command']}`{nice}: "
            f"{m['usable_cpus']}-core {m['cpu_model']} CPU, {m['platform']}, torch {m['torch']}, "
            f"{threads}; {load}.")


def size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.{1 if nbytes < 2**24 else 0}f} MiB"


def bench_trie() -> str:
    r = read_benchmark("trie")
    lines = ["| response tokens | calls | tokens, calls run separately | trie tokens | separate/trie | dense float mask | "
             "block mask | pack time | block mask time |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        pack = f"{row['pack_ms']:.0f} ms" if row["pack_ms"] < 1000 else f"{row['pack_ms'] / 1000:.2f} s"
        lines.append(f"| {row['response_tokens']:,} | {row['calls']} | {row['separate_tokens']:,} | {row['trie_tokens']:,} | "
                     f"{row['separate_over_trie']:.1f}x | {size(row['dense_mask_bytes'])} | "
                     f"{row['block_mask_bytes'] / 2**20:.2f} MiB | {pack} | {row['block_mask_ms']:.0f} ms |")
    per_token = [row["pack_us_per_token"] for row in r["rows"]]
    lines += ["", f"Packing costs {min(per_token):.2f}-{max(per_token):.2f} µs per call token at every size (linear "
                  f"time). {measured_on(r)}"]
    return "\n".join(lines)


def bench_decode() -> str:
    r = read_benchmark("decode")
    setup = r["setup"]
    lines = [f"{setup['n']} {setup['task']} problems one at a time, greedy, `{Path(setup['parallel']).name}` (ways 2-4) vs "
             f"`{Path(setup['sequential']).name}` (way 1):", "",
             "| way | wall s | generated | prefill | decode steps | accuracy | token-latency x | wall-clock x | wall / token |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['way']} | {row['wall_s']:.1f} | {row['generated_tokens']:,} | {row['prefill_tokens']:,} | "
                     f"{row['decode_steps']:,} | {100 * row['accuracy']:.1f}% | {row['token_latency_x']:.2f} | "
                     f"{row['wall_clock_x']:.2f} | {row['wall_per_token']:.2f} |")
    lines += ["", measured_on(r)]
    return "\n".join(lines)


def bench_pgrpo() -> str:
    r = read_benchmark("pgrpo")
    setup, roll = r["setup"], r["rollouts"]
    lines = [f"One real batch of {setup['prompts']} prompts x {setup['k']} rollouts sampled from `{Path(setup['model']).name}` "
             f"({roll['distinct']} of the {roll['count']} differ within their prompt group, "
             f"{roll['calls_per_rollout']:.1f} engine calls per rollout, mean reward {roll['mean_reward']:.3f}, sampled in "
             f"{roll['sample_s']:.0f} s), then the same update (loss + backward, rows of up to {setup['row_tokens']:,} "
             f"tokens) three ways; update time is the fastest of {setup['repeats']}:", "",
             "| packing | rows x length | tokens processed | completion tokens | loss | update s (slowest repeat) | "
             "tokens vs call | speed-up vs call |", "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['packing']} | {row['rows']} x {row['row_length']:,} | {row['tokens']:,} | "
                     f"{row['completion_tokens']:,} | {row['loss']:.6f} | {row['update_s']:.2f} ({max(row['update_s_repeats']):.2f}) | "
                     f"{row['tokens_vs_call']:.2f} | {row['speedup_vs_call']:.2f}x |")
    lines += ["", measured_on(r)]
    return "\n".join(lines)


def bench_engines() -> str:
    r = read_benchmark("engines")
    setup = r["setup"]
    lines = [f"{setup['n']} held-out problems (`{setup['config']}`), batch size 1, greedy, `{Path(setup['model']).name}`, "
             f"max {setup['max_new_tokens']} new tokens:", "",
             "| engine | decoder | wall s | tokens | critical path | accuracy | text = hf | seq/par |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        ratio = "" if row["seq_over_par"] is None else f"{row['seq_over_par']:.2f}x"
        lines.append(f"| {row['engine']} | {row['decoder']} | {row['wall_s']:.2f} | {row['tokens']:,} | "
                     f"{row['critical_path']:.1f} | {100 * row['accuracy']:.1f}% | {row['equal_to_hf']}/{setup['n']} | {ratio} |")
    lines += ["", measured_on(r)]
    return "\n".join(lines)


TABLES = {"main": main_table, "arc": arc_table, "claims": claims_table, "timing": timing_line, "seeds": seeds_table,
          "pgrpo": pgrpo_table, "probe": probe_table,
          "notebooks": notebooks_table, "bench_trie": bench_trie, "bench_decode": bench_decode,
          "bench_pgrpo": bench_pgrpo, "bench_engines": bench_engines}
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
