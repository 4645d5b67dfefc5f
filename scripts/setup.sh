#!/usr/bin/env bash
# Set-up shared by scripts/try.sh and scripts/test.sh, for a fresh Debian 12 machine with
# only Python 3.11. Without arguments (try.sh): what running upterm needs, the OpenSSH
# client, a venv in .venv with upterm installed (editable) and the web joiner's page (built
# with node and npm by scripts/build-web.sh). With --dev (test.sh): also the Debian packages
# the tests use and the test and lint tools. Safe to run again: it only adds what is
# missing, and says what it does.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=""
[ "${1:-}" = "--dev" ] && dev=1
say() { echo "setup: $*" >&2; }

missing=()
command -v ssh >/dev/null || missing+=(openssh-client)
command -v ssh-keygen >/dev/null || missing+=(openssh-client)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
# uptermd serves the web joiner's page, which scripts/build-web.sh builds with npm.
command -v npm >/dev/null || missing+=(nodejs npm)
if [ -n "$dev" ]; then
command -v tmux >/dev/null || missing+=(tmux)
# The web joiner's page is tested in Debian's Chromium, headless, driven by Playwright
# (never a browser that Playwright downloads).
command -v chromium >/dev/null || missing+=(chromium)
# systemd-analyze and systemd-socket-activate, for the unit tests (not a running systemd).
command -v systemd-analyze >/dev/null || missing+=(systemd)
# Full-screen programs the shared-screen tests run: vim, less, top, htop.
command -v vim >/dev/null || missing+=(vim)
command -v less >/dev/null || missing+=(less)
command -v top >/dev/null || missing+=(procps)
command -v htop >/dev/null || missing+=(htop)
# Other SSH clients the joiner tests use: Dropbear's dbclient, PuTTY's plink.
command -v dbclient >/dev/null || missing+=(dropbear-bin)
command -v plink >/dev/null || missing+=(putty-tools)
# The benchmarks' baseline is a stock OpenSSH server (started by them on loopback only).
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
# An HTTP proxy (CONNECT, Basic auth) and a TLS-terminating reverse proxy for the
# WebSocket tests.
command -v tinyproxy >/dev/null || missing+=(tinyproxy)
[ -x /usr/sbin/nginx ] || missing+=(nginx-light)
[ -x /usr/sbin/haproxy ] || missing+=(haproxy)
# The relay cluster's registry (tests start their own servers and Sentinels on loopback).
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-sentinel >/dev/null || missing+=(redis-sentinel)
# The uptermd OCI image (packaging/oci/build-image.sh) and running it: no base image, so
# debootstrap builds its root file system; runc beside crun for cgroup v1/v2 hybrid hosts.
for tool in buildah podman debootstrap runc; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
# To build OpenSSH 10's client for the joiner matrix (scripts/openssh10.sh).
for pkg in gcc make curl libssl-dev zlib1g-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
fi
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # policy-rc.d 101: install services without starting them (no sshd left on port 22).
  policy=/usr/sbin/policy-rc.d
  made_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    made_policy=1
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  if [ -n "$made_policy" ]; then $sudo rm -f "$policy"; fi
fi

if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment in .venv"
  python3 -m venv .venv
fi
stamp=.venv/.upterm-installed${dev:+-dev}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "upgrading pip"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  if [ -n "$dev" ]; then
    say "installing upterm with its test and lint tools into .venv (a minute or two)"
    .venv/bin/python -m pip install -q -e '.[dev]'
  else
    say "installing upterm into .venv"
    .venv/bin/python -m pip install -q -e .
  fi
  touch "$stamp"
fi

# The web joiner's page (upterm/relay/webpage/); quick when it is already built.
scripts/build-web.sh

if [ -n "$dev" ] && [ ! -x .cache/openssh-10.0p1/ssh ]; then
  scripts/openssh10.sh >/dev/null
fi
