#!/usr/bin/env bash
# Set up, from scratch, llama-cpp-python's OpenAI-compatible server for a twlib checkpoint, and start it.
#
#   bash scripts/setup_llamacpp_server.sh [--model assets/checkpoints/toy-parallel] [--host 127.0.0.1]
#                                         [--port 8080] [--threads 2] [--setup-only]
#
# Steps (each skipped when its result is already there):
#   1. the lab's .venv (python3 lab.py install): torch and transformers, which the GGUF converter needs;
#   2. llama-cpp-python's source archive (pip download), LLAMA_CPP_PYTHON_VERSION to pin one;
#   3. .venv-llamacpp: llama-cpp-python[server] built from that archive (a C++ build: about 7 minutes on
#      2 cores; needs a C++ compiler; CMAKE_ARGS passes build options through);
#   4. sentencepiece in .venv-llamacpp/convert-deps (the converter imports it; .venv stays untouched);
#   5. the checkpoint converted to runs/llamacpp/NAME-f32.gguf by scripts/convert_tiny_to_gguf.py, with
#      the converter from the same archive (vendor/llama.cpp/convert_hf_to_gguf.py);
#   6. the server, in the foreground (Ctrl-C stops it): python -m llama_cpp.server, context = the
#      model's max_position_embeddings.
# Then, from another shell, the opt-in test tier (the command is printed below):
#   TWLAB_SERVER_URL=http://127.0.0.1:8080 TWLAB_SERVER_KIND=llama-cpp-python \
#       .venv/bin/python -m pytest -m server tests/test_engines_server.py
#
# llama-cpp-python's server takes text prompts only and serves one request at a time; the engine for it
# is OpenAICompletionsEngine(url, tokenizer=tok, token_ids=False, max_context=2048,
# extra_body=LLAMA_CPP_NEUTRAL_SAMPLING) (see twlib/engines.py).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODEL="assets/checkpoints/toy-parallel"
HOST="127.0.0.1"
PORT="8080"
THREADS="$(nproc 2>/dev/null || echo 2)"
SETUP_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --host) HOST="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --setup-only) SETUP_ONLY=1; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done

VENV="$ROOT/.venv-llamacpp"
SRC_DIR="$VENV/src"
DEPS="$VENV/convert-deps"
NAME="$(basename "$MODEL")"
GGUF="$ROOT/runs/llamacpp/$NAME-f32.gguf"
LAB_PY="$ROOT/.venv/bin/python"

say() { printf '\n== %s\n' "$*"; }

[ -f "$MODEL/config.json" ] || { echo "no checkpoint at $MODEL (config.json missing)" >&2; exit 1; }
command -v c++ >/dev/null || command -v g++ >/dev/null || {
    echo "llama-cpp-python builds from source and needs a C++ compiler (Debian: apt-get install build-essential)" >&2
    exit 1
}

say "1. the lab's .venv (torch, transformers)"
python3 lab.py install

say "2. llama-cpp-python's source archive"
mkdir -p "$SRC_DIR"
SDIST="$(ls "$SRC_DIR"/llama[-_]cpp[-_]python-*.tar.gz 2>/dev/null | head -n 1 || true)"
if [ -z "$SDIST" ]; then
    SPEC="llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"
    "$LAB_PY" -m pip download --no-deps --no-binary :all: "$SPEC" -d "$SRC_DIR"
    SDIST="$(ls "$SRC_DIR"/llama[-_]cpp[-_]python-*.tar.gz | head -n 1)"
fi
echo "$SDIST"
UNPACKED="$SRC_DIR/$(basename "$SDIST" .tar.gz)"
[ -d "$UNPACKED" ] || tar -xzf "$SDIST" -C "$SRC_DIR"
CONVERTER="$UNPACKED/vendor/llama.cpp/convert_hf_to_gguf.py"
[ -f "$CONVERTER" ] || { echo "the archive has no $CONVERTER" >&2; exit 1; }

say "3. .venv-llamacpp with llama-cpp-python[server] (source build, several minutes)"
MARKER="$VENV/.twlab-installed"
if [ ! -f "$MARKER" ] || [ "$(cat "$MARKER")" != "$(basename "$SDIST")" ]; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --upgrade pip
    CMAKE_BUILD_PARALLEL_LEVEL="$THREADS" "$VENV/bin/python" -m pip install "llama-cpp-python[server] @ file://$SDIST"
    basename "$SDIST" > "$MARKER"
else
    echo "already built from $(cat "$MARKER")"
fi

say "4. sentencepiece for the converter (in $DEPS)"
PYTHONPATH="$DEPS" "$LAB_PY" -c "import sentencepiece" 2>/dev/null ||
    "$LAB_PY" -m pip install --no-deps --target "$DEPS" sentencepiece

say "5. $MODEL -> $GGUF"
if [ ! -f "$GGUF" ] || [ "$GGUF" -ot "$MODEL/model.safetensors" ]; then
    PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}" "$LAB_PY" scripts/convert_tiny_to_gguf.py \
        --converter "$CONVERTER" --model "$MODEL" --out "$GGUF"
else
    echo "up to date"
fi

N_CTX="$("$LAB_PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['max_position_embeddings'])" "$MODEL/config.json")"
URL="http://$HOST:$PORT"
say "6. the server"
cat <<EOF
Serving $GGUF at $URL/v1/completions (context $N_CTX, $THREADS threads). In another shell:

    TWLAB_SERVER_URL=$URL TWLAB_SERVER_KIND=llama-cpp-python TWLAB_SERVER_MODEL=$MODEL \\
        .venv/bin/python -m pytest -m server tests/test_engines_server.py
    .venv/bin/python benchmarks/engines.py --model $MODEL --url $URL --url-kind llama-cpp-python

EOF
if [ "$SETUP_ONLY" = 1 ]; then
    echo "--setup-only: not starting it. Start it with:"
    echo "    $VENV/bin/python -m llama_cpp.server --model $GGUF --model_alias $NAME --host $HOST --port $PORT --n_ctx $N_CTX --n_threads $THREADS"
    exit 0
fi
exec "$VENV/bin/python" -m llama_cpp.server --model "$GGUF" --model_alias "$NAME" --host "$HOST" --port "$PORT" \
    --n_ctx "$N_CTX" --n_threads "$THREADS"
