"""Decode-step time of the tiny presets at 1 and 2 torch threads (why HFEngine uses 1 thread on CPU).

    .venv/bin/python benchmarks/threads.py

Per preset, per thread count, per batch of rows: milliseconds per decode step (one token per row, KV
cache of ~120 tokens) and for one prefill of 200 tokens. Small models on a CPU are per-step-overhead
bound; intra-op threads mostly add synchronisation. Run on an otherwise idle machine.
"""

import time

import torch

from twlib.decoding import cache_argument, returned_cache
from twlib.models import build_model
from twlib.tokenizer import build_tokenizer


def main() -> None:
    tok = build_tokenizer()
    prompt = tok.encode("A:q3r5s8 B:e7f1g4\n<think>\n" * 5)
    print(f"{'preset':<7} {'threads':>7} {'rows':>5} {'ms/step':>8} {'prefill 200 ms':>15}")
    for preset in ("tiny", "small"):
        model = build_model(preset, tok).eval()
        cache_name = cache_argument(model)  # `cache` or `past_key_values`, by transformers version
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for rows in (1, 4):
                ids = torch.tensor([prompt] * rows)
                with torch.no_grad():
                    cache = returned_cache(model(input_ids=ids, use_cache=True))
                    start, n = time.perf_counter(), 50
                    for i in range(n):
                        out = model(input_ids=torch.full((rows, 1), 5), position_ids=torch.full((rows, 1), len(prompt) + i),
                                    use_cache=True, **{cache_name: cache})
                        cache = returned_cache(out)
                    step = (time.perf_counter() - start) / n * 1000
                    start = time.perf_counter()
                    model(input_ids=torch.tensor([tok.encode("x" * 200)] * rows))
                    prefill = (time.perf_counter() - start) * 1000
                print(f"{preset:<7} {threads:>7} {rows:>5} {step:>8.2f} {prefill:>15.1f}")


if __name__ == "__main__":
    main()
