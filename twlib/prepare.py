"""`python -m twlib prepare-model`: a model folder whose tokenizer has every thread tag as ONE token.

    python -m twlib prepare-model --model Qwen/Qwen3-8B --out models/Qwen3-8B-threadweaver
    python -m twlib prepare-model --model models/Qwen3-0.6B --out models/Qwen3-0.6B-threadweaver

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
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["prepare_model", "add_arguments", "main_args"]


def prepare_model(model: str, out: str, tokenizer: str | None = None, download: bool = False) -> dict:
    """Load `model` (+ its tokenizer, or `tokenizer`), add the thread tags, save both to `out`.

    Returns {"added": [tags], "ids": {tag: id}, "vocab": len(tokenizer), "rows": embedding rows, "out": out}.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twlib.hub import resolve_model
    from twlib.tokenizer import add_thread_tokens, require_single_token_tags

    out_path = Path(out)
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder: choose a new folder "
                              f"(prepare-model never writes over a model)")
    source = resolve_model(model, need="weights", download=download)
    tok_source = resolve_model(tokenizer, need="tokenizer", download=download) if tokenizer else source
    tok = AutoTokenizer.from_pretrained(tok_source)
    loaded = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    rows = loaded.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise ValueError(f"{model}: its embedding has {rows} rows but the tokenizer ({tok_source}) already has "
                         f"{len(tok)} tokens: not this model's tokenizer?")
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
    parser.add_argument("--model", required=True, help="a model folder (save_pretrained) or a hub id in the HF cache")
    parser.add_argument("--out", required=True, help="new folder for the prepared model and tokenizer")
    parser.add_argument("--tokenizer", default=None, help="take the tokenizer from this folder / hub id instead")
    parser.add_argument("--download", action="store_true",
                        help="download a hub id missing from the cache first (refused under HF_HUB_OFFLINE)")


def main_args(args) -> int:
    from twlib.hub import ModelNotFound

    try:
        result = prepare_model(args.model, args.out, args.tokenizer, args.download)
    except (ModelNotFound, FileExistsError, ValueError, OSError) as e:
        print(f"twlib prepare-model: {e}", file=sys.stderr)
        return 2
    added = ", ".join(f"{t}={result['ids'][t]}" for t in result["added"]) or "none (already single tokens)"
    print(f"{args.model} -> {result['out']}: added {added}; tokenizer {result['vocab']} tokens, "
          f"embedding {result['rows']} rows (new rows: mean of each tag's former pieces)")
    return 0
