#!/bin/sh
# Build the images the tests and the demo use, offline (no registry is reachable):
#   pleaco/busybox:latest  a base image imported from Debian's busybox-static
#   pleaco/hello:latest    examples/hello, a busybox httpd that answers with its host name
#   pleaco/caddy:latest    the reverse proxy: Debian's caddy binary (apt package caddy) on busybox
#   pleaco/redis:latest    a key-value store: Debian's redis-server and redis-cli (apt packages
#                          redis-server, redis-tools) on busybox
#   pleaco/counter-web:latest  examples/counter/web, a busybox httpd whose CGI counts in redis
# Idempotent: an image that exists is kept. FORCE=1 rebuilds them all.
set -eu
cd "$(dirname "$0")/.."
BUSYBOX=${BUSYBOX:-/bin/busybox}

# libs_of ROOT BINARY...: the dynamic loader and every shared library ldd names for the
# binaries, copied under ROOT at the same paths (the images have no package manager).
libs_of() {
    dest=$1
    shift
    for lib in $(ldd "$@" | grep -o '/[^ :]*\.so[^ :]*' | sort -u); do
        mkdir -p "$dest$(dirname "$lib")"
        cp -L "$lib" "$dest$lib"
    done
}

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
        libs_of "$ctx/root" "$CADDY"
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
# pleaco/redis:latest: a key-value store for stacks' examples and tests (upstream redis
# cannot be pulled here). Debian's redis-server and redis-cli with the libraries they link,
# on the busybox image. Rebuilt when either binary changes.
REDIS_SERVER=${REDIS_SERVER:-/usr/bin/redis-server}
REDIS_CLI=${REDIS_CLI:-/usr/bin/redis-cli}
if [ -x "$REDIS_SERVER" ] && [ -x "$REDIS_CLI" ]; then
    # As the official image's entrypoint does: a server started without a password
    # answers other containers (its protected mode would refuse any non-loopback client),
    # and arguments that start with '-' are the server's.
    entrypoint='#!/bin/sh
case "$1" in -*) set -- redis-server "$@" ;; esac
if [ "$1" = redis-server ]; then
    case " $* " in *" --protected-mode "*) ;; *) set -- "$@" --protected-mode no ;; esac
fi
exec "$@"'
    rhash=$( (cat "$REDIS_SERVER" "$REDIS_CLI"; echo "$entrypoint") | sha256sum | cut -c1-16)
    have=$(docker image inspect -f '{{ index .Config.Labels "pleaco.source-hash" }}' pleaco/redis:latest 2>/dev/null || true)
    if [ "${FORCE:-0}" = 1 ] || [ "$have" != "$rhash" ]; then
        ctx=$(mktemp -d)
        mkdir -p "$ctx/root/usr/bin" "$ctx/root/data"
        # Debian's redis-server is a link to redis-check-rdb (the binary picks its part by
        # the name it is run as): copied as a file named redis-server.
        cp -L "$REDIS_SERVER" "$ctx/root/usr/bin/redis-server"
        cp -L "$REDIS_CLI" "$ctx/root/usr/bin/redis-cli"
        libs_of "$ctx/root" "$REDIS_SERVER" "$REDIS_CLI"
        echo "$entrypoint" > "$ctx/root/usr/bin/redis-entrypoint"
        chmod 755 "$ctx/root/usr/bin/redis-entrypoint"
        cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM pleaco/busybox:latest
COPY root/ /
ENV PATH=/usr/bin:/bin
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["/usr/bin/redis-entrypoint"]
CMD ["redis-server"]
DOCKERFILE
        DOCKER_BUILDKIT=0 docker build -q --label "pleaco.source-hash=$rhash" -t pleaco/redis:latest "$ctx" \
            >/dev/null 2>/tmp/pleaco-images.log || { rm -rf "$ctx"; cat /tmp/pleaco-images.log >&2; exit 1; }
        rm -rf "$ctx"
        echo "images: built pleaco/redis:latest"
    fi
    # pleaco/counter-web:latest: examples/counter's web service (its CGI calls redis-cli,
    # so it is built on pleaco/redis). Rebuilt when its sources or pleaco/redis change.
    whash=$( (cd examples/counter/web && find . -type f | LC_ALL=C sort | xargs sha256sum;
              docker image inspect -f '{{ .Id }}' pleaco/redis:latest) | sha256sum | cut -c1-16)
    have=$(docker image inspect -f '{{ index .Config.Labels "pleaco.source-hash" }}' pleaco/counter-web:latest 2>/dev/null || true)
    if [ "${FORCE:-0}" = 1 ] || [ "$have" != "$whash" ]; then
        DOCKER_BUILDKIT=0 docker build -q --label "pleaco.source-hash=$whash" -t pleaco/counter-web:latest \
            examples/counter/web >/dev/null 2>/tmp/pleaco-images.log || { cat /tmp/pleaco-images.log >&2; exit 1; }
        echo "images: built pleaco/counter-web:latest"
    fi
else
    echo "images: pleaco/redis and pleaco/counter-web not built: no $REDIS_SERVER or $REDIS_CLI" \
         "(make apt installs redis-server and redis-tools)" >&2
fi
# pleaco/systemd-node:bookworm: the Debian node with systemd as PID 1 of
# tests/integration/test_systemd.py (debootstrap; about a minute, once).
scripts/systemd-image.sh
