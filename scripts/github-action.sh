#!/usr/bin/env bash
# The body of action.yml: share a shell from a CI job, then wait for the joiner to leave.
# Inputs come as UPTERM_ACTION_* variables. Fails closed: if a user's keys cannot be
# fetched, or there are none, nothing is shared.
set -euo pipefail

server=${UPTERM_ACTION_SERVER:-}
users=${UPTERM_ACTION_USERS:-}
extra_keys=${UPTERM_ACTION_KEYS:-}
timeout=${UPTERM_ACTION_TIMEOUT:-30m}
name=${UPTERM_ACTION_NAME:-ci}
keys_url=${UPTERM_ACTION_KEYS_URL:-https://github.com}

keys_file=$(mktemp)
trap 'rm -f "$keys_file"' EXIT
for user in $users; do
  if ! python3 - "$keys_url/$user.keys" >>"$keys_file" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=15) as resp:
        sys.stdout.write(resp.read().decode())
except OSError as exc:
    sys.exit(f"{sys.argv[1]}: {exc}")
PY
  then
    echo "::error::cannot fetch the public keys of $user from $keys_url; nothing was shared"
    exit 1
  fi
done

args=(--detach --accept --name "$name" --skip-host-key-check)
if [ -n "$users" ]; then args+=(--authorized-keys "$keys_file"); fi
if [ -n "$extra_keys" ]; then args+=(--authorized-keys "$extra_keys"); fi
if [ -n "$server" ]; then args+=(--server "$server"); fi
if [ -z "$users" ] && [ -z "$extra_keys" ]; then
  echo "::error::no authorized-users or authorized-keys given; refusing to share with everyone"
  exit 1
fi

upterm host "${args[@]}" -- bash -l
echo "Join with the SSH line above, or add this to ~/.ssh/config:"
upterm session ssh-config "$name"
status=0
upterm session wait "$name" --timeout "$timeout" || status=$?
upterm session stop "$name" >/dev/null 2>&1 || true
if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then
  exit "$status"
fi
