"""ThreadWeaver Lab helper library (README "Architecture": the layout and the path of one training step).

Lessons (what the notebooks derive; each module opens with its design choices):
- `twlib.format`: the parallel trajectory format (parse, render, the state machine's calls, path stats).
- `twlib.trie`: calls -> one packed trie row, ancestor-only masks, packed log-probs (`twlib.lm_head`: chunks).
- `twlib.tokenizer`, `twlib.models`: the byte tokenizer with single-token tags; tiny Qwen3 presets, Qwen3 configs.
- `twlib.tasks`: seeded synthetic tasks with sequential and parallel trajectories and graders.
- `twlib.decoding`: the `Engine` protocol, the 5-phase state machine, the in-process `HFEngine`.
- `twlib.rewards`, `twlib.eval`, `twlib.claims`, `twlib.viz`: rewards; accuracy, critical paths, speed-ups;
  the three claims; figures.
- `twlib.datagen`: data generation's pure steps (stage-1 rewriting) and the Table 8 statistics.
Trainers:
- `twlib.config` (typed configs, YAML + --set, `launch:`), `twlib.checkpoint` (loading, RNG, checkpoints).
- `twlib.train.sft`: trie SFT, one loop for one process or N FSDP2 ranks (`twlib.train.runs`, `.fsdp`, `.data`).
- `twlib.train.pgrpo`: P-GRPO in one process; `twlib.train.pgrpo_fsdp`: under torchrun with weight-synced engines.
Infrastructure:
- `twlib.engines`: `OpenAICompletionsEngine` (any /v1/completions server), `VLLMEngine`.
- `twlib.infra.server` (`serve_hf`), `twlib.infra.plan` / `.sizes` / `.planner` (estimates, dry runs),
  `twlib.infra.chat` / `.rewrite` / `.arc` (data-generation I/O, self-training, the arc),
  `twlib.infra.problems` (Parquet, `datasets`, JSON-lines prompt pools).
- `twlib.hub`, `twlib.prepare`, `twlib.vllm_weights`; `twlib.pipeline` (the main job); `twlib.cli`:
  `python -m twlib demo | pipeline | sft | pgrpo | eval | data | prompts | plan | prepare-model | rewrite | arc | serve`
  (`--help` and `--version` import no torch).
"""

__version__ = "0.1.0"
