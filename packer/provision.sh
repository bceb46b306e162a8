#!/bin/sh
# Turn a Debian 12 system into a pleaco node image. Run by packer (packer/pleaco.pkr.hcl)
# with STAGE (what scripts/image.sh staged, uploaded) and PLEACO_VERSION. Idempotent.
#
# What ends up where:
#   /opt/pleaco/releases/VERSION   pleaco's first release slot: a venv installed from the
#                                  signed bundle's wheels, complete (.complete); `current`
#                                  points at it (host/slots.py's layout, so self-upgrade
#                                  takes over from here)
#   /etc/systemd/system/           pleaco.service (the repository's unit), pleaco-images.service
#                                  (loads the bundled images into the engine before the agent)
#                                  and a drop-in trusting the release key
#   /etc/pleaco/release.pub        the release-signing public key
#   /opt/pleaco/images/*.tar       images a node needs without a registry: the proxy
#   /var/lib/pleaco/vulndb/       the scanner's offline advisory database
# and no identity: machine-id, SSH host keys, any pleaco node key and cloud-init's state
# are removed, so each VM makes its own on first boot.
set -eu
if [ "$(id -u)" != 0 ]; then
    exec sudo -E "$0" "$@"
fi
: "${STAGE:?}" "${PLEACO_VERSION:?}"
export DEBIAN_FRONTEND=noninteractive

need=""
for pkg in docker.io git python3 python3-venv iptables iproute2 wireguard-tools ca-certificates; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
done
if [ -n "$need" ]; then
    echo "provision: installing$need"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

# The release slot, from the bundle's wheels (pip without an index: nothing is fetched).
slot=/opt/pleaco/releases/$PLEACO_VERSION
work=$(mktemp -d)
tar -xf "$STAGE/pleaco.bundle" -C "$work"
rm -rf "$slot"
python3 -m venv "$slot"
"$slot/bin/pip" install -q --no-index --find-links "$work/wheels" pleaco
rm -rf "$work"
touch "$slot/.complete"
ln -sfn "releases/$PLEACO_VERSION" /opt/pleaco/current
"$slot/bin/pleaco" --version

install -d -m 0755 /etc/pleaco /opt/pleaco/images
install -m 0644 "$STAGE/release.pub" /etc/pleaco/release.pub
for tarball in "$STAGE"/images/*.tar; do
    [ -e "$tarball" ] && install -m 0644 "$tarball" /opt/pleaco/images/
done
install -m 0644 "$STAGE/pleaco.service" /etc/systemd/system/pleaco.service
install -m 0644 "$STAGE/files/pleaco-images.service" /etc/systemd/system/pleaco-images.service
install -d /etc/systemd/system/pleaco.service.d
install -m 0644 "$STAGE/files/image.conf" /etc/systemd/system/pleaco.service.d/image.conf
if [ -d "$STAGE/vulndb" ]; then
    "$slot/bin/pleaco" vulndb import "$STAGE/vulndb" --data-dir /var/lib/pleaco
fi
systemctl enable docker.service pleaco-images.service pleaco.service

# No identity in the image: each VM makes its own on first boot.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id /etc/ssh/ssh_host_*
find /var/lib/pleaco -mindepth 1 -maxdepth 1 ! -name vulndb -exec rm -rf {} + 2>/dev/null || true
if command -v cloud-init >/dev/null; then
    cloud-init clean --logs
fi
# The build user of the qemu source (packer/files/build-seed) goes with the build.
if id packer >/dev/null 2>&1; then
    userdel -r packer 2>/dev/null || true
    rm -f /etc/sudoers.d/90-cloud-init-users
fi
apt-get clean
rm -rf /var/lib/apt/lists/* /tmp/pleaco-stage
echo "provision: pleaco $PLEACO_VERSION installed"
