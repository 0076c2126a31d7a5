"""twlib.hub: hub ids resolve through a local Hugging Face cache (never the network); clear errors otherwise."""

import json
from pathlib import Path

import pytest

from twlib.hub import ModelNotFound, looks_like_hub_id, resolve_model

HASH = "0123456789abcdef0123456789abcdef01234567"


def snapshot(cache: Path, repo: str, files: dict[str, str]) -> Path:
    """Lay out `repo` as huggingface_hub's cache does: models--Org--Name/{refs/main, snapshots/<hash>/...}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(HASH)
    snap = root / "snapshots" / HASH
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "hub").mkdir()
    monkeypatch.chdir(tmp_path)  # relative names are not found by accident in the repository
    return tmp_path / "hub"


def test_hub_id_resolves_to_the_cached_snapshot(cache):
    snap = snapshot(cache, "Org/Tiny-Model", {"config.json": "{}", "model.safetensors": "x"})
    assert resolve_model("Org/Tiny-Model") == str(snap)
    assert resolve_model("Org/Tiny-Model", need="config") == str(snap)


def test_sharded_snapshot_names_the_missing_shard(cache):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    snapshot(cache, "Org/Sharded", {"config.json": "{}", "model.safetensors.index.json": json.dumps(index),
                                    "model-00001-of-00002.safetensors": "x"})
    with pytest.raises(ModelNotFound, match=r"lacks model-00002-of-00002\.safetensors.*hf download Org/Sharded"):
        resolve_model("Org/Sharded")


def test_missing_hub_id_names_the_download_command(cache):
    with pytest.raises(ModelNotFound, match=r"'Qwen/Qwen3-0\.6B'.*not in the Hugging Face cache.*"
                                            r"`hf download Qwen/Qwen3-0\.6B`.*HF_HUB_OFFLINE"):
        resolve_model("Qwen/Qwen3-0.6B")
    with pytest.raises(ModelNotFound, match="cannot download with HF_HUB_OFFLINE set"):
        resolve_model("Qwen/Qwen3-0.6B", download=True)  # offline: refused before any network access


def test_config_without_weights_is_not_a_model(cache):
    snapshot(cache, "Org/ConfigOnly", {"config.json": "{}", "tokenizer.json": "{}"})
    with pytest.raises(ModelNotFound, match=r"lacks weights.*hf download Org/ConfigOnly"):
        resolve_model("Org/ConfigOnly")
    assert resolve_model("Org/ConfigOnly", need="tokenizer").endswith(HASH)


def test_local_folder_wins_and_is_checked(cache, tmp_path):
    local = tmp_path / "Org" / "Tiny-Model"  # same spelling as a hub id: the folder wins
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match=r"model folder 'Org/Tiny-Model' lacks weights"):
        resolve_model("Org/Tiny-Model")
    (local / "model.safetensors").write_text("x")
    assert resolve_model("Org/Tiny-Model") == "Org/Tiny-Model"
    with pytest.raises(ModelNotFound, match="no such folder"):
        resolve_model("runs/not/there")
    assert looks_like_hub_id("Qwen/Qwen3-8B") and not looks_like_hub_id("runs/a/b")
    assert not looks_like_hub_id("../x") and not looks_like_hub_id("/abs/x")


def test_sft_loads_a_hub_id_from_the_cache(cache):
    """A config's `model:` may be a hub id: the tokenizer and weights come from the cached snapshot."""
    import torch

    from twlib.models import build_model
    from twlib.checkpoint import load_base_model, load_tokenizer, resolve_runtime
    from twlib.config import ConfigError, SFTConfig
    from twlib.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = build_model("tiny", tok, seed=3)
    root = cache / "models--Org--Tiny"
    snap = root / "snapshots" / HASH
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(HASH)

    loaded_tok = load_tokenizer("Org/Tiny")
    assert loaded_tok.get_vocab() == tok.get_vocab()
    rt = resolve_runtime(SFTConfig(device="cpu"))
    loaded = load_base_model("Org/Tiny", loaded_tok, 0, rt)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with pytest.raises(ConfigError, match=r"field 'model'.*hf download Org/Missing"):
        load_tokenizer("Org/Missing")
    with pytest.raises(ConfigError, match=r"field 'model'.*hf download Org/Missing"):
        load_base_model("Org/Missing", tok, 0, rt)


def test_plan_reads_a_cached_hub_ids_config(cache):
    """plan --dry-run: a cached hub id gives its own config.json; an uncached one falls back to the name."""
    from twlib.models import tiny_config
    from twlib.infra.planner import resolve_model as plan_model

    config = tiny_config("tiny", vocab_size=300)
    snap = snapshot(cache, "Org/Qwen3-8B", {})  # named like a Qwen3 size, but the cached config wins
    config.save_pretrained(snap)
    _, shape, note = plan_model("Org/Qwen3-8B")
    assert note == f"checkpoint {snap}" and shape.name == "Qwen3-8B" and shape.hidden == 128
    _, shape, note = plan_model("Qwen/Qwen3-8B")  # not cached: the published architecture by name
    assert shape.hidden == 4096 and "not found locally" in note


def test_eval_command_names_the_download(cache, capsys):
    from twlib.cli import main

    assert main(["eval", "--model", "Org/NotCached", "--n", "1"]) == 2
    assert "hf download Org/NotCached" in capsys.readouterr().err
