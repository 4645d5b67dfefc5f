#!/usr/bin/env bash
# Builds the OpenSSH 10 client (Debian 13's source) for the client-matrix tests: Debian 12
# ships OpenSSH 9.2, and joiners with 10.x (keystroke-timing chaff, ML-KEM key exchange by
# default) must work too. Only `ssh` is built, into .cache/openssh-10.0p1/ssh; nothing is
# installed. The tarball is checked against the SHA-256 in Debian 13's Sources index.
# Safe to run again: it does nothing once the binary exists. Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."
version=10.0p1
sha256=021a2e709a0edf4250b1256bd5a9e500411a90dddabea830ed59cef90eb9d85c
url="http://deb.debian.org/debian/pool/main/o/openssh/openssh_${version}.orig.tar.gz"
dest=.cache/openssh-$version
if [ -x "$dest/ssh" ]; then
  echo "$PWD/$dest/ssh"
  exit 0
fi
say() { echo "openssh10: $*" >&2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say "downloading OpenSSH $version from Debian"
curl -fsSL -o "$work/src.tar.gz" "$url"
echo "$sha256  $work/src.tar.gz" | sha256sum -c --quiet -
tar -xzf "$work/src.tar.gz" -C "$work"
say "building ssh (about a minute)"
(
  cd "$work/openssh-$version"
  ./configure -q --without-pam --without-selinux --without-kerberos5 --without-libedit \
    --without-security-key-builtin --sysconfdir=/etc/ssh >/dev/null
  make -s -j"$(nproc)" ssh >/dev/null 2>&1
)
mkdir -p "$dest"
install -m 0755 "$work/openssh-$version/ssh" "$dest/ssh.tmp"
mv "$dest/ssh.tmp" "$dest/ssh"
echo "$PWD/$dest/ssh"
