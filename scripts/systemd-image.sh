#!/bin/sh
# Build pleaco/systemd-node:bookworm, the image of tests/integration/test_systemd.py: a
# Debian 12 root file system (debootstrap, from deb.debian.org) whose PID 1 is systemd.
# The test mounts the checkout, its venv and the host's Docker socket into it, so the
# image carries only what they need at run time: python3 (3.11, the venv's version, and
# the shared libraries its stdlib extensions link), libsystemd0 (pystemd), dbus (systemctl
# and pystemd talk to systemd over it), systemd-sysv (/sbin/init). No docker.io: the agent
# under test drives the host's engine. About a minute and 250 MB, once: the tag is kept
# (FORCE=1 rebuilds). Called by scripts/images.sh.
set -eu
TAG=${SYSTEMD_IMAGE:-pleaco/systemd-node:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    # Not fatal: only test_systemd needs the image, and it says how to get it.
    echo "images: skipped $TAG: debootstrap is not installed (make apt installs it)" >&2
    exit 0
fi
root=$(mktemp -d /var/tmp/pleaco-systemd-node.XXXXXX)
trap 'rm -rf "$root"' EXIT
log=/tmp/pleaco-systemd-image.log
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,libsystemd0,python3,procps,iproute2 \
    bookworm "$root" "$MIRROR" >"$log" 2>&1 || { tail -20 "$log" >&2; exit 1; }
# A container needs none of these; without them boot is quieter and quicker.
"$(dirname "$0")/container-node-units.sh" "$root"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'CMD ["/sbin/init"]' -c 'ENV container=docker' - "$TAG" >/dev/null
echo "images: built $TAG"
