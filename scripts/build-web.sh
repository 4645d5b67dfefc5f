#!/usr/bin/env bash
# Builds the web joiner page that uptermd serves at /join, from web/ into
# upterm/relay/webpage/ (gitignored; the wheel includes it):
#   index.html    copied from web/src/index.html
#   app.js        web/src/app.js and the npm packages it imports, one minified IIFE
#   app.css       xterm's css/xterm.css and web/src/app.css, one file
#   LICENSES.txt  the licences of the bundled packages
#   scripts/build-web.sh            (does nothing when the output is newer than its inputs)
#   scripts/build-web.sh --force    (builds anyway)
# It needs node and npm; the packages come from web/package-lock.json (npm ci, only when
# web/node_modules is missing or older than the lockfile). Install scripts are not run.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "build-web: $*" >&2; }
die() { say "$*"; exit 1; }

force=""
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  *) die "unknown argument: $1 (usage: scripts/build-web.sh [--force])" ;;
esac

web=web
out=upterm/relay/webpage
esbuild="$web/node_modules/.bin/esbuild"
stamp="$web/node_modules/.upterm-npm-ci"
# The bundled packages, whose licences go into LICENSES.txt (esbuild is only the tool).
bundled=(@xterm/xterm @xterm/addon-fit @xterm/addon-unicode11 @xterm/addon-web-links
         @xterm/addon-webgl)

command -v npm >/dev/null || die "npm is missing: install nodejs and npm (scripts/setup.sh does)"
command -v node >/dev/null || die "node is missing: install nodejs and npm (scripts/setup.sh does)"
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 18 ] || die "node $(node --version) is too old: esbuild needs node 18 or newer"
[ -f "$web/package-lock.json" ] || die "$web/package-lock.json is missing"

if [ ! -f "$stamp" ] || [ "$web/package-lock.json" -nt "$stamp" ] || [ ! -x "$esbuild" ]; then
  say "installing the packages in $web/package-lock.json (npm ci)"
  (cd "$web" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null) \
    || die "npm ci failed in $web/ (see above); is the npm registry reachable?"
  touch "$stamp"
fi

# Up to date: every output exists and none is older than an input.
outputs=("$out/index.html" "$out/app.js" "$out/app.css" "$out/LICENSES.txt")
if [ -z "$force" ]; then
  fresh=1
  for f in "${outputs[@]}"; do
    if [ ! -f "$f" ] || [ -n "$(find "$web/src" "$web/package-lock.json" "$stamp" scripts/build-web.sh \
        -newer "$f" -print -quit)" ]; then
      fresh=""
      break
    fi
  done
  if [ -n "$fresh" ]; then
    exit 0
  fi
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# app.js: one IIFE, no eval (the relay's CSP allows scripts from 'self' only).
# app.css: web/src/app.css @imports xterm's stylesheet, so it comes first and ours wins.
"$esbuild" "$web/src/app.js" "$web/src/app.css" --bundle --minify --format=iife \
  --target=es2021 --legal-comments=eof --log-level=warning --outdir="$tmp" \
  || die "esbuild failed (see above)"
if grep -qE '\beval\(|new Function\(' "$tmp/app.js"; then
  die "the bundle calls eval or new Function, which the relay's CSP forbids"
fi
cp "$web/src/index.html" "$tmp/index.html"

{
  echo "The web joiner page (app.js, app.css) bundles these packages from npm,"
  echo "each under the MIT licence below."
  for pkg in "${bundled[@]}"; do
    dir="$web/node_modules/$pkg"
    [ -f "$dir/LICENSE" ] || die "$dir/LICENSE is missing"
    version=$(node -p 'require(process.argv[1]).version' "$PWD/$dir/package.json")
    echo
    echo "=============================================================================="
    echo "$pkg $version"
    echo "=============================================================================="
    if [ "$pkg" = @xterm/xterm ]; then
      echo "(It includes code from Visual Studio Code, Copyright (c) Microsoft Corporation,"
      echo "under the MIT licence, the same text as below with that copyright line.)"
      echo
    fi
    cat "$dir/LICENSE"
  done
} >"$tmp/LICENSES.txt"

mkdir -p "$out"
for f in index.html app.js app.css LICENSES.txt; do
  cp "$tmp/$f" "$out/$f.tmp"
  mv -f "$out/$f.tmp" "$out/$f"
done
say "built $out/: app.js $(wc -c <"$out/app.js") bytes, app.css $(wc -c <"$out/app.css") bytes"
