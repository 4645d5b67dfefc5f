#!/usr/bin/env bash
# Builds the upterm and uptermd .deb packages with dpkg-buildpackage, into dist/.
#   packaging/build-deb.sh            (installs the build dependencies with apt if missing)
# The build sees only Debian's own tools and Python: PATH is reset and any virtualenv or
# pyenv is hidden, so the packages are built for, and tested against, /usr/bin/python3.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

build_deps=(debhelper dh-python pybuild-plugin-pyproject python3-all python3-hatchling
            python3-click python3-cryptography python3-msgpack python3-protobuf lintian)
missing=()
for pkg in "${build_deps[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "build-deb: installing ${missing[*]}" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src="$work/upterm-0.1.0"
mkdir "$src"
# The tracked files as they are in the working tree (so a build tests what is there).
git ls-files -z --cached --others --exclude-standard | (cd "$root" && xargs -0 tar -cf - --no-recursion --ignore-failed-read 2>/dev/null) \
  | tar -xf - -C "$src"
# The web joiner's page is built, not tracked (gitignored): built here (it needs npm; the
# Debian build itself stays offline) and copied in, so uptermd's package serves it.
scripts/build-web.sh
cp -r upterm/relay/webpage "$src/upterm/relay/webpage"
cp -r packaging/debian "$src/debian"
cp systemd/upterm.service "$src/debian/upterm.user.service"
cp systemd/upterm.socket "$src/debian/upterm.user.socket"
cp systemd/uptermd.service "$src/debian/uptermd.service"

(
  cd "$src"
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$work" LANG=C.UTF-8 \
    dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1 || {
      tail -40 "$work/build.log" >&2
      exit 1
    }
)
mkdir -p dist
rm -f dist/*.deb dist/*.changes dist/*.buildinfo
mv "$work"/*.deb "$work"/*.changes "$work"/*.buildinfo dist/
echo "build-deb: built $(cd dist && ls *.deb | tr '\n' ' ')"
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin lintian --fail-on error --info dist/*.changes || {
  echo "build-deb: lintian found errors" >&2
  exit 1
}
