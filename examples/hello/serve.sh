#!/bin/sh
# Each replica answers with its own container host name, so a client can tell them apart.
mkdir -p /www
echo "hello from $(hostname) (${GREETING:-pleaco})" > /www/index.html
echo ok > /www/healthz
echo "serving on :${PORT:-8080}"
exec httpd -f -v -p "${PORT:-8080}" -h /www
