#!/usr/bin/env bash
# End-to-end check of the specdec extension in a real text-generation-webui checkout.
#
#   scripts/webui_e2e.sh WEBUI_DIR
#
# Starts the webui headless (API only, --nowebui) on 127.0.0.1 with the
# Transformers loader on the CPU, once without and once with
# `--extensions specdec`, sends the same greedy chat request to its
# OpenAI-compatible API and compares the texts and tokens/s. Exits 1 when
# the texts differ. Needs the extension installed first:
#   python install.py WEBUI_DIR   (with the webui's Python)
#
# Environment:
#   WEBUI_PYTHON  the webui's Python (default: WEBUI_DIR/installer_files/env/bin/python, else python3)
#   MODEL         folder name in the models folder (default smollm2-135m; created from the
#                 packaged model of that name when missing)
#   PORT          API port (default 5005)   MAX_TOKENS  reply length (default 64)
#   PROMPT        the user message          OUT         where results and logs go (default: a temp dir)
set -euo pipefail

WEBUI_DIR=$(cd "${1:?usage: scripts/webui_e2e.sh WEBUI_DIR}" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
if [[ -z "${WEBUI_PYTHON:-}" ]]; then
  if [[ -x "$WEBUI_DIR/installer_files/env/bin/python" ]]; then WEBUI_PYTHON="$WEBUI_DIR/installer_files/env/bin/python"; else WEBUI_PYTHON=python3; fi
fi
MODEL=${MODEL:-smollm2-135m}
PORT=${PORT:-5005}
MAX_TOKENS=${MAX_TOKENS:-64}
PROMPT=${PROMPT:-$'Add type hints to this function and return the whole function:\n\ndef scale(values, factor):\n    result = []\n    for value in values:\n        result.append(value * factor)\n    return result'}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

[[ -f "$WEBUI_DIR/server.py" ]] || { echo "error: $WEBUI_DIR has no server.py (not a text-generation-webui checkout)" >&2; exit 2; }
if [[ ! -f "$WEBUI_DIR/user_data/extensions/specdec/script.py" && ! -f "$WEBUI_DIR/extensions/specdec/script.py" ]]; then
  echo "error: the specdec extension is not installed; run: $WEBUI_PYTHON install.py $WEBUI_DIR" >&2; exit 2
fi
MODELS="$WEBUI_DIR/user_data/models"; [[ -d "$MODELS" ]] || MODELS="$WEBUI_DIR/models"
"$WEBUI_PYTHON" "$HERE/webui_e2e.py" prepare-model "$MODEL" "$MODELS/$MODEL"

SERVER_PID=""
stop_server() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap stop_server EXIT

run_once() {  # $1 = off|on
  local mode=$1 ext=()
  [[ $mode == on ]] && ext=(--extensions specdec)
  echo "== extension $mode: starting the webui on 127.0.0.1:$PORT"
  # never --listen: without it the API binds to 127.0.0.1 only
  (cd "$WEBUI_DIR" && exec "$WEBUI_PYTHON" server.py --api --nowebui --api-port "$PORT" \
      --loader Transformers --cpu --model "$MODEL" "${ext[@]}") > "$OUT/server-$mode.log" 2>&1 &
  SERVER_PID=$!
  "$WEBUI_PYTHON" "$HERE/webui_e2e.py" wait --port "$PORT" --log "$OUT/server-$mode.log"
  "$WEBUI_PYTHON" "$HERE/webui_e2e.py" request --port "$PORT" --prompt "Say hi." --max-tokens 4 > /dev/null  # warm-up
  "$WEBUI_PYTHON" "$HERE/webui_e2e.py" request --port "$PORT" --prompt "$PROMPT" --max-tokens "$MAX_TOKENS" --out "$OUT/$mode.json"
  stop_server
}

run_once off
run_once on
echo "== results (files in $OUT)"
"$WEBUI_PYTHON" "$HERE/webui_e2e.py" compare "$OUT/off.json" "$OUT/on.json" --log-on "$OUT/server-on.log"
