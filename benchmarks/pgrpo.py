"""P-GRPO update cost: one packed trie per prompt group vs one per rollout vs one row per engine call.

    .venv/bin/python benchmarks/pgrpo.py [--model assets/checkpoints/tiny-parallel] [--prompts 8] [--k 8]
        [--out assets/benchmarks/pgrpo.json]

Samples one real batch of rollouts (temperature 1.0, the state machine) from the model, then runs the same
P-GRPO update (loss + backward) on it three ways, side by side in one run:
- `group`: all calls of all k rollouts of a prompt in one trie (this project's default);
- `trajectory`: one trie per rollout (what the issue asks for at minimum);
- `call`: one row per engine call, the reference's layout (shared contexts recomputed per call).
It prints tokens processed (trie nodes), the loss (equal in all three, up to float rounding: the packing is
exact), and the time per update, with ratios against `call`. Rows are filled up to `--tokens` per row.
The default model is the shipped stage-1 model (tiny-parallel), the one P-GRPO starts from. `--out FILE`
writes every printed number, the command, date, machine and load average as JSON (result_file.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from result_file import ResultFile, repo_path
from twlib.train import pgrpo

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets/checkpoints/tiny-parallel"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192, help="row budget (tokens per packed row)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON result file (README renders assets/benchmarks/pgrpo.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recorder = ResultFile("pgrpo", argv)  # after set_num_threads: the file records the threads used

    cfg = pgrpo.PGRPOConfig(model=args.model, prompts_per_step=args.prompts, rollouts_per_prompt=args.k,
                            device="cpu", progress=False).validate()
    from twlib.checkpoint import load_base_model, load_tokenizer, resolve_runtime

    tok = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, tok, 0, resolve_runtime(cfg))
    problems = pgrpo.step_prompts(pgrpo.prompt_pool(cfg), cfg, step=0)
    t0 = time.perf_counter()
    rollouts = pgrpo.collect_rollouts(model, tok, problems, cfg, step=0)
    sample_s = time.perf_counter() - t0
    calls = sum(len(r.pairs) for r in rollouts) / len(rollouts)
    reward = sum(r.reward.total for r in rollouts) / len(rollouts)
    # identical rollouts of one prompt share every trie node: how many differ decides what `group` saves
    distinct = len({(r.group, r.result.text) for r in rollouts})
    print(f"model {args.model}: {len(rollouts)} rollouts ({args.prompts} prompts x {args.k}) sampled in "
          f"{sample_s:.1f}s; calls per rollout {calls:.1f}; mean reward {reward:.3f}; distinct rollouts {distinct}")
    model.train()
    results, repeat_times = {}, {}
    for packing in ("group", "trajectory", "call"):
        batch = pgrpo.build_batch(rollouts, packing, max_tokens=args.tokens)
        times = []
        for _ in range(args.repeats):
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            loss = 0.0
            for chunk in pgrpo.micro_batches(batch, args.tokens):
                part = batch.select(chunk)
                parts = pgrpo.policy_loss(pgrpo.batch_logprobs(model, part), part, normalizer=batch.n_tokens)
                parts.loss.backward()
                loss += float(parts.loss.detach())
            times.append(time.perf_counter() - t)
        results[packing] = (batch.rows.num_tokens, batch.rows.shape, batch.n_tokens, loss, min(times))
        repeat_times[packing] = times  # every repeat, into the result file: the spread shows the machine's load
    base_tokens, _, _, _, base_time = results["call"]
    print(f"{'packing':<11}{'rows x len':>12}{'tokens':>9}{'completion':>12}{'loss':>12}{'update s':>10}"
          f"{'tokens vs call':>16}{'speed-up vs call':>18}")
    for packing, (tokens, shape, n, loss, seconds) in results.items():
        print(f"{packing:<11}{f'{shape[0]} x {shape[1]}':>12}{tokens:>9}{n:>12}{loss:>12.6f}{seconds:>10.3f}"
              f"{tokens / base_tokens:>16.3f}{base_time / seconds:>18.2f}")
    recorder.save(args.out, rows=[
        {"packing": packing, "rows": shape[0], "row_length": shape[1], "tokens": tokens, "completion_tokens": n,
         "loss": loss, "update_s": seconds, "tokens_vs_call": tokens / base_tokens, "speedup_vs_call": base_time / seconds,
         "update_s_repeats": repeat_times[packing]}
        for packing, (tokens, shape, n, loss, seconds) in results.items()],
        setup={"model": repo_path(args.model), "prompts": args.prompts, "k": args.k, "row_tokens": args.tokens,
               "repeats": args.repeats, "update_s": "fastest of the repeats"},
        rollouts={"count": len(rollouts), "sample_s": sample_s, "calls_per_rollout": calls, "mean_reward": reward,
                  "distinct": distinct})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
