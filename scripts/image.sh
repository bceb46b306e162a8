#!/bin/sh
# `make image`: the golden image's docker source, offline (packer/pleaco.pkr.hcl):
#   1. the Debian 12 base (scripts/image-base.sh, debootstrap; kept once built)
#   2. stage build/image/: a signed release bundle of this tree (pleaco release build),
#      its public key, the proxy image (as caddy:2, the agent's default proxy_image) and
#      busybox (a base image for apps built on a node without a registry), and an OSV
#      advisory directory when VULNDB names one
#   3. packer build -only=docker.local  ->  pleaco/node:VERSION
# The signing key is RELEASE_KEY (a `pleaco release keygen` private key file); without it a
# key of this checkout's own is made once in build/keys/ (fine for a test image, not for
# one whose upgrades others should trust).
set -eu
cd "$(dirname "$0")/.."
PLEACO=${PLEACO:-$PWD/.venv/bin/pleaco}
STAGE=build/image
VERSION=$("${PYTHON:-$PWD/.venv/bin/python}" -c 'import pleaco; print(pleaco.__version__)')

scripts/image-base.sh
# Rebuilt only when what goes into it changed (FORCE=1 rebuilds): pleaco's sources, the
# template and its files, the unit, the bundled images.
hash=$( { git ls-files -s pleaco packer systemd pyproject.toml scripts/image.sh scripts/image-base.sh
          docker image inspect -f '{{.Id}}' pleaco/caddy:latest pleaco/busybox:latest pleaco/image-base:bookworm
          git diff HEAD -- pleaco packer systemd pyproject.toml; } | sha256sum | cut -c1-16)
have=$(docker image inspect -f '{{ index .Config.Labels "pleaco.source-hash" }}' "pleaco/node:$VERSION" 2>/dev/null || true)
if [ "${FORCE:-0}" != 1 ] && [ "$have" = "$hash" ]; then
    echo "image: pleaco/node:$VERSION is up to date"
    exit 0
fi
rm -rf "$STAGE"
mkdir -p "$STAGE/images" build/keys
key=${RELEASE_KEY:-build/keys/release.key}
if [ ! -f "$key" ]; then
    "$PLEACO" release keygen --out build/keys >/dev/null
    echo "image: made a release key of this checkout's own in build/keys/"
fi
pub=${key%.key}.pub
"$PLEACO" release build --key "$key" --out "$STAGE/pleaco.bundle" --version "$VERSION"
cp "$pub" "$STAGE/release.pub"
docker tag pleaco/caddy:latest caddy:2
docker save caddy:2 -o "$STAGE/images/caddy.tar"
docker save pleaco/busybox:latest -o "$STAGE/images/busybox.tar"
if [ -n "${VULNDB:-}" ]; then
    mkdir -p "$STAGE/vulndb" && cp -r "$VULNDB"/. "$STAGE/vulndb/"
fi
echo "image: packer build (docker source, version $VERSION)"
PACKER_LOG=0 packer build -color=false -only=docker.local -var "version=$VERSION" -var "source_hash=$hash" packer/ | sed -u 's/^/  /'
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' pleaco/node
