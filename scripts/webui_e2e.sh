#!/usr/bin/env bash
# A user's check of the specdec extension in a real text-generation-webui checkout.
#
#   scripts/webui_e2e.sh WEBUI_DIR
#
# Prepares smollm2-135m twice in the webui's models folder: as the GGUF
# conversion gives it (its tokenizer's EOS differs from the model config's,
# as with many converted models) and a copy with the tokenizer's EOS/pad
# corrected. For each, starts the webui headless (API only, --nowebui, on
# 127.0.0.1) with the Transformers loader on the CPU, once without and once
# with `--extensions specdec`, sends the same greedy chat requests (a free
# question twice over, a rewrite, a summary, a long chat turn) and prints one
# table: tokens, tok/s off and on, identical. Exits 1 when a text differs or
# when free chat runs below 0.95x the webui's own speed (judged only for a
# model some replies of which specdec generated).
#
# Runs on the webui's own Python and its pinned packages; it installs nothing (the first load of the
# GGUF keeps specdec's unpacked copy of it in $SPECDEC_MODELS/unpacked, as any load does).
# Install the extension first:  WEBUI_PYTHON install.py WEBUI_DIR
#
# Environment:
#   WEBUI_PYTHON  the webui's Python (default: WEBUI_DIR/installer_files/env/bin/python, else python3)
#   PORT          API ports PORT, PORT+1 (default 5005)   MAX_TOKENS  reply length (default 96)
#   REPEATS       requests per prompt and side (default 2)
#   THREADS       OMP_NUM_THREADS for the webui (default: torch's own choice)
#   OUT           where results and logs go (default: a temp dir)
#   LIMIT_TURNS   instead of the suite: a chat of this many turns at TRUNCATION (default 1024) tokens, through
#                 two webuis with the extension, one cutting the history its own way and one with
#                 specdec-history_in_blocks; prints per turn past the limit the prompt tokens computed,
#                 the seconds to the first token and to the whole reply
set -euo pipefail

WEBUI_DIR=$(cd "${1:?usage: scripts/webui_e2e.sh WEBUI_DIR}" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
if [[ -z "${WEBUI_PYTHON:-}" ]]; then
  if [[ -x "$WEBUI_DIR/installer_files/env/bin/python" ]]; then WEBUI_PYTHON="$WEBUI_DIR/installer_files/env/bin/python"; else WEBUI_PYTHON=python3; fi
fi
PORT=${PORT:-5005}
MAX_TOKENS=${MAX_TOKENS:-96}
REPEATS=${REPEATS:-2}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
[[ -n "${THREADS:-}" ]] && export OMP_NUM_THREADS=$THREADS

[[ -f "$WEBUI_DIR/server.py" ]] || { echo "error: $WEBUI_DIR has no server.py (not a text-generation-webui checkout)" >&2; exit 2; }
if [[ ! -f "$WEBUI_DIR/user_data/extensions/specdec/script.py" && ! -f "$WEBUI_DIR/extensions/specdec/script.py" ]]; then
  echo "error: the specdec extension is not installed; run: $WEBUI_PYTHON install.py $WEBUI_DIR" >&2; exit 2
fi
MODELS="$WEBUI_DIR/user_data/models"; [[ -d "$MODELS" ]] || MODELS="$WEBUI_DIR/models"
"$WEBUI_PYTHON" "$HERE/webui_e2e.py" prepare-model smollm2-135m "$MODELS/smollm2-135m" --fixed "$MODELS/smollm2-135m-fixed-eos"
"$WEBUI_PYTHON" -c "import transformers; print('the webui runs transformers', transformers.__version__)"

PIDS=()
stop_servers() {
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then kill "$pid"; wait "$pid" 2>/dev/null || true; fi
  done
  PIDS=()
}
trap stop_servers EXIT

start_server() {  # $1 = model folder name, $2 = off, or a name for a run with the extension, $3 = port, then more webui args
  local model=$1 mode=$2 port=$3 ext=()
  shift 3
  [[ $mode != off ]] && ext=(--extensions specdec "$@")
  echo "== $model, extension $mode: starting the webui on 127.0.0.1:$port"
  # never --listen: without it the API binds to 127.0.0.1 only
  (cd "$WEBUI_DIR" && exec "$WEBUI_PYTHON" server.py --api --nowebui --api-port "$port" \
      --loader Transformers --cpu --model "$model" "${ext[@]}") > "$OUT/server-$model-$mode.log" 2>&1 &
  PIDS+=($!)
}

if [[ -n "${LIMIT_TURNS:-}" ]]; then
  # a long chat at a small truncation length: the webui's own cut against history_in_blocks
  model=smollm2-135m-fixed-eos
  for side in webui blocks; do
    echo "specdec-history_in_blocks: $([[ $side == blocks ]] && echo true || echo false)" > "$OUT/settings-$side.yaml"
  done
  start_server "$model" webui "$PORT" --settings "$OUT/settings-webui.yaml"
  start_server "$model" blocks $((PORT + 1)) --settings "$OUT/settings-blocks.yaml"
  "$WEBUI_PYTHON" "$HERE/webui_e2e.py" wait --port "$PORT" --log "$OUT/server-$model-webui.log"
  "$WEBUI_PYTHON" "$HERE/webui_e2e.py" wait --port $((PORT + 1)) --log "$OUT/server-$model-blocks.log"
  "$WEBUI_PYTHON" "$HERE/webui_e2e.py" limit --port-webui "$PORT" --port-blocks $((PORT + 1)) \
      --log-webui "$OUT/server-$model-webui.log" --log-blocks "$OUT/server-$model-blocks.log" \
      --turns "$LIMIT_TURNS" --truncation-length "${TRUNCATION:-1024}" --max-tokens "$MAX_TOKENS" \
      --out "$OUT/limit.json"
  exit 0
fi

runs=()
for model in smollm2-135m smollm2-135m-fixed-eos; do
  # both webuis run at once and the requests alternate between them (one computes at a time)
  start_server "$model" off "$PORT"
  start_server "$model" on $((PORT + 1))
  "$WEBUI_PYTHON" "$HERE/webui_e2e.py" wait --port "$PORT" --log "$OUT/server-$model-off.log"
  "$WEBUI_PYTHON" "$HERE/webui_e2e.py" wait --port $((PORT + 1)) --log "$OUT/server-$model-on.log"
  "$WEBUI_PYTHON" "$HERE/webui_e2e.py" suite --port-off "$PORT" --port-on $((PORT + 1)) \
      --max-tokens "$MAX_TOKENS" --repeats "$REPEATS" --out "$OUT/$model.json"
  stop_servers
  echo "   extension log: $(grep -c 'specdec: output generated' "$OUT/server-$model-on.log" || true) replies by specdec, " \
       "$(grep -c 'Output generated in' "$OUT/server-$model-on.log" || true) by the webui itself"
  runs+=("$OUT/$model.json")
done
echo "== results (files and server logs in $OUT)"
"$WEBUI_PYTHON" "$HERE/webui_e2e.py" table "${runs[@]}"
