"""Convert a twlib checkpoint (a tiny Qwen3 with the lab's character tokenizer) to GGUF for llama.cpp,
with llama.cpp's own converter, and check the result.

    python scripts/convert_tiny_to_gguf.py \\
        --converter .venv-llamacpp/src/llama_cpp_python-X/vendor/llama.cpp/convert_hf_to_gguf.py \\
        --model assets/checkpoints/toy-parallel --out runs/llamacpp/toy-parallel-f32.gguf

Run it with a Python that has torch, transformers, numpy, safetensors, pyyaml and sentencepiece (the
converter imports them all; `scripts/setup_llamacpp_server.sh` uses the lab's .venv plus sentencepiece
in a side folder on PYTHONPATH). The converter puts its own `gguf-py` on sys.path.

Design choices (what ../shared/reference/cpu-facts.md measured, and what reading the converter adds)
- The converter ships only in llama-cpp-python's source archive (`vendor/llama.cpp/`), so its path is
  an argument; it is imported as a module and patched here, never edited.
- Whitespace tokens must be spelled with the byte-level names (`Ġ` space, `Ċ` newline) or llama.cpp
  drops them: `twlib.tokenizer` already uses GPT-2's byte-to-unicode table; checked, with a clear error.
- A GGUF "gpt2" vocabulary needs at least one merge rule, and ours has none (one token per byte). The
  staged copy gets a `merges.txt` with one rule that can never fire, `ÿ ÿ`: byte 0xFF never occurs in
  UTF-8 text. (It cannot go into tokenizer.json: HF tokenizers reject a merge whose result is not in the
  vocabulary, and the converter loads the tokenizer with transformers.)
- The converter identifies the pre-tokenizer by hashing the tokens of a test string and refuses unknown
  hashes. We declare `qwen2`'s: with no merges that apply, word splitting cannot change any token, and
  `qwen2` keeps spaces as written when detokenising.
- The ThreadWeaver tags are written as USER_DEFINED tokens, not CONTROL: llama.cpp prints CONTROL tokens
  as nothing in completion text, so the stop string `</Thread>` would never match and the text could
  not be re-tokenised. USER_DEFINED tokens are still read as one token in prompts. `<|endoftext|>` and
  `<|pad|>` stay CONTROL (EOS ends generation by id).
- `add_bos_token` / `add_eos_token` are false (as for Qwen): our prompts start with the question.
- transformers 5 stores rope_theta under `rope_parameters`; older converters read the top-level key, so
  the staged config.json gets both.
- f32 weights: the model is tiny, and f32 keeps llama.cpp's logits equal to transformers' up to
  rounding, which the server test tier's greedy equality needs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

TAGS = ("<think>", "</think>", "<Parallel>", "</Parallel>", "<Outlines>", "</Outlines>", "<Outline>",
        "</Outline>", "<Thread>", "</Thread>")
NEVER_MERGE = "ÿ ÿ"  # 0xFF 0xFF: impossible in UTF-8, so this rule never applies
PRE_TOKENIZER = "qwen2"


def stage(model: Path, into: Path) -> Path:
    """A copy of the checkpoint with the small config / tokenizer additions the converter needs."""
    shutil.copytree(model, into)
    config = json.loads((into / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    (into / "config.json").write_text(json.dumps(config, indent=2))
    tok_config_path = into / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text()) if tok_config_path.exists() else {}
    tok_config.update(add_bos_token=False, add_eos_token=False)
    tok_config_path.write_text(json.dumps(tok_config, indent=2))
    tokenizer = json.loads((into / "tokenizer.json").read_text())
    vocab, merges = tokenizer["model"]["vocab"], tokenizer["model"].get("merges") or []
    if "Ġ" not in vocab or "Ċ" not in vocab:
        raise SystemExit("the tokenizer must spell space and newline as the byte-level tokens 'Ġ' and 'Ċ' "
                         "(GPT-2's byte-to-unicode table) or llama.cpp drops them; see twlib.tokenizer")
    if not merges:
        (into / "merges.txt").write_text(f"#version: 0.2\n{NEVER_MERGE}\n", encoding="utf-8")
    return into


def load_converter(path: Path):
    if not path.is_file():
        raise SystemExit(f"no converter at {path}: it ships in llama-cpp-python's source archive, "
                         f"vendor/llama.cpp/convert_hf_to_gguf.py")
    # Newer llama.cpp splits the converter into a `conversion` package beside the script: import from there.
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["convert_hf_to_gguf"] = module
    spec.loader.exec_module(module)  # puts its vendored gguf-py first on sys.path
    return module


def patch_converter(module) -> None:
    """Declare the pre-tokenizer and make the tags USER_DEFINED (see the module docstring)."""
    gguf = getattr(module, "gguf", None) or importlib.import_module("gguf")
    # The class that builds GPT-2 style vocabularies: `TextModel` in new converters (in the `conversion`
    # package since llama.cpp split the script up), `Model` in old ones.
    places = [module]
    try:
        places.append(importlib.import_module("conversion.base"))
    except ImportError:
        pass
    base = next((cls for place in places for name in ("TextModel", "Model")
                 if (cls := getattr(place, name, None)) is not None and hasattr(cls, "get_vocab_base")), None)
    if base is None:
        raise SystemExit("this convert_hf_to_gguf.py has no TextModel/Model.get_vocab_base: unsupported version")
    original = base.get_vocab_base

    def get_vocab_base_pre(self, tokenizer) -> str:
        return PRE_TOKENIZER

    def get_vocab_base(self):
        tokens, toktypes, tokpre = original(self)
        for i, token in enumerate(tokens):
            if token in TAGS:
                toktypes[i] = gguf.TokenType.USER_DEFINED
        return tokens, toktypes, tokpre

    base.get_vocab_base_pre = get_vocab_base_pre
    base.get_vocab_base = get_vocab_base


def field_value(field):
    """A GGUF metadata value from gguf-py's ReaderField (strings, scalars and arrays of them)."""
    from gguf import GGUFValueType

    def one(index, kind):
        part = field.parts[index]
        return bytes(part).decode("utf-8") if kind == GGUFValueType.STRING else part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [one(i, field.types[1]) for i in field.data]
    return one(field.data[0], field.types[0])


def check(gguf_path: Path, model: Path) -> list[str]:
    """Read the GGUF back: vocabulary, token types, merges, BOS, pre-tokenizer. Returns problems found."""
    from gguf import GGUFReader, TokenType
    from transformers import AutoTokenizer

    reader = GGUFReader(gguf_path)
    get = lambda key: field_value(reader.fields[key]) if key in reader.fields else None
    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    tokens, types = get("tokenizer.ggml.tokens") or [], get("tokenizer.ggml.token_type") or []
    problems = []
    if get("general.architecture") != "qwen3":
        problems.append(f"architecture is {get('general.architecture')!r}, not 'qwen3'")
    if tokens[: len(vocab)] != [t for t, _ in vocab]:
        problems.append("the GGUF token list differs from the tokenizer's vocabulary")
    for tag in TAGS:
        if tag in tokens and types[tokens.index(tag)] != TokenType.USER_DEFINED:
            problems.append(f"{tag} is token type {types[tokens.index(tag)]}, not USER_DEFINED")
    if not get("tokenizer.ggml.merges"):
        problems.append("no merge rule (llama.cpp refuses a gpt2 vocabulary without merges)")
    if get("tokenizer.ggml.add_bos_token") is not False:
        problems.append(f"add_bos_token is {get('tokenizer.ggml.add_bos_token')!r}, not False")
    if get("tokenizer.ggml.pre") != PRE_TOKENIZER:
        problems.append(f"pre-tokenizer is {get('tokenizer.ggml.pre')!r}")
    if get("tokenizer.ggml.eos_token_id") != tokenizer.eos_token_id:
        problems.append(f"eos id {get('tokenizer.ggml.eos_token_id')} != {tokenizer.eos_token_id}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--converter", required=True, type=Path, help="vendor/llama.cpp/convert_hf_to_gguf.py")
    parser.add_argument("--model", required=True, type=Path, help="a checkpoint directory (save_pretrained)")
    parser.add_argument("--out", required=True, type=Path, help="the .gguf file to write")
    args = parser.parse_args(argv)

    module = load_converter(args.converter.resolve())
    patch_converter(module)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage(args.model.resolve(), Path(tmp) / args.model.name)
        sys.argv = ["convert_hf_to_gguf.py", str(staged), "--outfile", str(args.out.resolve()), "--outtype", "f32"]
        module.main()
    problems = check(args.out, args.model)
    if problems:
        print("the GGUF is not what llama.cpp needs:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB); vocabulary, tags, merge rule, BOS checked")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
