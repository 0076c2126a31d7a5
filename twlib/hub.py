"""Model names in configs and commands: a local folder or a Hugging Face hub id, resolved to a local folder.

    resolve_model("runs/qwen3-0.6b-sft/final")   -> that folder (it exists)
    resolve_model("Qwen/Qwen3-0.6B")             -> ~/.cache/huggingface/hub/models--Qwen--Qwen3-0.6B/snapshots/<hash>

Design choices
- An existing path always wins: `models/Qwen3-0.6B` is a folder when there is one, a hub id only when not.
- Hub ids are read from huggingface_hub's cache only (`snapshot_download(local_files_only=True)`, the
  snapshot `refs/main` points at). Nothing downloads implicitly: a training run that silently pulled 16 GB
  (or hung on a machine without network) would be worse than an error that names `hf download <id>`. The
  one explicit exception is `download=True` (`python -m twlib prepare-model --download`), refused when
  HF_HUB_OFFLINE is set.
- The cache folder is read from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub, else
  huggingface_hub's default), not from huggingface_hub's import-time constant, so tests and callers can
  point it elsewhere.
- A snapshot is checked for what the caller needs: `config.json` and every weight file (all shards of a
  `*.index.json`; a partial download names the missing shards), or just the tokenizer files.
- Errors are `ModelNotFound` (a ValueError) whose message names the model, the cache folder and the
  command that fixes it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = ["ModelNotFound", "resolve_model", "hub_cache_dir", "looks_like_hub_id", "offline"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
NEEDS = ("weights", "config", "tokenizer")


class ModelNotFound(ValueError):
    """A model name that is neither a local folder nor a complete snapshot in the hub cache."""


def looks_like_hub_id(name: str) -> bool:
    """`Org/Name`: two path components of letters, digits, `_ . -`; not `./x`, `/abs`, `a/b/c`."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps models: $HF_HUB_CACHE, else $HF_HOME/hub, else its default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1 / true / yes / on), at call time."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _missing(folder: Path, need: str) -> list[str]:
    """What `folder` lacks for `need` (empty: usable)."""
    if need == "tokenizer":
        found = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
        return [] if found else ["tokenizer files (tokenizer.json / tokenizer_config.json)"]
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if need == "weights":
        indexes = sorted(folder.glob("*.index.json"))
        if indexes:
            try:
                shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                return missing + [f"a readable {indexes[0].name} ({e})"]
            missing += [s for s in shards if not (folder / s).is_file()]
        elif not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            missing.append("weights (*.safetensors)")
    return missing


def resolve_model(name: str, need: str = "weights", download: bool = False) -> str:
    """A local folder holding `name` (a folder path or a hub id), with what `need` says; ModelNotFound if not.

    need: "weights" (config.json + every weight file), "config" (config.json) or "tokenizer".
    download: fetch a missing hub id with huggingface_hub (never by default; refused under HF_HUB_OFFLINE).
    """
    if need not in NEEDS:
        raise ValueError(f"need must be one of {', '.join(NEEDS)}, got {need!r}")
    name = str(name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFound(f"model {name!r} is a file; expected a folder written by save_pretrained or a hub id")
        missing = _missing(path, need)
        if missing:
            raise ModelNotFound(f"model folder {name!r} lacks {', '.join(missing)}")
        return str(path)
    if not looks_like_hub_id(name):
        raise ModelNotFound(f"model {name!r}: no such folder (and not a hub id of the form Org/Name)")

    cache = hub_cache_dir()
    fix = f"download it first: `hf download {name}` (or `python -m twlib prepare-model --model {name} --download ...`)"
    if offline():
        fix += "; HF_HUB_OFFLINE is set, so do that on a machine with network access to the Hub and copy the cache"
    if download:
        if offline():
            raise ModelNotFound(f"model {name!r}: cannot download with HF_HUB_OFFLINE set; unset it or {fix}")
        from huggingface_hub import snapshot_download

        return snapshot_download(name, cache_dir=str(cache))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(name, cache_dir=str(cache), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise ModelNotFound(f"model {name!r} is not a local folder, and as a hub id it is not in the Hugging Face "
                            f"cache ({cache}): {fix}") from None
    missing = _missing(snapshot, need)
    if missing:
        raise ModelNotFound(f"model {name!r}: the cached snapshot {snapshot} lacks {', '.join(missing)}: {fix}")
    return str(snapshot)
