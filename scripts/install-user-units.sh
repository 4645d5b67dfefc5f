#!/usr/bin/env bash
# Installs the upterm daemon's systemd user units from this checkout (the .deb installs them
# for you): upterm.service and upterm.socket in ~/.config/systemd/user, starting this
# checkout's .venv/bin/upterm. Then, as the README says:
#   systemctl --user daemon-reload
#   systemctl --user enable --now upterm.socket
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$PWD/.venv/bin/upterm"
if [ ! -x "$bin" ]; then
  echo "install-user-units: $bin is missing; run scripts/try.sh first" >&2
  exit 1
fi
dir="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
mkdir -p "$dir"
sed "s|^ExecStart=/usr/bin/upterm |ExecStart=$bin |" systemd/upterm.service >"$dir/upterm.service"
cp systemd/upterm.socket "$dir/upterm.socket"
echo "installed upterm.service and upterm.socket in $dir (ExecStart: $bin)"
