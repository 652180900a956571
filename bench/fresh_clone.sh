#!/usr/bin/env bash
# Fresh clone to first streamed token with the README's first command.
# Usage: bash bench/fresh_clone.sh [model-id]   (default: the README's default model)
# Prints timings; pip's download cache on this machine is NOT cleared (say so when reporting).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
port="${PORT:-8765}"
model="${1:-}"
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
now() { date +%s.%N; }

t0=$(now)
git clone -q "$repo" "$work/salon"
cd "$work/salon"
if [ -n "$model" ]; then export SALON_MODELS="$model"; fi
export SALON_DATA_DIR="$work/data"
bash scripts/start.sh --port "$port" >"$work/serve.log" 2>&1 &
server=$!
until curl -sf "http://127.0.0.1:$port/api/auth/state" >/dev/null; do
  kill -0 "$server" 2>/dev/null || { cat "$work/serve.log"; exit 1; }
  sleep 0.5
done
t_up=$(now)
echo 'bench password' | .venv/bin/salon users create bench --admin 2>/dev/null
key=$(.venv/bin/salon keys create bench 2>/dev/null)
model_id=$(curl -s -H "Authorization: Bearer $key" "http://127.0.0.1:$port/v1/models" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
t_ask=$(now)
curl -sN -H "Authorization: Bearer $key" -H 'content-type: application/json' \
  -d "{\"model\":\"$model_id\",\"stream\":true,\"max_tokens\":16,\"messages\":[{\"role\":\"user\",\"content\":\"Say hello.\"}]}" \
  "http://127.0.0.1:$port/v1/chat/completions" | while IFS= read -r line; do
    # The first chunk with text (the role chunk before it has empty content).
    if [[ "$line" == *'"content":'* && "$line" != *'"content":""'* && "$line" != *'"content": ""'* ]]; then
      date +%s.%N >"$work/t_token"; break
    fi
    echo "$line" >>"$work/stream.log"
  done || true  # curl dies of SIGPIPE once we stop reading
[ -s "$work/t_token" ] || { cat "$work/stream.log" "$work/serve.log"; exit 1; }
t_token=$(cat "$work/t_token")
section=$(python3 - "$t0" "$t_up" "$t_ask" "$t_token" "$model_id" <<'PY'
import sys
t0, up, ask, token = map(float, sys.argv[1:5])
print("## Fresh clone to first streamed token\n")
print("`git clone`, then the README's first command (`bash scripts/start.sh`: venv, pip")
print("install, model download + assembly + sha256 check, start), then one streamed request.")
print("pip's download cache was warm (a cold one adds the 1.1 GB model download, ~1 min here).\n")
print("| model | clone → serving | first request → first token | clone → first token |")
print("|---|---|---|---|")
print(f"| {sys.argv[5]} | {up - t0:.1f} s | {token - ask:.2f} s | {token - t0:.1f} s |")
print("\nCommand: `bash bench/fresh_clone.sh`")
PY
)
echo "$section"
python3 "$repo/bench/report.py" fresh-clone <<<"$section"
