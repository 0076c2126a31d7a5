"""ThreadWeaver Lab helper library.

Modules (each opens with a docstring listing its design choices):
- `twlib.format`: the parallel trajectory format (parse, render, the state machine's calls, path stats).
- `twlib.trie`: calls -> one packed trie row, ancestor-only masks, packed log-probs.
- `twlib.tokenizer`: a character-level tokenizer with every tag as one special token; the tag check and
  chat-template helpers for a real Qwen3 tokenizer.
- `twlib.models`: tiny Qwen3 presets and the real Qwen3 configs.
- `twlib.hub`: a model name (folder or hub id) -> a local folder, from the Hugging Face cache only.
- `twlib.prepare`: `prepare-model`, the thread tags added to a real model as single tokens.
- `twlib.tasks`: seeded synthetic tasks with sequential and parallel trajectories and graders.
- `twlib.sft`: trie SFT, the sequential baseline and the leakage ablation (YAML configs, exact resume).
- `twlib.decoding`: the `Engine` protocol, the 5-phase state machine, the in-process `HFEngine`.
- `twlib.engines`: `OpenAICompletionsEngine` (any /v1/completions server), `VLLMEngine`, `serve_hf`.
- `twlib.rewards`, `twlib.pgrpo`: correctness + acceleration rewards; P-GRPO on group-packed trie rows.
- `twlib.datagen`: two-stage parallel data generation (strong-model rewriting, self-training), Table-8 stats.
- `twlib.distributed`: FSDP2 trie SFT under torchrun (same rows and loss as twlib.sft).
- `twlib.distributed_pgrpo`: FSDP2 P-GRPO under torchrun, one rollout engine per rank (HF, colocated vLLM
  or HTTP servers) with the weights synced after every step (same rollouts and loss as twlib.pgrpo).
- `twlib.plan`: memory/time/cost planner for Qwen3 SFT and RL, and config dry runs.
- `twlib.eval`: accuracy, critical paths, speed-ups, wall clock, figures.
- `twlib.pipeline`: the tiny end-to-end run; `twlib.viz`: figures and the mask explorer;
  `twlib.cli`: `python -m twlib demo | pipeline | sft | pgrpo | eval | data | prompts | plan | prepare-model |
  rewrite | arc | serve` (`--help` and `--version` import no torch).
"""

__version__ = "0.1.0"
