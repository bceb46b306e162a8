# pleaco's two commands, `make test` and `make demo`, each self-sufficient on a fresh
# Debian 12 root machine with no internet but the package registries. Every step is
# idempotent: a second run skips what is done.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PLEACO := $(VENV)/bin/pleaco
APT_PACKAGES := docker.io git libsystemd-dev pkg-config busybox-static iproute2 curl wrk procps caddy avahi-daemon avahi-utils dbus iptables docker-registry debootstrap chromium packer cloud-init wireguard-go wireguard-tools redis-server redis-tools
STAMP := .venv/.stamp-deps

.PHONY: all deps apt venv docker images image test unit lint demo demo-stop bench clean

all: test

# -- installation -----------------------------------------------------------------------

apt: .venv/.stamp-apt
.venv/.stamp-apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "apt: installing $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@# Only caddy's binary is wanted (for the pleaco/caddy image); its service would take :80.
	@if command -v systemctl >/dev/null && systemctl is-enabled caddy >/dev/null 2>&1; then \
	    systemctl disable --now caddy >/dev/null 2>&1 || true; \
	fi
	@# Likewise docker-registry's (the build.registry tests run their own); its service takes :5000.
	@if command -v systemctl >/dev/null && systemctl is-enabled docker-registry >/dev/null 2>&1; then \
	    systemctl disable --now docker-registry >/dev/null 2>&1 || true; \
	fi
	@# Likewise redis-server's (only its binary is wanted, for the pleaco/redis image); its service takes :6379.
	@if command -v systemctl >/dev/null && systemctl is-enabled redis-server >/dev/null 2>&1; then \
	    systemctl disable --now redis-server >/dev/null 2>&1 || true; \
	fi
	@# Where a package's install script started avahi on this host's own interfaces, stop
	@# it: the tests run their own, inside network namespaces.
	@-avahi-daemon -k >/dev/null 2>&1
	@mkdir -p $(VENV) && touch $@

venv: $(STAMP)
$(STAMP): pyproject.toml .venv/.stamp-apt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@
	@echo "venv: pleaco installed in $(VENV)"

deps: venv docker images

docker: apt
	@scripts/dockerd.sh

images: docker
	@scripts/images.sh

# The golden image's docker source, offline: pleaco/node:VERSION (packer/pleaco.pkr.hcl).
image: deps
	@scripts/image.sh

# -- tests ------------------------------------------------------------------------------

lint: venv
	$(VENV)/bin/ruff check pleaco tests benchmarks
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest tests/unit -q

test: deps image lint
	$(VENV)/bin/pytest -q --durations=30

# -- the demo ---------------------------------------------------------------------------

demo: deps image
	@scripts/demo.sh

demo-stop:
	@scripts/demo.sh stop

# -- benchmarks -------------------------------------------------------------------------

bench: deps
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
