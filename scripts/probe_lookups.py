"""Does a model find a group's items by name, or by place? Teacher-forced item copies in moved contexts.

    .venv/bin/python scripts/probe_lookups.py --model assets/checkpoints/tiny-base [--model DIR ...] \
        [--n 120] [--out assets/results/lookup_probe.csv]

For the first `n` held-out problems with 3+ groups, one group's reasoning section (`B:e7:0+7=7\\n...`) is
fed whole after a context, and every item digit the model predicts (the digit after a label, copied from
the question) is compared with the truth. Contexts:
- `in place`: the sections before it, as in the sequential trajectory (group 2 after group 1);
- `first`: the reasoning starts at this group (group 2 right after `<think>\\n`);
- `thread n`: after a parallel block's outline header and `<Thread>\\n{n}:`, as in decoding (group n).
A model that copies by place gets `in place` right and the rest wrong; one that finds a group by its name
gets all of them. The README's "Why the base matters" quotes this script's CSV.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

STEP = re.compile(r"([a-z])(\d):(\d)\+(\d)=(\d)")


def sections(response: str) -> list[str]:
    """The group sections of a sequential response, in order."""
    body = response[len("<think>\n"):response.index("</think>")]
    out, cur = [], ""
    for line in body.splitlines(keepends=True):
        cur += line
        if re.match(r"^[A-Z]=\d\n$", line):
            out.append(cur)
            cur = ""
    return out


def outline_header(k: int) -> str:
    return "<Parallel>\n<Outlines>\n" + "".join(f"<Outline>{i}:{chr(64 + i)}</Outline>\n"
                                              for i in range(1, k + 1)) + "</Outlines>\n"


CONTEXTS = {
    "in place": lambda p, s: (p.prompt + "<think>\n" + s[0], s[1]),
    "first": lambda p, s: (p.prompt + "<think>\n", s[1]),
    "thread 1": lambda p, s: (p.prompt + "<think>\n" + outline_header(len(s)) + "<Thread>\n1:", s[0]),
    "thread 2": lambda p, s: (p.prompt + "<think>\n" + outline_header(len(s)) + "<Thread>\n2:", s[1]),
    "thread 3": lambda p, s: (p.prompt + "<think>\n" + outline_header(len(s)) + "<Thread>\n3:", s[2]),
}


def item_errors(model, tokenizer, prefix: str, target: str) -> tuple[int, int]:
    import torch

    ids = tokenizer.encode(prefix, add_special_tokens=False)
    tgt = tokenizer.encode(target, add_special_tokens=False)
    with torch.no_grad():
        pred = model(torch.tensor([ids + tgt])).logits[0].argmax(-1)
    wrong = total = 0
    for m in STEP.finditer(target):  # one token per character in the target (no tags in it)
        i = m.start(2)
        total += 1
        wrong += int(pred[len(ids) + i - 1].item() != tgt[i])
    return wrong, total


def probe(model_dir: str, problems) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from twlib.train.sft import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = []
    for name, make in CONTEXTS.items():
        wrong = total = 0
        for p in problems:
            prefix, target = make(p, sections(p.sequential))
            w, t = item_errors(model, tokenizer, prefix, target)
            wrong, total = wrong + w, total + t
        rows.append({"model": model_dir, "context": name, "items": total, "wrong": wrong,
                     "error_pct": round(100 * wrong / total, 1)})
        print(f"{model_dir}: {name:<9} item errors {100 * wrong / total:5.1f}% of {total}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--n", type=int, default=120, help="problems with 3+ groups")
    parser.add_argument("--config", default="configs/tiny-parallel.yaml", help="defines the held-out split")
    parser.add_argument("--question-order", default=None, choices=["groups", "shuffled"],
                        help="override the task's question layout (the first recipes' models: groups)")
    parser.add_argument("--out", default=None, help="CSV of the error rates (appended to if it exists)")
    args = parser.parse_args(argv)
    from twlib.train.sft import eval_problems, load_config

    config = load_config(args.config)
    if args.question_order:
        config.task_options = {**config.task_options, "question_order": args.question_order}
    order = config.task_options.get("question_order", "shuffled")
    problems = [p for p in eval_problems(config) if p.meta["k"] >= 3][: args.n]
    rows = [{**row, "questions": order} for model in args.model for row in probe(model, problems)]
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        new = not out.is_file()
        with out.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
