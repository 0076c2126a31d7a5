"""`python -m twlib prepare-model`: a model folder whose tokenizer has every thread tag as ONE token.

    python -m twlib prepare-model --model Qwen/Qwen3-8B --out models/Qwen3-8B-threadweaver
    python -m twlib prepare-model --model models/Qwen3-0.6B --out models/Qwen3-0.6B-threadweaver
    python -m twlib prepare-model --preset qwen3-tiny --tokenizer ~/.cache/twlab/qwen3-tokenizer --out models/qwen3-tiny

Run once before SFT on a real model (the trainers and the parallel decoder refuse a tokenizer that splits
a tag: `twlib.tokenizer.require_single_token_tags`).

Design choices
- The work is `twlib.tokenizer.add_thread_tokens`: the missing tags become special tokens (Qwen3 already
  has `<think>` and `</think>`, so 8 are added, ids 151669..151676), the embedding grows only when the
  tokenizer outgrows it (Qwen3 checkpoints pad it to 151,936 rows, so they do not grow), and each new row,
  of the input embedding and of an untied LM head, starts as the MEAN OF THE ROWS OF THE PIECES the tag
  used to split into (`<Parallel>` -> `<`, `Parallel`, `>`), as the reference does: the model starts
  from what it read for that text, not from noise or from the global mean.
- The weights keep their stored dtype (`dtype="auto"`); new rows are averaged in float32 then cast.
- A new folder, never in place: `--out` must not exist or be empty (the source may be a read-only hub
  cache, and a half-written folder must not look like the original).
- `--model` is a folder or a hub id in the Hugging Face cache (`twlib.hub`); `--download` fetches a
  missing hub id first (nothing downloads without it). `--tokenizer` takes the tokenizer from elsewhere
  (e.g. the npm-packaged Qwen3 tokenizer next to a config-only model).
- The result is checked by loading the saved tokenizer again: every tag must be one token there too.
- `--preset qwen3-tiny` (instead of `--model`) builds Qwen3's architecture at toy size with random weights
  (`twlib.models.REAL_TOKENIZER_PRESETS`, seeded by `--seed`) around the tokenizer given by `--tokenizer`
  (required: Qwen3's real one), then does the same tag work and checks. The result is a model folder like a
  prepared Qwen3-8B, so the CPU test tier (tests/test_qwen3_tiny.py) runs every full-scale entry point on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["prepare_model", "prepare_preset", "add_arguments", "main_args"]


def _check_out(out: str) -> Path:
    out_path = Path(out)
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder: choose a new folder "
                              f"(prepare-model never writes over a model)")
    return out_path


def prepare_model(model: str, out: str, tokenizer: str | None = None, download: bool = False) -> dict:
    """Load `model` (+ its tokenizer, or `tokenizer`), add the thread tags, save both to `out`.

    Returns {"added": [tags], "ids": {tag: id}, "vocab": len(tokenizer), "rows": embedding rows, "out": out}.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.hub import resolve_model

    out_path = _check_out(out)
    source = resolve_model(model, need="weights", download=download)
    tok_source = resolve_model(tokenizer, need="tokenizer", download=download) if tokenizer else source
    tok = AutoTokenizer.from_pretrained(tok_source)
    loaded = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    rows = loaded.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise ValueError(f"{model}: its embedding has {rows} rows but the tokenizer ({tok_source}) already has "
                         f"{len(tok)} tokens: not this model's tokenizer?")
    return _add_tags_and_save(loaded, tok, out_path)


def prepare_preset(preset: str, out: str, tokenizer: str, seed: int = 0) -> dict:
    """A randomly initialised `preset` (twlib.models.REAL_TOKENIZER_PRESETS, e.g. `qwen3-tiny`) around the
    tokenizer folder / cached hub id `tokenizer`, with the thread tags added, saved to `out` (fp32).
    Returns what `prepare_model` returns."""
    from transformers import AutoTokenizer

    from twlib.hub import resolve_model
    from twlib.models import REAL_TOKENIZER_PRESETS, build_model

    if preset not in REAL_TOKENIZER_PRESETS:
        raise ValueError(f"--preset {preset!r}: expected one of {', '.join(REAL_TOKENIZER_PRESETS)} (the byte-"
                         f"tokenizer presets need no preparing: name them as `model:` in a config)")
    if not tokenizer:
        raise ValueError(f"--preset {preset} needs --tokenizer: the folder of Qwen3's tokenizer (e.g. "
                         f"~/.cache/twlab/qwen3-tokenizer from scripts/fetch_qwen3_tokenizer.py) or a cached hub id")
    out_path = _check_out(out)
    tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer, need="tokenizer"))
    model = build_model(preset, tok, seed=seed)  # ValueError if the tokenizer outgrows the preset's vocabulary
    return _add_tags_and_save(model, tok, out_path)


def _add_tags_and_save(loaded, tok, out_path: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    from twlib.tokenizer import add_thread_tokens, require_single_token_tags

    with torch.no_grad():
        added = add_thread_tokens(loaded, tok)
    loaded.config.vocab_size = loaded.get_input_embeddings().weight.shape[0]
    out_path.mkdir(parents=True, exist_ok=True)
    loaded.save_pretrained(out_path)
    tok.save_pretrained(out_path)
    ids = require_single_token_tags(AutoTokenizer.from_pretrained(str(out_path)), str(out_path))
    return {"added": added, "ids": ids, "vocab": len(tok), "rows": loaded.get_input_embeddings().weight.shape[0],
            "out": str(out_path)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model folder (save_pretrained) or a hub id in the HF cache")
    source.add_argument("--preset", help="instead of --model: build this random-weight preset (qwen3-tiny: Qwen3 "
                                         "at toy size) around --tokenizer")
    parser.add_argument("--out", required=True, help="new folder for the prepared model and tokenizer")
    parser.add_argument("--tokenizer", default=None, help="take the tokenizer from this folder / hub id instead "
                                                          "(required with --preset)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed of --preset (default 0)")
    parser.add_argument("--download", action="store_true",
                        help="download a hub id missing from the cache first (refused under HF_HUB_OFFLINE)")


def main_args(args) -> int:
    from twlib.hub import ModelNotFound

    try:
        if args.preset:
            result = prepare_preset(args.preset, args.out, args.tokenizer, args.seed)
        else:
            result = prepare_model(args.model, args.out, args.tokenizer, args.download)
    except (ModelNotFound, FileExistsError, ValueError, OSError) as e:
        print(f"twlib prepare-model: {e}", file=sys.stderr)
        return 2
    added = ", ".join(f"{t}={result['ids'][t]}" for t in result["added"]) or "none (already single tokens)"
    source = f"{args.preset} (random weights, seed {args.seed})" if args.preset else args.model
    print(f"{source} -> {result['out']}: added {added}; tokenizer {result['vocab']} tokens, "
          f"embedding {result['rows']} rows (new rows: mean of each tag's former pieces)")
    return 0
