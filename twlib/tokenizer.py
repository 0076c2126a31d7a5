"""
Tokenizer for ThreadWeaver Lab: a byte-level "character" tokenizer for the toy tasks,
plus the helpers for a real Qwen3 tokenizer: `add_thread_tokens` (teach it and its model the tags),
`require_single_token_tags` (refuse one that splits a tag, naming `python -m twlib prepare-model`),
and `chat_prompt` / `chat_example` / `chat_problems` (prompts and training examples rendered by the
tokenizer's own chat template, as the reference data is).

Design choices:
- One token per byte. The synthetic tasks are tiny (digits, letters, a few symbols), so a
  learned BPE would only hide the arithmetic from the model. Every byte of any UTF-8
  string is exactly one token, so there is no unknown token and decode(encode(s)) == s.
- It is still a *BPE* model (with no merges) over the 256 GPT-2 byte-to-unicode
  characters, with a ByteLevel pre-tokenizer and decoder, i.e. the same machinery as
  Qwen3/GPT-2. That matters later: llama.cpp's GGUF converter understands this layout,
  and whitespace must be spelled `Ġ` (space) and `Ċ` (newline) or it is dropped.
  (The converter also wants at least one merge rule; that is its concern, not ours.)
- Every ThreadWeaver tag (`<Parallel>`, `<Thread>`, ...) is ONE special token, as in the
  paper: a tag is a single decision for the model and a single stop string for inference.
- Fixed id layout, so checkpoints and tests never depend on insertion order:
      with_tags=True : 0 <|pad|>, 1 <|endoftext|>, 2..11 TAGS (in TAGS order), 12..267 bytes
      with_tags=False: 0 <|pad|>, 1 <|endoftext|>,                             2..257 bytes
  Byte b always has id `n_special + b` (bytes sorted by value), so the relative order of
  the byte ids is the same in both layouts. add_thread_tokens() on the with_tags=False
  tokenizer appends the tags at 258..267 (the usual "extend a pretrained vocab" path).
- No post-processor: encode() adds no BOS/EOS, like Qwen3. Callers append eos themselves.
- The tags are *special*, so decode(..., skip_special_tokens=True) removes them: decode
  trajectories with skip_special_tokens=False.
- Real tokenizers: the tag check looks each tag up (never `get_vocab()`, a 0.1 s copy of Qwen3's
  vocabulary) because the decoder runs it every time it is built. Chat rendering goes through
  `apply_chat_template` itself, never a hand-written copy of Qwen3's template, and training responses
  are returned as the template renders them (Qwen3 writes one blank line after `</think>`).
"""

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"

TAGS = (
    "<think>", "</think>",
    "<Parallel>", "</Parallel>",
    "<Outlines>", "</Outlines>",
    "<Outline>", "</Outline>",
    "<Thread>", "</Thread>",
)

MODEL_MAX_LENGTH = 4096


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map.

    Printable Latin-1 bytes map to themselves; the rest (control chars, space, ...) are
    shifted to code points >= 256 so that no token is whitespace or invisible. Written out
    here because transformers 5 no longer exports it and the table must never change.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + shift)
            shift += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def special_tokens(with_tags: bool = True) -> list[str]:
    """Special tokens in id order (they occupy ids 0..n-1)."""
    return [PAD_TOKEN, EOS_TOKEN, *(TAGS if with_tags else ())]


def build_tokenizer(with_tags: bool = True) -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer (see the module docstring for the id layout)."""
    specials = special_tokens(with_tags)
    vocab = {token: i for i, token in enumerate(specials)}
    byte_chars = bytes_to_unicode()
    for b in range(256):
        vocab[byte_chars[b]] = len(vocab)
    # A BPE over the byte alphabet with no merges: every byte stays one token.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no GPT-2 word splitting, we want raw bytes; no prefix space,
    # so encode("1+2") does not silently become " 1+2".
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    # The special tokens already sit in the model vocab, so registering them as added
    # tokens keeps their ids (0, 1, 2, ...) and makes the matcher treat each as one unit.
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    tags = [AddedToken(t, special=True, normalized=False) for t in TAGS] if with_tags else []
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=tags,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
    )


def _tag_tokens(tokenizer) -> tuple[dict[str, int], dict[str, list[int]]]:
    """({tag: id} of the tags that are one token, {tag: its encoding} of those that are not).

    A tag counts as one token when encode(tag) is exactly the id the vocabulary gives the tag string
    (not just that the string is in the vocab): that catches vocabularies where the tag exists but the
    pre-tokenizer would split it. Looked up tag by tag: `get_vocab()` copies the whole vocabulary
    (0.1 s for Qwen3's 151k entries), and the decoder checks the tags every time it is built."""
    ids, split = {}, {}
    for tag in TAGS:
        encoded = list(tokenizer.encode(tag, add_special_tokens=False))
        token_id = tokenizer.convert_tokens_to_ids(tag)
        if (len(encoded) == 1 and encoded[0] == token_id and token_id is not None
                and tokenizer.convert_ids_to_tokens(token_id) == tag):
            ids[tag] = token_id
        else:
            split[tag] = encoded
    return ids, split


def tag_ids(tokenizer) -> dict[str, int]:
    """Map each tag to its token id; ValueError naming the tags that are not single tokens."""
    ids, split = _tag_tokens(tokenizer)
    if split:
        raise ValueError(f"tokenizer lacks single-token tags: {', '.join(split)}")
    return ids


def _mean_rows(weight, rows: list[int]):
    """Mean of the given rows of an embedding-like matrix, in float32 for accuracy."""
    return weight[rows].float().mean(dim=0).to(weight.dtype)


def add_thread_tokens(model, tokenizer) -> list[str]:
    """Add the missing TAGS to tokenizer and model; return the tags added (idempotent).

    Each new embedding row starts as the mean of the rows of the pieces the tag string
    was split into before it became a token (e.g. "<", "Parallel", ">"), as the
    ThreadWeaver reference does: the model starts from something close to what it
    already read for that text instead of from noise. An untied lm_head gets the same
    treatment from its own rows. Works for real Qwen3 tokenizers and for the
    build_tokenizer(with_tags=False) tokenizer.
    """
    vocab = tokenizer.get_vocab()
    missing = [tag for tag in TAGS if tag not in vocab]
    # Record how the tags split *before* adding them; afterwards they are one token.
    pieces = {tag: tokenizer.encode(tag, add_special_tokens=False) for tag in missing}
    if missing:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in missing]},
            replace_extra_special_tokens=False,
        )

    # Only grow: real Qwen3 checkpoints pad the embedding (151,936 rows) beyond the
    # tokenizer (151,669 entries), so new ids may already have rows. mean_resizing off:
    # we set the new rows ourselves below, and its covariance sampling is slow on big vocabs.
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if not missing:
        return []

    new_ids = {tag: tokenizer.convert_tokens_to_ids(tag) for tag in missing}
    inputs = model.get_input_embeddings().weight
    outputs = model.get_output_embeddings()
    untied = outputs is not None and outputs.weight is not inputs
    with torch.no_grad():
        for tag in missing:
            inputs[new_ids[tag]] = _mean_rows(inputs, pieces[tag])
            if untied:
                outputs.weight[new_ids[tag]] = _mean_rows(outputs.weight, pieces[tag])
    return missing



# ---- real tokenizers: the tag check and Qwen3's chat template -----------------------------------------

PREPARE_COMMAND = "python -m twlib prepare-model --model {model} --out {out}"


class TagsNotSingleTokens(ValueError):
    """A tokenizer that splits thread tags into several tokens; the message names them and the fix."""


def require_single_token_tags(tokenizer, model: str | None = None) -> dict[str, int]:
    """`tag_ids(tokenizer)`, or TagsNotSingleTokens naming every tag that splits (with its pieces) and the
    command that fixes it (`python -m twlib prepare-model`). Called where a run starts: the trainers
    (twlib.train.sft, twlib.train.pgrpo) and the parallel decoder, so an unprepared Qwen3 fails at once, not as a
    silently wrong trie or a decoder that never sees `</Outlines>`."""
    ids, split = _tag_tokens(tokenizer)
    if not split:
        return ids
    name = str(model or getattr(tokenizer, "name_or_path", "") or "MODEL")
    out = f"models/{Path(name.rstrip('/')).name or 'model'}-threadweaver"
    listed = ", ".join(f"{tag} -> {ids}" for tag, ids in split.items())
    raise TagsNotSingleTokens(
        f"tokenizer {name!r} splits {len(split)} thread tag(s) into several tokens: {listed}. Every tag must be "
        f"a single token (spec 1). Add them (and embedding rows) once with: "
        f"{PREPARE_COMMAND.format(model=name, out=out)} and use that folder as the model")


def _render(tokenizer, messages: list[dict], **kwargs) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template "
                         f"(tokenizer_config.json 'chat_template' or chat_template.jinja)")
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def chat_prompt(tokenizer, question: str, system: str | None = None) -> str:
    """The prompt a chat model is conditioned on: the user turn and the assistant header, rendered by the
    tokenizer's own chat template (`add_generation_prompt=True`), as the reference data is. For Qwen3:
    `<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`; the response then starts with
    `<think>\\n` (thinking mode; `enable_thinking=False` would pre-fill an empty think block instead)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return _render(tokenizer, messages, add_generation_prompt=True)


def chat_example(tokenizer, question: str, response: str, system: str | None = None) -> tuple[str, str]:
    """(prompt, response) of one training example as the chat template renders the user turn + the assistant
    turn `response` (`<think>\\n{reasoning}\\n</think>\\n\\n{answer}`).

    The returned response is the template's rendering, which may differ from the input: Qwen3's template
    strips the reasoning's outer newlines and writes exactly one blank line after `</think>`. The end-of-turn
    token is not part of it (the trainer appends EOS, `<|im_end|>` for Qwen3); a template that does not end
    the assistant turn with the tokenizer's EOS is an error, since training would then stop on a token the
    model never ends with."""
    prompt = chat_prompt(tokenizer, question, system)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}, {"role": "assistant", "content": response}]
    full = _render(tokenizer, messages)
    if not full.startswith(prompt):
        raise ValueError("chat template: the rendered conversation does not start with the generation prompt "
                         f"({prompt[-40:]!r} vs {full[len(prompt) - 40:len(prompt)]!r}); cannot split prompt/response")
    rest = full[len(prompt):]
    eos = tokenizer.eos_token or ""
    end = rest.rfind(eos) if eos else -1
    if end < 0 or rest[end + len(eos):].strip():
        raise ValueError(f"chat template: the assistant turn does not end with the EOS token {eos!r} "
                         f"(it ends {rest[-40:]!r})")
    return prompt, rest[:end]


def chat_problems(problems, tokenizer, system: str | None = None) -> list:
    """Problems with the prompt rendered by the chat template (`chat_prompt` of the question) and the
    responses as the template renders the assistant turn (`chat_example`); empty responses (prompt pools)
    stay empty. `meta["chat_template"]` records the tokenizer."""
    import dataclasses

    out = []
    name = getattr(tokenizer, "name_or_path", "") or "chat template"
    for p in problems:
        fields = {"prompt": chat_prompt(tokenizer, p.question, system), "meta": {**p.meta, "chat_template": str(name)}}
        for key in ("sequential", "parallel"):
            text = getattr(p, key)
            if text:
                fields[key] = chat_example(tokenizer, p.question, text, system)[1]
        out.append(dataclasses.replace(p, **fields))
    return out
