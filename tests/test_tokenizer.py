"""Tests for twlib.tokenizer: byte-level round trips, fixed ids, tags, save/load, add_thread_tokens."""

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from twlib.models import build_model, tiny_config
from twlib.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    TAGS,
    add_thread_tokens,
    build_tokenizer,
    bytes_to_unicode,
    tag_ids,
)

SAMPLES = [
    "",
    "a",
    "1+2=3",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\ttab\r\n",
    "héllo wörld, naïve café, 東京, emoji 🧵⚡️",
    "<think>\nplan\n</think>\n\n\\boxed{42}",
    "<Parallel>\n<Outlines>\n<Outline>1: plan A</Outline>\n<Outline>2: plan B</Outline>\n</Outlines>\n"
    "<Thread>\n1: body A\n</Thread><Thread>\n2: body B\n</Thread>\n</Parallel>\n",
    "<Parallel<Thread>>< /Thread>",  # near-misses must stay plain bytes
    "<|endoftext|><|pad|>",
    "\x00\x01\x7f",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def roundtrip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip(tok, text):
    assert roundtrip(tok, text) == text


def test_roundtrip_every_byte_value(tok):
    # Every unicode code point class that UTF-8 encodes with 1, 2, 3 and 4 bytes.
    text = "".join(chr(c) for c in [*range(0, 128), 0xE9, 0x3B1, 0x6771, 0x1F9F5])
    assert roundtrip(tok, text) == text


def test_one_token_per_byte(tok):
    text = "héllo 🧵\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.unk_token_id is None


def test_id_layout(tok):
    assert len(tok) == 268
    assert tok.pad_token_id == 0 and tok.convert_ids_to_tokens(0) == PAD_TOKEN
    assert tok.eos_token_id == 1 and tok.convert_ids_to_tokens(1) == EOS_TOKEN
    assert tag_ids(tok) == {tag: 2 + i for i, tag in enumerate(TAGS)}
    # Byte b has id 12 + b; whitespace uses the byte-level names llama.cpp expects.
    assert tok.encode(" \nA", add_special_tokens=False) == [12 + 32, 12 + 10, 12 + 65]
    assert tok.convert_ids_to_tokens([12 + 32, 12 + 10]) == ["Ġ", "Ċ"]


def test_layout_without_tags_keeps_byte_order():
    plain = build_tokenizer(with_tags=False)
    assert len(plain) == 258
    assert (plain.pad_token_id, plain.eos_token_id) == (0, 1)
    byte_chars = bytes_to_unicode()
    assert plain.convert_ids_to_tokens(list(range(2, 258))) == [byte_chars[b] for b in range(256)]
    with pytest.raises(ValueError, match="<Parallel>"):
        tag_ids(plain)


def test_tags_are_single_special_tokens(tok):
    ids = tag_ids(tok)
    for tag in TAGS:
        assert tok.encode(tag, add_special_tokens=False) == [ids[tag]]
    assert set(TAGS) <= set(tok.all_special_tokens)
    text = "x<Thread>\n1: a\n</Thread>y"
    assert tok.encode(text, add_special_tokens=False).count(ids["<Thread>"]) == 1
    # Special tokens are dropped on request: trajectories must decode with skip_special_tokens=False.
    assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True) == "x\n1: a\ny"


def test_no_bos_eos_added_and_right_padding(tok):
    assert tok("ab")["input_ids"] == tok.encode("ab", add_special_tokens=False)
    batch = tok(["a", "abc"], padding=True)
    assert batch["input_ids"][0] == [12 + ord("a"), 0, 0]
    assert batch["attention_mask"][0] == [1, 0, 0]
    assert tok.model_max_length == 4096


def test_build_is_deterministic():
    assert build_tokenizer().get_vocab() == build_tokenizer().get_vocab()


def test_save_and_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        assert loaded.get_vocab() == tok.get_vocab()
        assert tag_ids(loaded) == tag_ids(tok)
        assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 1)
        assert loaded.padding_side == "right" and loaded.model_max_length == 4096
        for text in SAMPLES:
            assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
            assert roundtrip(loaded, text) == text


# ---- add_thread_tokens ---------------------------------------------------------------------


def check_new_rows(weight_before, weight_after, plain_tok, added):
    """Each new row equals the mean of the old rows of the tag's old pieces."""
    for tag in added:
        pieces = plain_tok.encode(tag, add_special_tokens=False)
        assert len(pieces) == len(tag)  # one byte each before the tag existed
        new_id = added[tag]
        torch.testing.assert_close(weight_after[new_id], weight_before[pieces].mean(dim=0))


@pytest.mark.parametrize("tied", [True, False])
def test_add_thread_tokens(tied):
    tokenizer = build_tokenizer(with_tags=False)
    reference = build_tokenizer(with_tags=False)  # untouched copy, to re-tokenize tags the old way
    model = build_model(tiny_config("tiny", vocab_size=len(tokenizer), tie_word_embeddings=tied), tokenizer)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()

    added = add_thread_tokens(model, tokenizer)

    assert added == list(TAGS)
    ids = tag_ids(tokenizer)  # every tag is one token now
    assert sorted(ids.values()) == list(range(258, 268))
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert embed.shape[0] == len(tokenizer) == 268
    assert (head is embed) == tied
    torch.testing.assert_close(embed[:258], embed_before)  # old rows untouched
    check_new_rows(embed_before, embed.detach(), reference, ids)
    if not tied:
        assert not torch.equal(head_before, embed_before)  # a real untied head, its own init
        assert head.shape[0] == 268
        torch.testing.assert_close(head[:258], head_before)
        check_new_rows(head_before, head.detach(), reference, ids)

    # Idempotent: nothing more to add, nothing changes.
    snapshot = embed.detach().clone()
    assert add_thread_tokens(model, tokenizer) == []
    assert len(tokenizer) == 268
    torch.testing.assert_close(model.get_input_embeddings().weight, snapshot)

    # The grown model still runs on the tags.
    batch = torch.tensor([tokenizer.encode("<Parallel>\n<Thread>\n1: a\n</Thread>", add_special_tokens=False)])
    assert model(batch).logits.shape == (1, batch.shape[1], 268)


def test_add_thread_tokens_only_missing_and_no_shrink():
    """Like Qwen3: <think> already exists, and the embedding has spare rows past the tokenizer."""
    tokenizer = build_tokenizer(with_tags=False)
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=False)
    model = build_model("tiny", tokenizer, seed=0)
    model.resize_token_embeddings(300, mean_resizing=False)  # padded vocab, like Qwen3's 151,936

    added = add_thread_tokens(model, tokenizer)

    assert added == [tag for tag in TAGS if tag not in ("<think>", "</think>")]
    assert len(tokenizer) == 268
    assert model.get_input_embeddings().weight.shape[0] == 300  # never shrinks
    assert tag_ids(tokenizer)["<think>"] == 258
