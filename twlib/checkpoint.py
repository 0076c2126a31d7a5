"""What the trainers share around the loop: where the model runs, loading it, and checkpoints that resume exactly.

Design choices
- `resolve_runtime`: `dtype="auto"` is float32 on CPU and bfloat16 on CUDA; `attn="auto"` is sdpa with the
  dense bool ancestor mask on CPU (FlexAttention has no backward pass on CPU in torch 2.13) and
  flex_attention with the `BlockMask` on CUDA; eager gets the additive float mask (a bool mask is silently
  wrong with eager).
- Models: a preset is built from scratch (seeded); a folder or a cached hub id is loaded in float32 and
  cast, never downloaded (twlib.hub). The tokenizer comes with a checkpoint folder, else it is the
  project's byte tokenizer.
- Checkpoints are written to a temporary directory and swapped in by renames (`swap_into_place`): at every
  instant either `checkpoint/` or `checkpoint.old/` is complete, and `find_checkpoint` falls back to
  `checkpoint.old/` when a crash fell between the two renames. A checkpoint holds the model (or the LoRA
  adapter), optimizer, scheduler, RNG states (torch, python, numpy, CUDA), trainer state and config.
- `fork_rng`: code inside (an eval hook, a rollout engine) may consume any RNG; the training RNG states
  are restored after it, so evaluating never changes training.
- `truncate_metrics`: a resumed run drops the metric rows after its checkpoint and writes them again.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from twlib.config import DTYPES, ConfigError, save_config

__all__ = ["CHECKPOINT", "CHECKPOINT_OLD", "CHECKPOINT_TMP", "Runtime", "resolve_runtime", "load_tokenizer",
           "load_base_model", "enable_gradient_checkpointing", "wrap_lora", "load_lora_weights", "console",
           "torch_threads", "rng_state", "set_rng_state", "fork_rng", "quiet_hf_bars", "save_model", "swap_into_place",
           "save_checkpoint", "find_checkpoint", "load_checkpoint_state", "truncate_metrics"]

CHECKPOINT, CHECKPOINT_OLD, CHECKPOINT_TMP = "checkpoint", "checkpoint.old", ".checkpoint.tmp"
MASK_KIND = {"sdpa": "bool", "eager": "float", "flex_attention": "block"}


# ----------------------------------------------------------------------------------------------------
# Where the model runs


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    attn: str
    mask_kind: str
    autocast: bool


def resolve_runtime(config) -> Runtime:
    """Device, dtype, attention implementation and mask kind of a trainer config (`auto` resolved)."""
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if config.device == "auto" else config.device))
    dtype = DTYPES[config.dtype] if config.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    attn = config.attn if config.attn != "auto" else ("flex_attention" if device.type == "cuda" else "sdpa")
    if attn == "flex_attention" and device.type == "cpu":
        raise ConfigError("field 'attn': flex_attention has no backward pass on CPU (torch 2.13); "
                          "use attn: sdpa (or auto) to train on CPU")
    return Runtime(device, dtype, attn, MASK_KIND[attn], bool(config.autocast))


# ----------------------------------------------------------------------------------------------------
# Loading a model


def _local_model(model: str, need: str) -> str:
    """A local folder for a checkpoint directory or a hub id in the HF cache (twlib.hub); ConfigError if none."""
    from twlib.hub import ModelNotFound, resolve_model
    from twlib.models import PRESETS

    try:
        return resolve_model(model, need=need)
    except ModelNotFound as e:
        raise ConfigError(f"field 'model': {model!r} is not a preset ({', '.join(PRESETS)}): {e}") from None


def load_tokenizer(model: str):
    """The tokenizer saved with a checkpoint directory (or a hub id's cached snapshot), else the project's
    byte tokenizer (twlib.tokenizer)."""
    from twlib.models import PRESETS
    from twlib.tokenizer import build_tokenizer

    if model not in PRESETS:
        path = _local_model(model, "config")
        if (Path(path) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path)
    return build_tokenizer()


def load_base_model(model: str, tokenizer, seed: int, rt: Runtime):
    """A preset built from scratch (seeded), a `save_pretrained` directory or a hub id whose snapshot is in
    the Hugging Face cache (never downloaded: twlib.hub); on rt.device in rt.dtype."""
    from twlib.models import PRESETS, build_model

    if model in PRESETS:
        return build_model(model, tokenizer, seed=seed, device=rt.device, dtype=rt.dtype,
                           attn_implementation=rt.attn)
    path = _local_model(model, "weights")
    from transformers import AutoModelForCausalLM

    with quiet_hf_bars():
        loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation=rt.attn, dtype=torch.float32)
    if len(tokenizer) > loaded.get_input_embeddings().weight.shape[0]:
        raise ValueError(f"{model}: tokenizer has {len(tokenizer)} tokens, the model's embedding only "
                         f"{loaded.get_input_embeddings().weight.shape[0]}")
    return loaded.to(device=rt.device, dtype=rt.dtype)


def enable_gradient_checkpointing(model) -> None:
    """HF per-decoder-layer activation checkpointing, non-reentrant (the transformers 5 name, or the older one)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def wrap_lora(model, config):
    """A peft LoRA adapter around `model` with the config's lora_* fields (only the adapter trains)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 alias that warns on every wrap
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def load_lora_weights(model, path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(path) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{path}: adapter weights do not fit the model: {unexpected[:3]}")


def console(progress: bool | None, quiet: bool = False, is_main=lambda: True):
    """The trainers' `say(message)`: a console line unless `quiet` or not the main rank; above a tqdm bar
    when `progress` (None: when stderr is a terminal). `say.progress` tells whether to draw the bar."""
    from tqdm.auto import tqdm

    progress = progress if progress is not None else sys.stderr.isatty()

    def say(message: str) -> None:
        if not quiet and is_main():
            tqdm.write(message) if progress else print(message, flush=True)

    say.progress = progress and not quiet
    return say


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """`torch.set_num_threads(threads)` inside (None: unchanged); the previous count restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def fork_rng():
    """Code inside may consume any RNG; training's RNG states are restored after it."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


@contextlib.contextmanager
def quiet_hf_bars():
    """No transformers progress bars ("Loading weights", "Writing model shards") at every checkpoint."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_model(model, tokenizer, path: Path) -> None:
    with quiet_hf_bars():
        model.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))


def save_final_model(out_dir: Path, model, tokenizer, config, config_file: str) -> Path:
    """`out_dir/final`: the model, tokenizer and the config (as `config_file`), swapped in by a rename."""
    final_dir, tmp = Path(out_dir) / "final", Path(out_dir) / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    save_config(config, tmp / config_file)
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp, final_dir)
    return final_dir


def swap_into_place(tmp: Path, final: Path, old: Path) -> None:
    """Commit a fully written checkpoint: final -> old, tmp -> final, drop old. Every state is loadable."""
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(out_dir: Path, model, tokenizer, optimizer, scheduler, state: dict, config) -> Path:
    """Write `out_dir/checkpoint/` atomically (temporary directory, then renames)."""
    out_dir = Path(out_dir)
    tmp, final, old = out_dir / CHECKPOINT_TMP, out_dir / CHECKPOINT, out_dir / CHECKPOINT_OLD
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, tokenizer, tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    save_config(config, tmp / "train_config.yaml")
    swap_into_place(tmp, final, old)
    return final


def find_checkpoint(out_dir) -> Path | None:
    """`out_dir/checkpoint`, or `checkpoint.old` when a crash fell between the two renames; None if neither."""
    for name in (CHECKPOINT, CHECKPOINT_OLD):
        path = Path(out_dir) / name
        if (path / "trainer_state.json").is_file():
            return path
    return None


def load_checkpoint_state(path) -> dict:
    """Trainer state, optimizer, scheduler and RNG states of a checkpoint directory (trusted files)."""
    path = Path(path)
    return {
        "trainer": json.loads((path / "trainer_state.json").read_text()),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=False),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=False),
        "rng": torch.load(path / "rng.pt", weights_only=False),
    }


def truncate_metrics(path: Path, upto_step: int, fieldnames: list[str]) -> None:
    """Keep metric rows with step <= upto_step (a resumed run rewrites the steps after its checkpoint)."""
    if not path.exists():
        return
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= upto_step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
