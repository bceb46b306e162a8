#!/usr/bin/env bash
# `make demo`: start a pleaco agent on its embedded defaults (data dir /var/lib/pleaco,
# API on 0.0.0.0:7400), deploy a small web app with 3 replicas, wait until every replica
# is healthy, and show each one answering. `make demo-stop` stops the agent and removes
# the demo app. The agent's log goes to /var/log/pleaco-demo.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PLEACO=$PWD/.venv/bin/pleaco
DATA_DIR=/var/lib/pleaco
LOG=/var/log/pleaco-demo.log
PIDFILE=/run/pleaco-demo.pid
API=http://127.0.0.1:7400

if [ "${1:-}" = stop ]; then
    node=$("$PLEACO" --api "$API" status --json 2>/dev/null | "$PWD/.venv/bin/python" -c \
        'import json,sys; print(json.load(sys.stdin)["node_id"])' 2>/dev/null || true)
    if "$PLEACO" --api "$API" apps rm hello 2>/dev/null; then
        # Let the agent remove the containers before it stops.
        for _ in $(seq 300); do
            [ -z "$(docker ps -aq --filter label=pleaco.app=hello)" ] && break
            sleep 0.1
        done
    fi
    if [ -f "$PIDFILE" ] && kill "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "demo: agent stopped (its data stays in $DATA_DIR)"
    fi
    rm -f "$PIDFILE"
    # The proxy outlives the agent by design (it keeps serving); the demo removes it.
    if [ -n "$node" ]; then
        docker ps -aq --filter label=pleaco.role=proxy --filter "label=pleaco.node=$node" | xargs -r docker rm -f >/dev/null
        # And the agent's own network (with its bridge pleaco0), once nothing is on it.
        docker network ls -q --filter label=pleaco.role=network --filter "label=pleaco.node=$node" \
            | xargs -r docker network rm >/dev/null 2>&1 || true
    fi
    exit 0
fi

if curl -sf "$API/healthz" >/dev/null; then
    echo "demo: an agent already answers on $API"
else
    echo "demo: starting the agent (data dir $DATA_DIR, API $API, log $LOG)"
    # The proxy image is built locally (scripts/images.sh): caddy:2 cannot be pulled here.
    nohup "$PLEACO" agent --proxy-image pleaco/caddy:latest >"$LOG" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 100); do
        curl -sf "$API/healthz" >/dev/null && break
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { echo "demo: the agent exited; its log:"; cat "$LOG"; exit 1; }
        sleep 0.1
    done
fi
"$PLEACO" status
echo
echo "demo: pleaco apps deploy hello --image pleaco/hello:latest --replicas 3 --port 8080 --health /healthz"
"$PLEACO" apps deploy hello --image pleaco/hello:latest --replicas 3 --port 8080 --health /healthz

deadline=$((SECONDS + 60))
until [ "$("$PLEACO" apps show hello --json | "$PWD/.venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["healthy"])')" = 3 ]; do
    if [ $SECONDS -ge $deadline ]; then
        echo "demo: the replicas did not turn healthy within 60 s"; "$PLEACO" apps show hello; exit 1
    fi
    sleep 0.5
done
echo
"$PLEACO" apps show hello
echo
echo "demo: each replica answers on its own cluster address (the pleaco network, 10.210.x.y):"
for addr in $("$PLEACO" apps show hello --json | "$PWD/.venv/bin/python" -c \
        'import json,sys; print(" ".join(i["address"] for i in json.load(sys.stdin)["instances"]))'); do
    printf '  curl http://%s/  ->  %s\n' "$addr" "$(curl -sf "http://$addr/")"
done
echo
echo "demo: and all of them through the proxy on :80, by host name (hello.pleaco.internal):"
for _ in $(seq 100); do
    curl -sf -H 'Host: hello.pleaco.internal' http://127.0.0.1/ >/dev/null && break
    sleep 0.1
done
for _ in 1 2 3 4 5 6; do
    printf '  curl -H "Host: hello.pleaco.internal" http://127.0.0.1/  ->  %s\n' \
        "$(curl -s -H 'Host: hello.pleaco.internal' http://127.0.0.1/)"
done
cat <<TXT

The agent keeps running in the background (log: $LOG). Try:
  .venv/bin/pleaco apps ls
  .venv/bin/pleaco apps scale hello 5
  .venv/bin/pleaco apps logs hello
  docker ps --filter label=pleaco.app=hello
  curl -k --resolve hello.pleaco.internal:443:127.0.0.1 https://hello.pleaco.internal/   # internal CA
  .venv/bin/pleaco apps deploy hello --image pleaco/hello:latest --port 8080 --health /healthz --env GREETING=v2
Stop it with: make demo-stop
TXT
