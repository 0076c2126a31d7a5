"""Where the SFT loop runs: one process (`LocalRun`) or one rank of N under FSDP2 (`FSDPRun`).

`twlib.train.sft`'s loop is written once against these two: it asks the run for this rank's share of a step's
rows, the step's global trained-token count, the clipped global grad norm, sums over ranks, and for
checkpoints and the final save. With one process every answer is the local one.

Design choices
- `LocalRun` trains the plain model: LoRA, autocast and the eval hook work only here; its checkpoints are
  `save_pretrained` folders plus the optimizer state (twlib.checkpoint), resumed exactly.
- `FSDPRun` shards the model with FSDP2 (twlib.train.fsdp: rank-0 loading, DCP checkpoints that re-shard
  on load, the final save gathered to rank 0). A rank with fewer rows than another runs zero-weighted
  filler passes so the collectives match. No LoRA under FSDP2 (refused), no eval hook (ignored).
- The loss module is passed in (`root`, twlib.train.sft.TrieLoss): under FSDP2 it is the root unit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from twlib import checkpoint
from twlib.train import fsdp as fsdp
from twlib.checkpoint import (enable_gradient_checkpointing, load_checkpoint_state, load_tokenizer, resolve_runtime,
                              save_model, set_rng_state)
from twlib.config import ConfigError, DataError, save_config
from twlib.train.data import require_tags
from twlib.trie import IGNORE, PackedTrie

__all__ = ["LocalRun", "FSDPRun"]


class LocalRun:
    """World size 1 on the plain model: LoRA, autocast and the eval hook work here; `save_pretrained`
    checkpoints with the optimizer state (twlib.checkpoint)."""

    world, rank, main = 1, 0, True

    def __init__(self, config, launch, source: str | None, log):
        self.config, self.launch, self.log = config, launch, log
        try:
            self.rt = resolve_runtime(config)
        except ConfigError as e:
            raise ConfigError(f"{source or 'config'}: {e}") from None
        self.source = source

    def load(self, found: Path | None, root):
        """(tokenizer, model, loss module `root(model, mask_kind, logits, logits_chunk)`): from the checkpoint
        when resuming, else from `config.model`."""
        config, rt = self.config, self.rt
        saved = str(found / "model") if found is not None and not config.lora else None
        tokenizer = load_tokenizer(saved or config.model)
        require_tags(tokenizer, config)
        try:
            model = checkpoint.load_base_model(saved or config.model, tokenizer, config.seed, rt)
        except ConfigError as e:
            raise ConfigError(f"{self.source or 'config'}: {e}") from None
        if config.lora:
            model = checkpoint.wrap_lora(model, config)
            if found is not None:
                checkpoint.load_lora_weights(model, found / "model")
        if config.gradient_checkpointing or self.launch.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if self.launch.max_position_embeddings is not None:
            model.config.max_position_embeddings = self.launch.max_position_embeddings
        model.train()
        self.model, self.tokenizer = model, tokenizer
        return tokenizer, model, root(model, rt.mask_kind, self.launch.logits, self.launch.logits_chunk)

    def check_rows(self, fingerprint: str) -> None:
        pass  # one process: nothing to compare with

    def micro_batches(self, chosen: torch.Tensor, per_micro: int) -> list[tuple[torch.Tensor, bool]]:
        """(row indices, is a filler pass) per micro-batch of this rank's share of the step."""
        return [(chosen[m:m + per_micro], False) for m in range(0, len(chosen), per_micro)]

    def trained_tokens(self, rows: PackedTrie, chosen: torch.Tensor) -> int:
        return int((rows.labels.index_select(0, chosen) != IGNORE).sum())

    def all_sum(self, values: list[float]) -> list[float]:
        return values

    def clip(self, optimizer, grad_clip: float) -> float:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))

    def autocast(self):
        if self.rt.autocast:
            return torch.autocast(device_type=self.rt.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def save_checkpoint(self, out_dir: Path, optimizer, scheduler, state: dict) -> None:
        checkpoint.save_checkpoint(out_dir, self.model, self.tokenizer, optimizer, scheduler, state, self.config)

    def resume(self, found: Path, optimizer, scheduler) -> dict:
        state = load_checkpoint_state(found)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return state["trainer"]

    def save_final(self, out_dir: Path) -> Path:
        """Merged weights (LoRA: also the adapter alone) + tokenizer + the config, swapped in atomically."""
        final_dir, tmp = out_dir / "final", out_dir / ".final.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if self.config.lora:
            self.model.save_pretrained(str(tmp / "adapter"))
            self.model = self.model.merge_and_unload()
        save_model(self.model, self.tokenizer, tmp)
        save_config(self.config, tmp / "train_config.yaml")
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
        return final_dir

    def describe(self, model) -> str:
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return (f"sft: mode={self.config.mode} loss={self.config.loss_policy} model={self.config.model} "
                f"({n_params:,} params, {n_train:,} trained) device={self.rt.device} "
                f"dtype={str(self.rt.dtype).removeprefix('torch.')} attn={self.rt.attn}")

    def close(self) -> None:
        pass


class FSDPRun(LocalRun):
    """One rank of N (torchrun; or world size 1 with `--fsdp`): FSDP2 units, rank-0 loading, this rank's
    rows of each step, a global N and grad norm, DCP checkpoints (twlib.train.fsdp)."""

    def __init__(self, config, launch, source: str | None, log):
        if config.lora:
            raise ConfigError(f"{source or 'config'}: field 'lora': FSDP2 runs full fine-tuning only; "
                              f"use one process (no torchrun, no --fsdp) for LoRA")
        self.config, self.launch, self.log, self.source = config, launch, log, source
        self.ranks = fsdp.init_ranks(config)
        self.world, self.rank, self.main = self.ranks.world, self.ranks.rank, self.ranks.main
        self.rt = resolve_runtime(fsdp.with_device(config, self.ranks.device))
        self.storage_dtype, self.mp_policy = fsdp.precision(config, self.ranks.device)
        if config.eval_hook is not None:
            log("warning: eval_hook is ignored under FSDP2 (it needs the full model on one rank)")
        if config.autocast:
            log("note: autocast is not used; on CUDA the FSDP mixed-precision policy computes in bfloat16")

    def load(self, found: Path | None, root):
        tokenizer = load_tokenizer(self.config.model)
        require_tags(tokenizer, self.config)
        if self.config.gradient_checkpointing:
            self.launch.gradient_checkpointing = True
        full, self.model_config = fsdp.load_base_on_rank0(self.config, tokenizer, self.rt, self.storage_dtype,
                                                          self.ranks, self.source)
        if self.launch.max_position_embeddings is not None:
            self.model_config.max_position_embeddings = self.launch.max_position_embeddings
        self.module, self.load_report = fsdp.shard_from_rank0(full, self.model_config, self.ranks, self.rt,
                                                              self.storage_dtype, self.launch, self.mp_policy,
                                                              root=root)
        self.tokenizer = tokenizer
        return tokenizer, self.module.model, self.module

    def check_rows(self, fingerprint: str) -> None:
        prints = [None] * self.world
        dist.all_gather_object(prints, fingerprint)
        if len(set(prints)) != 1:
            raise DataError(f"ranks built different rows (fingerprints {sorted(set(prints))}): the data must be "
                            f"identical on every rank")

    def micro_batches(self, chosen: torch.Tensor, per_micro: int) -> list[tuple[torch.Tensor, bool]]:
        """Every `world`-th row from `rank`; a rank with fewer rows adds zero-weighted filler passes."""
        mine = fsdp.rank_rows(chosen, self.rank, self.world)
        return [(mine[part.start:part.stop], False) if part is not None else (chosen[:1], True)
                for part in fsdp.micro_batch_plan(len(mine), len(chosen), self.world, per_micro)]

    def trained_tokens(self, rows: PackedTrie, chosen: torch.Tensor) -> int:
        mine = fsdp.rank_rows(chosen, self.rank, self.world)
        return fsdp.global_trained(rows, chosen, mine, self.ranks.device)

    def all_sum(self, values: list[float]) -> list[float]:
        return fsdp.all_sum(values, self.ranks.device)

    def clip(self, optimizer, grad_clip: float) -> float:
        return fsdp.clip_gradients(optimizer, grad_clip)

    def autocast(self):
        return contextlib.nullcontext()

    def save_checkpoint(self, out_dir: Path, optimizer, scheduler, state: dict) -> None:
        state = {**state, "world_size": self.world, "format": "dcp"}
        fsdp.save_dcp_checkpoint(out_dir, self.module, optimizer, scheduler, state, self.config, self.ranks)

    def resume(self, found: Path, optimizer, scheduler) -> dict:
        trainer = fsdp.load_dcp_checkpoint(found, self.module, optimizer, scheduler, self.ranks)
        self.log(f"checkpoint saved by {trainer.get('world_size')} rank(s), now {self.world}")
        return trainer

    def save_final(self, out_dir: Path) -> Path:
        return fsdp.save_final(out_dir, self.module, self.model_config, self.tokenizer, self.config, self.ranks)

    def describe(self, model) -> str:
        launch, mp = self.launch, self.mp_policy
        return (f"sft on {self.world} rank(s), {self.ranks.device.type}: FSDP2 ({len(model.model.layers)} layer "
                f"units + root), storage {str(self.storage_dtype).removeprefix('torch.')}, compute "
                f"{'bfloat16' if mp else str(self.storage_dtype).removeprefix('torch.')}, attn {self.rt.attn}, "
                f"checkpointing {launch.gradient_checkpointing}, logits {launch.logits}, offload {launch.offload}")

    def close(self) -> None:
        if self.ranks.created:
            dist.destroy_process_group()
