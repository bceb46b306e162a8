#!/bin/sh
# Build the images the tests and the demo use, offline (no registry is reachable):
#   pleaco/busybox:latest  a base image imported from Debian's busybox-static
#   pleaco/hello:latest    examples/hello, a busybox httpd that answers with its host name
#   pleaco/caddy:latest    the reverse proxy: Debian's caddy binary (apt package caddy) on busybox
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
# pleaco/caddy:latest: the reverse proxy for tests and the demo (upstream caddy:2 cannot be
# pulled here). Debian's caddy binary with the shared libraries it links (libc, libzstd)
# copied next to it, on the busybox image. Rebuilt when the binary changes.
CADDY=${CADDY:-/usr/bin/caddy}
if [ -x "$CADDY" ]; then
    chash=$(sha256sum "$CADDY" | cut -c1-16)
    have=$(docker image inspect -f '{{ index .Config.Labels "pleaco.source-hash" }}' pleaco/caddy:latest 2>/dev/null || true)
    if [ "${FORCE:-0}" = 1 ] || [ "$have" != "$chash" ]; then
        ctx=$(mktemp -d)
        mkdir -p "$ctx/root/usr/bin" "$ctx/root/etc/caddy" "$ctx/root/data" "$ctx/root/config"
        cp "$CADDY" "$ctx/root/usr/bin/caddy"
        # The dynamic loader and every library ldd names, at the same paths.
        for lib in $(ldd "$CADDY" | grep -o '/[^ ]*'); do
            mkdir -p "$ctx/root$(dirname "$lib")"
            cp -L "$lib" "$ctx/root$lib"
        done
        cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM pleaco/busybox:latest
COPY root/ /
ENV PATH=/usr/bin:/bin XDG_CONFIG_HOME=/config XDG_DATA_HOME=/data
CMD ["/usr/bin/caddy", "run"]
DOCKERFILE
        DOCKER_BUILDKIT=0 docker build -q --label "pleaco.source-hash=$chash" -t pleaco/caddy:latest "$ctx" \
            >/dev/null 2>/tmp/pleaco-images.log || { rm -rf "$ctx"; cat /tmp/pleaco-images.log >&2; exit 1; }
        rm -rf "$ctx"
        echo "images: built pleaco/caddy:latest"
    fi
fi
# pleaco/systemd-node:bookworm: the Debian node with systemd as PID 1 of
# tests/integration/test_systemd.py (debootstrap; about a minute, once).
scripts/systemd-image.sh
