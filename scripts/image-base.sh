#!/bin/sh
# Build pleaco/image-base:bookworm, the base of the golden image's docker source
# (packer/pleaco.pkr.hcl, source docker.local): a Debian 12 root file system made by
# debootstrap from the Debian mirror (no container registry), with systemd as PID 1 and
# what a node runs: Docker Engine, git (builds fetch apps' repositories), Python 3.11 with
# venv, iptables, iproute2, WireGuard.
# The VM sources start from Debian's cloud images instead. Kept once built (FORCE=1 rebuilds).
set -eu
TAG=${IMAGE_BASE:-pleaco/image-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    exit 0
fi
root=$(mktemp -d /var/tmp/pleaco-image-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
log=/tmp/pleaco-image-base.log
echo "image: debootstrap of Debian 12 with systemd and Docker Engine (about a minute; log $log)"
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,libsystemd0,python3,python3-venv,procps,iproute2,iptables,docker.io,git,fuse-overlayfs,ca-certificates,wireguard-tools,wireguard-go,kmod \
    bookworm "$root" "$MIRROR" >"$log" 2>&1 || { tail -20 "$log" >&2; exit 1; }
"$(dirname "$0")/container-node-units.sh" "$root"
# The inner engine keeps its layers on overlay2 (a volume at /var/lib/docker at run time);
# fuse-overlayfs is its fallback without one.
mkdir -p "$root/etc/docker"
echo '{"storage-driver": "overlay2", "bip": "10.252.0.1/24"}' > "$root/etc/docker/daemon.json"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'CMD ["/sbin/init"]' -c 'ENV container=docker' - "$TAG" >/dev/null
echo "image: built $TAG"
