#!/usr/bin/env bash
# The body of action.yml: share the job's shell with 'upterm ci', which publishes the join
# line (notice, step outputs, job summary) and returns once the last joiner left, a
# continue file appeared, or nobody joined in time. Inputs come as UPTERM_ACTION_*
# variables. Fails closed: if a user's keys cannot be fetched, or there are none, nothing
# is shared.
set -euo pipefail

server=${UPTERM_ACTION_SERVER:-}
users=${UPTERM_ACTION_USERS:-}
extra_keys=${UPTERM_ACTION_KEYS:-}
timeout=${UPTERM_ACTION_TIMEOUT:-30m}
name=${UPTERM_ACTION_NAME:-ci}
export UPTERM_GITHUB_KEYS_URL=${UPTERM_ACTION_KEYS_URL:-https://github.com}

if [ -z "$users" ] && [ -z "$extra_keys" ]; then
  echo "::error::no authorized-users or authorized-keys given; refusing to share with everyone"
  exit 1
fi
args=(--name "$name" --wait-timeout "$timeout")
for user in $users; do args+=(--github-user "$user"); done
if [ -n "$extra_keys" ]; then args+=(--authorized-keys "$extra_keys"); fi
if [ -n "$server" ]; then args+=(--server "$server"); fi

exec upterm ci "${args[@]}" -- bash -l
