#!/bin/sh
# Mask, in the root file system ROOT, the units a Debian node running as a container needs
# none of (time sync, networkd/resolved: the engine gives it its network; consoles; apt and
# disk timers): boot is quicker and quieter. Used by scripts/image-base.sh and
# scripts/systemd-image.sh.
set -eu
root=$1
for unit in systemd-timesyncd.service systemd-networkd.service systemd-resolved.service \
            getty@tty1.service console-getty.service apt-daily.timer apt-daily-upgrade.timer \
            e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
