#!/usr/bin/env bash
# Builds the uptermd OCI image from Debian's packages and ours, with no base image:
#   packaging/oci/build-image.sh [OUTPUT.tar]     (default dist/uptermd-VERSION.oci.tar)
# The root file system is made by debootstrap (Debian 12, minbase) straight into a
# `buildah from scratch` container, our .deb packages (packaging/build-deb.sh) and their
# dependencies are installed into it with apt, and the result is committed as an OCI image
# (also kept in local container storage as localhost/uptermd:VERSION). Needs root,
# debootstrap and buildah; DEBIAN_MIRROR picks the mirror (default deb.debian.org), and
# downloaded packages are kept in ~/.cache/upterm-oci for the next build.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
out=${1:-$root/dist/uptermd-$version.oci.tar}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/upterm-oci
tag=localhost/uptermd:$version

say() { echo "build-image: $*" >&2; }
[ "$(id -u)" -eq 0 ] || { say "needs root (debootstrap and buildah's storage); run with sudo"; exit 2; }
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || { say "needs $tool: apt-get install $tool"; exit 2; }
done

debs=("dist/upterm_${version}_all.deb" "dist/uptermd_${version}_all.deb")
if [ ! -f "${debs[0]}" ] || [ ! -f "${debs[1]}" ] || [ -n "$(find upterm pyproject.toml packaging/debian -newer "${debs[1]}" -print -quit)" ]; then
  say "building the .deb packages"
  packaging/build-deb.sh >/dev/null
fi

ctr=$(buildah from --quiet scratch)
cleanup() { buildah umount "$ctr" >/dev/null 2>&1 || true; buildah rm "$ctr" >/dev/null 2>&1 || true; }
trap cleanup EXIT
rootfs=$(buildah mount "$ctr")
mkdir -p "$cache"

say "debootstrap (Debian 12, minbase) from $mirror"
debootstrap --variant=minbase --cache-dir="$cache" --include=ca-certificates \
  bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
  say "debootstrap failed; the end of its log:"; tail -20 "$cache/debootstrap.log" >&2; exit 1; }

say "installing upterm and uptermd with their dependencies"
cp "${debs[@]}" "$rootfs/tmp/"
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
in_root() { chroot "$rootfs" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
# Services must not start inside the build.
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod +x "$rootfs/usr/sbin/policy-rc.d"
mount --bind /proc "$rootfs/proc"
trap 'umount "$rootfs/proc" 2>/dev/null || true; cleanup' EXIT
in_root apt-get update -qq
# The cluster's registry client and the WebSocket mask are Recommends: the image has both.
in_root apt-get install -y -qq --no-install-recommends \
  "/tmp/upterm_${version}_all.deb" "/tmp/uptermd_${version}_all.deb" python3-redis python3-websockets \
  >"$cache/apt.log" 2>&1 || { say "apt failed:"; tail -20 "$cache/apt.log" >&2; exit 1; }
umount "$rootfs/proc"
# A fixed, unprivileged user owns the state directory (keys) and runs the relay.
in_root groupadd --system --gid 999 uptermd
in_root useradd --system --uid 999 --gid 999 --home-dir /var/lib/uptermd --shell /usr/sbin/nologin uptermd
install -d -m 0700 -o 999 -g 999 "$rootfs/var/lib/uptermd"
# Nothing that only served the build: package lists, caches, logs, the policy, our .debs.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/*.deb "$rootfs/usr/sbin/policy-rc.d" \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
: >"$rootfs/etc/resolv.conf"
buildah umount "$ctr" >/dev/null

say "committing $tag"
buildah config \
  --entrypoint '["/usr/bin/uptermd"]' \
  --cmd '[]' \
  --user 999:999 \
  --workingdir /var/lib/uptermd \
  --env STATE_DIRECTORY=/var/lib/uptermd \
  --env UPTERMD_SSH_ADDR=0.0.0.0:2222 \
  --env PYTHONDONTWRITEBYTECODE=1 \
  --port 2222/tcp --port 8080/tcp --port 9100/tcp \
  --stop-signal SIGTERM \
  --label org.opencontainers.image.title=uptermd \
  --label org.opencontainers.image.description="upterm relay: instant, secure terminal sharing over SSH" \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label org.opencontainers.image.revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  "$ctr"
buildah commit --quiet --format oci --rm "$ctr" "$tag" >/dev/null
trap - EXIT
mkdir -p "$(dirname "$out")"
rm -f "$out"
buildah push --quiet "$tag" "oci-archive:$out:$tag" >/dev/null
say "wrote $out ($(du -h "$out" | cut -f1)) and $tag"
