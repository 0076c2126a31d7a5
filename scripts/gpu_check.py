#!/usr/bin/env python3
"""GPU check: trie attention, trie SFT and decoding on randomly initialised Qwen3-0.6B / -1.7B, beside the planner.

    PYTHONPATH=. python scripts/gpu_check.py --tokenizer runs/qwen3-tokenizer --out runs/gpu-check   # one H100
    PYTHONPATH=. python scripts/gpu_check.py --cpu-smoke --out runs/gpu-check-smoke                 # CI, < 1 min

Writes OUT/gpu_check.json (every number, rewritten after each measurement, so a run cut short keeps what it
measured) and OUT/gpu_check.md (the same as tables). Exit code 0 when every measurement ran (an
out-of-memory is a result, not a failure), 1 when one raised anything else, 2 for bad arguments.

What it measures (sections, in this order; each measurement is skipped once `--budget-s` is spent):
- attention: one forward + backward of `twlib.trie.logprobs` (the SFT loss: gradient checkpointing, LM
  head in recomputed chunks) over one packed trie row of 8k, 16k and 32k tokens, with FlexAttention and the
  `BlockMask` (`PackedTrie.attention_mask("block")`) and with sdpa and the dense bool ancestor mask: seconds
  of the first pass (FlexAttention compiles there) and of the next ones, peak memory, and the planner's
  estimate of the same (`twlib.infra.plan`: weights + gradients + activations + mask, no optimizer).
- sft: trie SFT steps in bf16 (bf16 weights, AdamW states and matmuls: `twlib.train.sft`'s `dtype: auto` on a
  GPU; FlexAttention, checkpointing, chunked LM head) on rows of 16k tokens: tokens/s and peak memory
  beside the planner's `bf16` SFT estimate.
- decode: `twlib.decoding.HFEngine` (sdpa, bf16) generating 128 tokens per row at batch 1 and 16 (rows that
  share a prompt: prefilled once, KV forked): tokens/s.
- state_machine: `ParallelDecoder` over HFEngine on a parallel trajectory (4 threads of 128 tokens) vs the
  sequential decoder generating as many tokens: wall time, tokens/s, critical path (response tokens on the
  longest path, the forced outline block included; `generated` counts the model's tokens only).

Design choices
- Random weights from `twlib.models.qwen3_config` (no checkpoint is reachable): every cost but learning.
  The rows are synthetic tries of random ids with the state machine's shape (prompt, outlines, 4 threads,
  the join, a continuation, repeated until the row is full): the same nodes, depths and masks as real ones.
- A random model never writes `</Outlines>`: the state-machine check hands the decoder one scripted
  outline block (`ForcedOutlines`, the first sequential call only); the threads and everything after are
  decoded by the model. Its threads then run to their budget, so the decoder closes them and stops
  (`thread_unclosed`): phases 1-4 of a parallel trajectory, which is what the timing is about.
- Tokenizer: `--tokenizer DIR` (Qwen3's, from scripts/fetch_qwen3_tokenizer.py; the GPU machine has no
  network, so copy it into the tree, e.g. runs/qwen3-tokenizer, and carry it) gets the thread tags added
  as single tokens (`twlib.tokenizer.add_thread_tokens`, rows 151,669-151,676) and renders the chat prompt.
  Without it the model keeps Qwen3's vocabulary size (151,936 rows: the LM head costs the same) and the
  state machine's ids come from the project's byte tokenizer; the JSON says which.
- Peak memory: `torch.cuda.max_memory_allocated` over the timed passes (no CUDA context, hence compared
  with the planner's total less its fixed overhead); on CPU the growth of the process's peak resident set
  (VmHWM, reset through /proc/self/clear_refs). Times: `perf_counter` around synchronised passes.
- `--cpu-smoke`: the same code on CPU at toy sizes (qwen3-tiny: hidden 32, 2 layers, Qwen3's vocabulary;
  rows of 256-1024 tokens, 8 decoded tokens), for CI (tests/test_gpu_check.py). FlexAttention has no
  backward on CPU (torch 2.13), so there its measurements are skipped and only the BlockMask is built
  (bytes beside the planner's); sdpa runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30
THREADS = 4  # threads per block in the synthetic rows and the state-machine check


@dataclass(frozen=True)
class Sizes:
    models: tuple[str, ...]
    attention_tokens: tuple[int, ...]
    sft_tokens: int
    sft_steps: int
    decode_tokens: int
    decode_batches: tuple[int, ...]
    thread_tokens: int
    repeats: int  # timed passes after the first


GPU_SIZES = Sizes(models=("Qwen3-0.6B", "Qwen3-1.7B"), attention_tokens=(8192, 16384, 32768), sft_tokens=16384,
                  sft_steps=3, decode_tokens=128, decode_batches=(1, 16), thread_tokens=128, repeats=2)
SMOKE_SIZES = Sizes(models=("qwen3-tiny",), attention_tokens=(256, 512, 1024), sft_tokens=512, sft_steps=2,
                    decode_tokens=8, decode_batches=(1, 16), thread_tokens=8, repeats=1)


# ----------------------------------------------------------------------------------------------------
# Results: one JSON and one markdown table, rewritten after every measurement


class Report:
    def __init__(self, out: Path, meta: dict, budget_s: float):
        self.out, self.meta, self.budget_s = out, meta, budget_s
        self.started = time.perf_counter()
        self.sections: dict[str, list[dict]] = {"attention": [], "sft": [], "decode": [], "state_machine": []}
        self.skipped: list[str] = []
        self.errors: list[str] = []
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def time_left(self, what: str) -> bool:
        if self.elapsed() < self.budget_s:
            return True
        self.skipped.append(f"{what}: time budget of {self.budget_s:.0f} s spent")
        return False

    def add(self, section: str, row: dict) -> None:
        self.sections[section].append(row)
        self.write()

    def fail(self, what: str, error: BaseException) -> None:
        self.errors.append(f"{what}: {type(error).__name__}: {error}")
        print(f"error in {what}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        self.write()

    def to_dict(self) -> dict:
        return {**self.meta, "elapsed_s": round(self.elapsed(), 1), "budget_s": self.budget_s,
                "sections": self.sections, "skipped": self.skipped, "errors": self.errors}

    def write(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.to_dict(), indent=1))
        (self.out / "gpu_check.md").write_text(markdown(self.to_dict()))


COLUMNS = {
    "attention": [("model", "model"), ("tokens", "tokens"), ("mask", "mask"), ("first_s", "first pass s"),
                  ("pass_s", "fwd+bwd s"), ("peak_gib", "peak GiB"), ("planned_gib", "planner GiB"),
                  ("mask_bytes", "mask bytes"), ("planned_mask_bytes", "planner mask bytes"), ("note", "note")],
    "sft": [("model", "model"), ("tokens", "tokens/row"), ("steps", "steps"), ("tokens_per_s", "tokens/s"),
            ("step_s", "s/step"), ("peak_gib", "peak GiB"), ("planned_gib", "planner GiB"), ("note", "note")],
    "decode": [("model", "model"), ("batch", "batch"), ("new_tokens", "tokens/row"), ("seconds", "s"),
               ("tokens_per_s", "tokens/s"), ("note", "note")],
    "state_machine": [("model", "model"), ("decoder", "decoder"), ("forced", "forced"), ("generated", "generated"),
                      ("critical_path", "critical path"), ("seconds", "s"), ("tokens_per_s", "tokens/s"),
                      ("speedup", "wall speed-up"), ("flags", "flags")],
}


def markdown(result: dict) -> str:
    lines = [f"# GPU check ({result['mode']})", "",
             f"- device: {result['device']}; torch {result['torch']}, transformers {result['transformers']}",
             f"- tokenizer: {result['tokenizer']}",
             f"- peak memory: {result['peak_memory']}; planner GiB: twlib.infra.plan's estimate less its fixed overhead",
             f"- {result['elapsed_s']} s of a {result['budget_s']:.0f} s budget; written {result['written']}", ""]
    for section, rows in result["sections"].items():
        lines += [f"## {section}", ""]
        if not rows:
            lines += ["(nothing measured)", ""]
            continue
        cols = COLUMNS[section]
        lines.append("| " + " | ".join(title for _, title in cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for row in rows:
            lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in cols) + " |")
        lines.append("")
    for title, items in (("skipped", result["skipped"]), ("errors", result["errors"])):
        if items:
            lines += [f"## {title}", "", *[f"- {item}" for item in items], ""]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return str(value).replace("|", "/")


# ----------------------------------------------------------------------------------------------------
# Device helpers: synchronised time, peak memory


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Peak:
    """Peak memory over a `with` block: CUDA allocator peak, or the growth of the peak RSS on CPU (Linux)."""

    def __init__(self, device):
        self.device, self.bytes = device, None

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._before = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch

        if exc[0] is not None:
            return False
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        elif os.path.exists("/proc/self/clear_refs"):
            self.bytes = _status("VmHWM") - self._before
        return False


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _gib(n) -> float | None:
    return None if n is None else round(n / GIB, 3)


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# Models, tokenizer, rows


def load_tokenizer(folder: str | None):
    """(tokenizer, description). Qwen3's from `folder`, else the byte tokenizer (tags only; vocab size from Qwen3)."""
    from twlib.tokenizer import build_tokenizer

    if folder is None:
        return build_tokenizer(), "none given: Qwen3's vocabulary size (151,936), byte tokenizer for the state machine's tags"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer, f"{folder} ({len(tokenizer):,} tokens + the thread tags)"


def build(name: str, tokenizer, device, dtype, attn: str):
    """Qwen3 `name` (a twlib.models size or preset) with random weights on `device`; thread tags made single
    tokens in the tokenizer when they are not (their rows exist: Qwen3 pads its embedding)."""
    import torch
    from transformers import AutoModelForCausalLM

    from twlib.models import resolve_config
    from twlib.tokenizer import add_thread_tokens

    torch.manual_seed(0)
    config = resolve_config(name, tokenizer)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    add_thread_tokens(model, tokenizer)
    return model


def set_attention(model, attn: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    else:
        model.config._attn_implementation = attn


def trie_row(tokens: int, vocab: int, seed: int = 0, threads: int = THREADS):
    """A packed trie row of exactly `tokens` nodes (the tail padded), shaped like a parallel trajectory."""
    from twlib.trie import collate, pack

    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(vocab) for _ in range(n)]

    thread_len = max(4, tokens // 48)
    pairs, context = [], ids(min(256, tokens // 8))
    while True:
        block = [(list(context), ids(16))]  # the outlines, written sequentially
        shared = context + block[0][1]
        glue = [ids(3) for _ in range(threads)]
        bodies = [ids(thread_len) for _ in range(threads)]
        block += [(shared + glue[i], bodies[i]) for i in range(threads)]
        joined = shared + [t for g, b in zip(glue, bodies) for t in g + b] + ids(1)
        block.append((joined, ids(32)))  # the continuation after the join
        if pack(pairs + block).shape[1] > tokens:
            break
        pairs += block
        context = joined + block[-1][1]
    used = pack(pairs).shape[1] if pairs else 0
    if tokens - used > 0:  # a last sequential call fills the row
        pairs.append((list(context), ids(tokens - used)))
    trie = pack(pairs)
    if trie.shape[1] > tokens:
        raise AssertionError(f"synthetic row of {trie.shape[1]} nodes for {tokens}")
    return collate([trie], pad_to_multiple_of=tokens)


def planned(name: str, tokens: int, attn: str, with_optimizer: bool) -> tuple[float, float]:
    """(planner GiB for the measured work, the planner's BlockMask bytes): bf16 weights and grads (+ AdamW
    states), one row of `tokens`, checkpointing, chunked LM head; less the fixed overhead (CUDA context)."""
    from twlib.infra import plan

    config = plan.PlanConfig(model=name, gpu="h100-80gb", gpus=1, gpus_per_node=1, tokens=tokens, rows=1,
                             precision="bf16", sharding="none",
                             offload_optimizer=False, checkpointing=True, logits="chunked", attn=attn)
    memory = plan.make_plan(config, schedule="multiply", shape=plan.model_shape(name)).memory("SFT")
    skip = ("fixed overhead",) + (() if with_optimizer else ("AdamW", "fp32 master"))
    total = sum(t.bytes for t in memory.terms if t.where == "gpu" and not t.name.startswith(skip))
    return total / GIB, plan.block_mask_bytes(tokens)


def mask_nbytes(mask) -> int:
    import torch

    if isinstance(mask, torch.Tensor):
        return mask.numel() * mask.element_size()
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",  # the forward's
             "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")      # the backward's
    tensors = [getattr(mask, name, None) for name in names]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ----------------------------------------------------------------------------------------------------
# Sections


def loss_pass(model, row, mask) -> None:
    """One forward + backward of the trie SFT loss (twlib.trie.logprobs, recomputed LM-head chunks)."""
    from twlib.trie import IGNORE, logprobs

    trained = row.labels != IGNORE
    lp = logprobs(model, row, mask=mask)
    (-(lp * trained).sum() / max(int(trained.sum()), 1)).backward()


def attention_section(report: Report, name: str, tokenizer, device, sizes: Sizes) -> None:
    import torch

    from twlib.checkpoint import enable_gradient_checkpointing

    kinds = [("block", "flex_attention"), ("dense", "sdpa")]
    model = build(name, tokenizer, device, torch.bfloat16, "sdpa")
    enable_gradient_checkpointing(model)
    model.train()
    try:
        for tokens in sizes.attention_tokens:
            row = trie_row(tokens, model.config.vocab_size).to(device)
            for mask_name, attn in kinds:
                what = f"attention {name} {tokens} {mask_name}"
                if not report.time_left(what):
                    return
                plan_gib, plan_mask = planned(name, tokens, "flex_attention" if mask_name == "block" else "sdpa",
                                              with_optimizer=False)
                entry = {"model": name, "tokens": tokens, "mask": f"{mask_name} ({attn})", "planned_gib": round(plan_gib, 3)}
                try:
                    mask = row.attention_mask("block" if mask_name == "block" else "bool")
                    entry["mask_bytes"] = mask_nbytes(mask)
                    entry["planned_mask_bytes"] = plan_mask if mask_name == "block" else tokens * tokens
                    if attn == "flex_attention" and device.type == "cpu":
                        entry["note"] = "BlockMask built; FlexAttention has no backward on CPU: not run"
                        report.add("attention", entry)
                        continue
                    set_attention(model, attn)
                    model.zero_grad(set_to_none=True)
                    sync(device)
                    t0 = time.perf_counter()
                    loss_pass(model, row, mask)
                    sync(device)
                    entry["first_s"] = round(time.perf_counter() - t0, 3)
                    model.zero_grad(set_to_none=True)
                    free_memory(device)
                    times = []
                    with Peak(device) as peak:
                        for _ in range(sizes.repeats):
                            model.zero_grad(set_to_none=True)
                            sync(device)
                            t0 = time.perf_counter()
                            loss_pass(model, row, mask)
                            sync(device)
                            times.append(time.perf_counter() - t0)
                    entry.update(pass_s=round(sum(times) / len(times), 3), peak_gib=_gib(peak.bytes))
                except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else an error
                    if not is_oom(e):
                        report.fail(what, e)
                        continue
                    entry["note"] = "out of memory"
                finally:
                    model.zero_grad(set_to_none=True)
                    mask = None
                    free_memory(device)
                report.add("attention", entry)
    finally:
        del model
        free_memory(device)


def sft_section(report: Report, name: str, tokenizer, device, sizes: Sizes) -> None:
    import torch

    from twlib.checkpoint import enable_gradient_checkpointing
    from twlib.train.sft import batch_loss

    what = f"sft {name}"
    if not report.time_left(what):
        return
    attn = "flex_attention" if device.type == "cuda" else "sdpa"
    model = build(name, tokenizer, device, torch.bfloat16, attn)
    enable_gradient_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    row = trie_row(sizes.sft_tokens, model.config.vocab_size, seed=1)
    kind = "block" if attn == "flex_attention" else "bool"
    plan_gib, _ = planned(name, sizes.sft_tokens, attn, with_optimizer=True)
    entry = {"model": name, "tokens": sizes.sft_tokens, "steps": sizes.sft_steps, "planned_gib": round(plan_gib, 3),
             "note": f"bf16, {attn}, checkpointing, chunked LM head"}

    def step():
        loss, _ = batch_loss(model, row, kind)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        step()  # warm-up: compiles FlexAttention, allocates the AdamW states
        sync(device)
        free_memory(device)
        with Peak(device) as peak:
            t0 = time.perf_counter()
            for _ in range(sizes.sft_steps):
                step()
            sync(device)
            seconds = time.perf_counter() - t0
        entry.update(tokens_per_s=round(sizes.sft_tokens * sizes.sft_steps / seconds, 1),
                     step_s=round(seconds / sizes.sft_steps, 3), peak_gib=_gib(peak.bytes))
        report.add("sft", entry)
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            report.fail(what, e)
        else:
            report.add("sft", {**entry, "note": "out of memory"})
    finally:
        del model, optimizer
        free_memory(device)


class ForcedOutlines:
    """An Engine that answers the first sequential call of a problem (no `</Outlines>` in its prompt yet)
    with a scripted outline block and passes every other request to `engine` (see the module docstring)."""

    def __init__(self, engine, outline_ids: list[int], outlines_close: int):
        self.engine, self.outline_ids, self.close = engine, list(outline_ids), outlines_close
        self.max_context = engine.max_context

    def generate(self, requests, sampling):
        from twlib.decoding import Completion

        forced = [self.close in r.stop_ids and self.close not in r.prompt_ids for r in requests]
        real = self.engine.generate([r for r, f in zip(requests, forced) if not f], sampling)
        answers = iter(real)
        return [Completion(list(self.outline_ids), "stop") if f else next(answers) for f in forced]


def decode_sections(report: Report, name: str, tokenizer, device, sizes: Sizes, chat: bool) -> None:
    import torch

    from twlib.decoding import DecodeConfig, HFEngine, ParallelDecoder, Request, sequential_decoder
    from twlib.tokenizer import chat_prompt, tag_ids

    if not report.time_left(f"decode {name}"):
        return
    model = build(name, tokenizer, device, torch.bfloat16 if device.type == "cuda" else torch.float32, "sdpa").eval()
    question = "Compute 123 * 456 and 789 * 12, then add the two products."
    prompt = tokenizer.encode(chat_prompt(tokenizer, question) if chat else question + "\n", add_special_tokens=False)
    try:
        engine = HFEngine(model, tokenizer, num_threads=None)
        engine.generate([Request(prompt, 4)])  # warm-up
        for batch in sizes.decode_batches:
            what = f"decode {name} batch {batch}"
            if not report.time_left(what):
                return
            requests = [Request(prompt + [prompt[-1 - (i % 4)]] * (1 + i // 4), sizes.decode_tokens)
                        for i in range(batch)]  # distinct rows sharing the prompt
            try:
                engine.reset()
                sync(device)
                t0 = time.perf_counter()
                out = engine.generate(requests)
                sync(device)
                seconds = time.perf_counter() - t0
                generated = sum(len(c.ids) for c in out)
                report.add("decode", {"model": name, "batch": batch, "new_tokens": sizes.decode_tokens,
                                      "seconds": round(seconds, 3), "tokens_per_s": round(generated / seconds, 1),
                                      "note": f"HFEngine, sdpa, {'bf16' if device.type == 'cuda' else 'fp32'}"})
            except Exception as e:  # noqa: BLE001
                report.fail(what, e)

        what = f"state machine {name}"
        if not report.time_left(what):
            return
        try:
            tags = tag_ids(tokenizer)
            outline = "<think>\n<Parallel>\n<Outlines>\n" + "".join(
                f"<Outline>{n}: part {n}</Outline>\n" for n in range(1, THREADS + 1)) + "</Outlines>"
            outline_ids = tokenizer.encode(outline, add_special_tokens=False)
            budget = len(outline_ids) + THREADS * sizes.thread_tokens + 16
            config = DecodeConfig(max_new_tokens=budget, max_thread_tokens=sizes.thread_tokens, max_threads=THREADS)
            engine.reset()
            parallel = ParallelDecoder(ForcedOutlines(engine, outline_ids, tags["</Outlines>"]), tokenizer, config)
            sync(device)
            t0 = time.perf_counter()
            result = parallel.decode(prompt)
            sync(device)
            par_s = time.perf_counter() - t0
            par_generated = sum(len(c.completion_ids) for c in result.calls) - len(outline_ids)
            engine.reset()
            sequential = sequential_decoder(engine, tokenizer, DecodeConfig(max_new_tokens=par_generated))
            sync(device)
            t0 = time.perf_counter()
            seq = sequential.decode(prompt)
            sync(device)
            seq_s = time.perf_counter() - t0
            seq_generated = len(seq.response_ids) + int(seq.finished)
            report.add("state_machine", {"model": name, "decoder": f"state machine ({THREADS} threads)",
                                         "forced": len(outline_ids), "generated": par_generated, "critical_path": result.stats.longest,
                                         "seconds": round(par_s, 3), "tokens_per_s": round(par_generated / par_s, 1),
                                         "speedup": round(seq_s / par_s, 2), "flags": result.flags})
            report.add("state_machine", {"model": name, "decoder": "sequential", "forced": 0,
                                         "generated": seq_generated,
                                         "critical_path": seq.stats.longest, "seconds": round(seq_s, 3),
                                         "tokens_per_s": round(seq_generated / seq_s, 1), "speedup": 1.0,
                                         "flags": seq.flags})
        except Exception as e:  # noqa: BLE001
            report.fail(what, e)
    finally:
        del model
        free_memory(device)


# ----------------------------------------------------------------------------------------------------
# Main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=None, help="folder of Qwen3's tokenizer (tokenizer.json); default: none")
    parser.add_argument("--out", default="runs/gpu-check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (CI; under a minute)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting measurements after this many seconds (default 400 on GPU, 50 smoke)")
    parser.add_argument("--models", default=None, help="comma-separated twlib.models names (default: by mode)")
    parser.add_argument("--sections", default="attention,sft,decode",
                        help="comma-separated: attention, sft, decode (decode includes the state machine)")
    args = parser.parse_args(argv)
    if args.tokenizer is not None and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        parser.error(f"--tokenizer {args.tokenizer}: no tokenizer.json there (python3 scripts/fetch_qwen3_tokenizer.py "
                     f"--out {args.tokenizer} writes it; the GPU machine has no network: carry the folder)")

    import torch
    import transformers

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"attention", "sft", "decode"})
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)} (attention, sft, decode)")
    if args.cpu_smoke:
        device, sizes, budget = torch.device("cpu"), SMOKE_SIZES, args.budget_s or 50.0
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; use --cpu-smoke on a CPU", file=sys.stderr)
            return 2
        device, sizes, budget = torch.device("cuda", 0), GPU_SIZES, args.budget_s or 400.0
    models = tuple(m.strip() for m in args.models.split(",")) if args.models else sizes.models
    tokenizer, described = load_tokenizer(args.tokenizer)
    meta = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "tokenizer": described, "models": list(models), "sizes": dataclasses.asdict(sizes),
            "peak_memory": ("torch.cuda.max_memory_allocated over the timed passes: everything resident (weights, "
                            "mask, optimizer states)" if device.type == "cuda" else
                            "growth of the process's peak RSS over the timed passes (what was resident before, "
                            "weights and mask, is not in it)"),
            "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    report = Report(Path(args.out), meta, budget)
    chat = args.tokenizer is not None
    for name in models:
        if "attention" in sections:
            attention_section(report, name, tokenizer, device, sizes)
        if "sft" in sections:
            sft_section(report, name, tokenizer, device, sizes)
        if "decode" in sections:
            decode_sections(report, name, tokenizer, device, sizes, chat)
    report.meta["written"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report.write()
    print(markdown(report.to_dict()))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
