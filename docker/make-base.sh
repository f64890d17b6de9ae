#!/usr/bin/env bash
# Make a Debian base image locally, for machines that reach Debian's package mirror but no
# container registry (air-gapped build hosts, hospital networks, this project's CI machines).
#
#   sudo docker/make-base.sh [TAG] [SUITE] [MIRROR]
#   docker build --build-arg BASE_IMAGE=dualglow-local/debian:bookworm-slim -t dualglow:0.1.0 .
#
# The result stands in for the Dockerfile's default base, debian:bookworm-slim: the same
# suite, debootstrap's "minbase" variant (essential + apt, as the slim image), and the same
# apt sources (main + updates + security). It needs root (debootstrap chroots) and a
# running Docker daemon; it took 96 s here (a 117 MB image).
set -euo pipefail
tag=${1:-dualglow-local/debian:bookworm-slim}
suite=${2:-bookworm}
mirror=${3:-http://deb.debian.org/debian}

command -v debootstrap >/dev/null || { echo "make-base.sh: debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "make-base.sh: debootstrap needs root" >&2; exit 2; }

rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/dualglow-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
  || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"

security=${mirror%/debian}/debian-security
cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
rm -f "$rootfs/etc/apt/sources.list"
# As in Debian's own images: no package lists, caches or logs in the layer.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/var/log/*.log "$rootfs"/tmp/* "$rootfs"/var/tmp/*

tar --numeric-owner -C "$rootfs" -c . \
  | docker import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' \
      --message "debootstrap --variant=minbase $suite $mirror" - "$tag" >/dev/null
echo "$tag"
