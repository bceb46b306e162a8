#!/bin/sh
# Build the images the tests and the demo use, offline (no registry is reachable):
#   pleaco/busybox:latest  a base image imported from Debian's busybox-static
#   pleaco/hello:latest    examples/hello, a busybox httpd that answers with its host name
# Idempotent: an image that exists is kept. FORCE=1 rebuilds both.
set -eu
cd "$(dirname "$0")/.."
BUSYBOX=${BUSYBOX:-/bin/busybox}

if [ "${FORCE:-0}" = 1 ] || ! docker image inspect pleaco/busybox:latest >/dev/null 2>&1; then
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root/bin" "$root/tmp" "$root/etc" "$root/www"
    cp "$BUSYBOX" "$root/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
    echo 'root:x:0:' > "$root/etc/group"
    tar -C "$root" -c . | docker import \
        -c 'ENV PATH=/bin' -c 'CMD ["/bin/sh"]' - pleaco/busybox:latest >/dev/null
    echo "images: built pleaco/busybox:latest"
fi
if [ "${FORCE:-0}" = 1 ] || ! docker image inspect pleaco/hello:latest >/dev/null 2>&1; then
    docker build -q -t pleaco/hello:latest examples/hello >/dev/null
    echo "images: built pleaco/hello:latest"
fi
