"""Trie packing benchmark: packed row vs every call run separately, dense vs block mask, packing time.

    .venv/bin/python benchmarks/trie.py [--sizes 2048 4096 8192 16384 32768] [--threads 4]
        [--out assets/benchmarks/trie.json]

Synthetic trajectories of the given response lengths (tokens), built from blocks of `--threads` threads
of ~150 tokens with ~60 tokens of sequential text between blocks: the shape of a long ThreadWeaver
trace. For each size it prints, side by side in one run:
- tokens processed by the packed trie row vs by running every (context, completion) call separately,
  the ratio being the recomputation the trie saves (the reference's RL recomputes per call);
- attention-mask memory: dense float32 N x N vs the BlockMask (block flags + indices) + exits;
- time to pack (linear in tokens) and to build the BlockMask.
`--out FILE` writes every printed number, the command, date, machine and load average as JSON (result_file.py).
"""

from __future__ import annotations

import argparse
import random
import time

from result_file import ResultFile
from twlib.format import Block, Trajectory, engine_calls, path_stats
from twlib.trie import block_mask, pack, tokenize_calls
from twlib.tokenizer import build_tokenizer

WORDS = "the of sum let so we x y z a b c is then and 12 7 3 + - = ( )".split()


def text(rng: random.Random, n_chars: int) -> str:
    out = []
    while sum(len(w) + 1 for w in out) < n_chars:
        out.append(rng.choice(WORDS))
    return " ".join(out)


def synthetic(rng: random.Random, tokens: int, threads: int) -> Trajectory:
    segments, size = ["<think>\n"], 0
    while size < tokens:
        head = text(rng, 60) + "\n"
        bodies = [" " + text(rng, 150) for _ in range(threads)]
        block = Block(tuple(f" part {i + 1}" for i in range(threads)), tuple(bodies))
        segments += [head, block]
        size += path_stats(head + block.render()).total
    segments.append("\n</think>\n\\boxed{1}")
    return Trajectory(tuple(segments))


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON result file (README renders assets/benchmarks/trie.json)")
    args = parser.parse_args(argv)
    recorder = ResultFile("trie", argv)
    rows = []
    rng = random.Random(args.seed)
    tok = build_tokenizer()
    header = (f"{'response':>9} {'calls':>6} {'separate':>10} {'trie':>8} {'sep/trie':>9} "
              f"{'dense MiB':>10} {'block MiB':>10} {'dense/block':>12} {'pack ms':>8} {'us/token':>9} "
              f"{'block ms':>9}")
    print(header)
    for size in args.sizes:
        traj = synthetic(rng, size, args.threads)
        pairs = tokenize_calls(engine_calls(traj, "Question: a long problem.\n"), tok)
        start = time.perf_counter()
        packed = pack(pairs)
        pack_s = time.perf_counter() - start
        separate = sum(len(c) + len(d) for c, d in pairs)
        n = packed.shape[1]
        start = time.perf_counter()
        bm = block_mask(packed.exits)
        block_s = time.perf_counter() - start
        block_bytes = sum(t.numel() * t.element_size() for t in
                          (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                           packed.exits))
        dense_bytes = 4 * n * n
        response = path_stats(traj.render()).total
        print(f"{response:>9} {len(pairs):>6} {separate:>10,} {n:>8,} {separate / n:>8.2f}x "
              f"{mib(dense_bytes):>10} {mib(block_bytes):>10} {dense_bytes / block_bytes:>11,.0f}x "
              f"{1000 * pack_s:>8.1f} {1e6 * pack_s / separate:>9.2f} {1000 * block_s:>9.1f}")
        rows.append({"response_tokens": response, "calls": len(pairs), "separate_tokens": separate, "trie_tokens": n,
                     "separate_over_trie": separate / n, "dense_mask_bytes": dense_bytes,
                     "block_mask_bytes": block_bytes, "pack_ms": 1000 * pack_s,
                     "pack_us_per_token": 1e6 * pack_s / separate, "block_mask_ms": 1000 * block_s})
    print("separate = tokens processed if every call is its own row; trie = nodes of the packed row.")
    print("us/token = packing time per call token (flat across sizes = linear time).")
    recorder.save(args.out, rows=rows, setup={"threads_per_block": args.threads, "seed": args.seed})


if __name__ == "__main__":
    main()
