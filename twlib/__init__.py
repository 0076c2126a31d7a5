"""ThreadWeaver Lab helper library.

Modules (each opens with a docstring listing its design choices):
- `twlib.format`: the parallel trajectory format (parse, render, the state machine's calls, path stats).
- `twlib.trie`: calls -> one packed trie row, ancestor-only masks, packed log-probs.
- `twlib.tokenizer`: a character-level tokenizer with every tag as one special token.
- `twlib.models`: tiny Qwen3 presets and the real Qwen3 configs.
- `twlib.tasks`: seeded synthetic tasks with sequential and parallel trajectories and graders.
"""

__version__ = "0.1.0"
