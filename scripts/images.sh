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
# Rebuilt whenever examples/hello changes: the image carries a hash of its sources.
hash=$(cd examples/hello && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
have=$(docker image inspect -f '{{ index .Config.Labels "pleaco.source-hash" }}' pleaco/hello:latest 2>/dev/null || true)
if [ "${FORCE:-0}" = 1 ] || [ "$have" != "$hash" ]; then
    DOCKER_BUILDKIT=0 docker build -q --label "pleaco.source-hash=$hash" -t pleaco/hello:latest examples/hello \
        >/dev/null 2>/tmp/pleaco-images.log || { cat /tmp/pleaco-images.log >&2; exit 1; }
    echo "images: built pleaco/hello:latest"
fi
