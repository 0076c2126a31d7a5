"""Where a tiny groupsum model goes wrong: teacher-forced error rate per kind of response token, and item
copies in decoded outputs. The numbers behind the README's diagnosis.

    .venv/bin/python scripts/diagnose_lookups.py --model assets/checkpoints/tiny-base [--n 200]
    .venv/bin/python scripts/diagnose_lookups.py --decoded assets/results/eval_parallel.csv

1. `--model`: the sequential trajectory of each of the first `n` held-out problems is fed whole (teacher
   forcing); the greedy prediction of every response token is compared with the truth and counted per kind:
   `item` (the digit copied from the question after a label, `k1` -> `1`; for the item-token tokenizer the
   whole `k1` token), `label`, `prev`/`result` (running-sum operands and results), `group_result`, `answer`
   (digits inside `\\boxed{}`), `other`. Wrong items are also checked against the digits of the two labels
   on each side (`neighbour`).
2. `--decoded`: per-problem rows written by the pipeline (`twlib.eval.write_rows`): the fraction of group
   result lines and of item copies in the decoded texts that are right, and exact answers per group count.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

STEP = re.compile(r"^(?:\d+:)?(?:[A-Z]:)?([a-z])(\d):(\d)\+(\d)=(\d)$")


def token_kinds(text: str, start: int) -> dict[int, str]:
    """Kind of every character position of `text` from `start` on (one char = one byte-level unit)."""
    kinds = {}
    pos = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        m = STEP.match(body)
        for col in range(len(line)):
            at = pos + col
            if at < start:
                continue
            kind = "other"
            if m:
                off = m.start(1)
                kind = {off: "label", off + 1: "item", off + 3: "prev", off + 7: "result"}.get(col, "other")
            elif re.match(r"^[A-Z]=\d$", body) and col == 2:
                kind = "group_result"
            elif "boxed" in body and col < len(body) and body[col].isdigit():
                kind = "answer"
            kinds[at] = kind
        pos += len(line)
    return kinds


def teacher_forced(model_dir: str, n: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from twlib.train.sft import eval_problems, load_config, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    problems = eval_problems(load_config("configs/tiny-base.yaml"))[:n]
    total, wrong, neighbour = Counter(), Counter(), 0
    for p in problems:
        text = p.prompt + p.sequential
        ids = tok.encode(text, add_special_tokens=False)
        starts, at = [], 0
        for i in ids:  # character offset of every token
            starts.append(at)
            at += len(tok.decode([i], skip_special_tokens=False))
        n_prompt = len(tok.encode(p.prompt, add_special_tokens=False))
        kinds = token_kinds(text, len(p.prompt))
        with torch.no_grad():
            pred = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
        digits = dict(re.findall(r"([a-z])(\d)", p.question))
        for t in range(n_prompt, len(ids)):
            piece = tok.decode([ids[t]], skip_special_tokens=False)
            kind = "item" if re.fullmatch(r"[a-z]\d", piece) else kinds.get(starts[t], "other")
            total[kind] += 1
            if pred[t - 1] != ids[t]:
                wrong[kind] += 1
                if kind == "item":
                    label = text[starts[t] - 1] if len(piece) == 1 else piece[0]
                    guess = tok.decode([pred[t - 1]], skip_special_tokens=False)[-1:]
                    near = {digits.get(chr(ord(label) + d)) for d in (-2, -1, 1, 2)}
                    neighbour += guess in near
    print(f"{model_dir}: teacher-forced errors on {len(problems)} held-out problems")
    for kind in sorted(total):
        print(f"  {kind:<13} {total[kind]:>7} tokens  {100 * wrong[kind] / total[kind]:6.2f}% wrong")
    if wrong["item"]:
        print(f"  wrong items equal to a neighbouring label's digit (+-2): {100 * neighbour / wrong['item']:.0f}%")


def decoded(path: str) -> None:
    from twlib.eval import accuracy_by_k, read_rows
    from twlib.train.sft import eval_problems, load_config

    problems = {p.id: p for p in eval_problems(load_config("configs/tiny-base.yaml"))}
    groups = groups_ok = steps = steps_ok = 0
    rows = read_rows(path)
    for r in rows:
        p = problems[r.id]
        for g, value in enumerate(p.meta["group_results"]):
            found = re.findall(rf"^{chr(65 + g)}=(\d)$", r.text, re.M)
            groups += 1
            groups_ok += bool(found) and int(found[-1]) == value
        digits = dict(re.findall(r"([a-z])(\d)", p.question))
        for line in r.text.splitlines():
            m = STEP.match(line)
            if m:
                steps += 1
                steps_ok += digits.get(m.group(1)) == m.group(2)
    print(f"{path}: group results right {100 * groups_ok / groups:.1f}%, item copies right "
          f"{100 * steps_ok / max(steps, 1):.1f}% ({steps} steps); exact answers by groups: "
          + ", ".join(f"k={k} {right}/{total}" for k, (right, total) in accuracy_by_k(rows).items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--decoded", action="append", default=[])
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args(argv)
    for m in args.model:
        teacher_forced(m, args.n)
    for d in args.decoded:
        decoded(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
