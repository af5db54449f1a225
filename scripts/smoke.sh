#!/usr/bin/env bash
# Smoke test of a running vlserve with curl: health, models, text chat, image chat, streaming.
# Usage: scripts/smoke.sh [BASE_URL] [IMAGE_FILE]   (default http://127.0.0.1:7860)
# Set VLSERVE_API_KEY to send a bearer token. Exits non-zero on the first failure.
set -euo pipefail

BASE="${1:-http://127.0.0.1:7860}"
IMAGE="${2:-$(dirname "$0")/smoke-image.jpg}"
API="$BASE/api/v1"
AUTH=()
[[ -n "${VLSERVE_API_KEY:-}" ]] && AUTH=(-H "Authorization: Bearer $VLSERVE_API_KEY")
PY=$(command -v python3 || command -v python)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok   $*"; }

# POST a JSON body file to a path; response body into $TMP/out, HTTP status printed.
post() { curl -sS -o "$TMP/out" -w '%{http_code}' "${AUTH[@]}" -H 'Content-Type: application/json' \
              --data-binary "@$1" "$API$2"; }
# Assert a Python expression over the parsed JSON response `r`.
check() { "$PY" -c "import json,sys; r=json.load(open('$TMP/out')); sys.exit(0 if ($1) else 1)" \
          || fail "$2: $(head -c 500 "$TMP/out")"; }

status=$(curl -sS -o "$TMP/out" -w '%{http_code}' "$BASE/health") || fail "cannot reach $BASE"
[[ $status == 200 ]] || fail "/health returned $status: $(cat "$TMP/out")"
check "r['status'] == 'ok'" "/health"
pass "health"

status=$(curl -sS -o "$TMP/out" -w '%{http_code}' "${AUTH[@]}" "$API/models")
[[ $status == 200 ]] || fail "/models returned $status"
check "r['object'] == 'list' and r['data'][0]['id']" "/models"
MODEL=$("$PY" -c "import json; print(json.load(open('$TMP/out'))['data'][0]['id'])")
pass "models ($MODEL)"

cat > "$TMP/text.json" <<JSON
{"model": "$MODEL", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
JSON
status=$(post "$TMP/text.json" /chat/completions)
[[ $status == 200 ]] || fail "text chat returned $status: $(cat "$TMP/out")"
check "r['choices'][0]['message']['content'] is not None and r['timings']['total'] > 0" "text chat"
pass "text chat"

[[ -f $IMAGE ]] || fail "image file not found: $IMAGE"
{
  printf '{"model": "%s", "max_tokens": 16, "messages": [{"role": "user", "content": [' "$MODEL"
  printf '{"type": "text", "text": "What is in this image?"}, '
  printf '{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,'
  base64 < "$IMAGE" | tr -d '\n'
  printf '"}}]}]}'
} > "$TMP/image.json"
status=$(post "$TMP/image.json" /chat/completions)
[[ $status == 200 ]] || fail "image chat returned $status: $(cat "$TMP/out")"
check "r['timings']['image_tokens'] > 0 and r['timings']['image_encode'] > 0" "image chat"
pass "image chat ($("$PY" -c "import json; t=json.load(open('$TMP/out'))['timings']; print(f\"{t['image_tokens']} image tokens, encode {t['image_encode']} ms, total {t['total']} ms\")"))"

cat > "$TMP/stream.json" <<JSON
{"model": "$MODEL", "messages": [{"role": "user", "content": "Count."}], "max_tokens": 8,
 "stream": true, "stream_options": {"include_usage": true}}
JSON
curl -sSN "${AUTH[@]}" -H 'Content-Type: application/json' --data-binary "@$TMP/stream.json" \
     "$API/chat/completions" > "$TMP/stream.txt" || fail "streaming request failed"
grep -q '^data: \[DONE\]$' "$TMP/stream.txt" || fail "stream did not end with [DONE]"
grep -q '"usage"' "$TMP/stream.txt" || fail "stream carried no usage chunk"
pass "streaming ($(grep -c '^data: ' "$TMP/stream.txt") events)"

echo "smoke test passed against $BASE"
