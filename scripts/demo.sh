#!/usr/bin/env bash
# `make demo`: what pleaco is for, on this one machine, in a few minutes.
#   1. three nodes booted from the golden image (pleaco/node, `make image`): containers with
#      systemd as PID 1 and a Docker Engine each, on a private network, configured only as
#      cloud-init would (cloud-init/mdns-lan.yaml): they find each other over mDNS and form
#      one cluster by themselves;
#   2. an app (examples/hello) pushed to a local git server standing in for GitHub,
#      connected, then built, tested and scanned by the cluster, and deployed;
#   3. the app answering through every node's proxy, then scaled to 6 replicas.
# `make demo-stop` removes the nodes, their volumes, the network and the git server.
set -euo pipefail
cd "$(dirname "$0")/.."
PLEACO=$PWD/.venv/bin/pleaco
PY=$PWD/.venv/bin/python
NET=pleaco-demo
SUBNET=10.79.0
GATEWAY=$SUBNET.1
WORK=/var/tmp/pleaco-demo
GIT_PORT=9418
NODES=(1 2 3)
APP=hello
HOST=$APP.pleaco.internal

stop() {
    for i in "${NODES[@]}"; do
        docker rm -f -v "pleaco-demo-$i" >/dev/null 2>&1 || true
        docker volume rm -f "pleaco-demo-$i-docker" >/dev/null 2>&1 || true
    done
    docker network rm "$NET" >/dev/null 2>&1 || true
    if [ -f "$WORK/git.pid" ]; then
        kill "$(cat "$WORK/git.pid")" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}

if [ "${1:-}" = stop ]; then
    stop
    echo "demo: nodes, volumes, network and git server removed"
    exit 0
fi

VERSION=$("$PY" -c 'import pleaco; print(pleaco.__version__)')
IMAGE=pleaco/node:$VERSION
node_ip() { echo "$SUBNET.$((10 + $1))"; }
api() { echo "http://$(node_ip "$1"):7400"; }
token() { docker exec "pleaco-demo-$1" cat /var/lib/pleaco/admin.token 2>/dev/null; }
pl() {  # pleaco against node $1
    local n=$1; shift
    PLEACO_TOKEN=$(token "$n") "$PLEACO" --api "$(api "$n")" "$@"
}
wait_until() {  # wait_until SECONDS WHAT COMMAND...
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "demo: $what did not happen within $limit s"; return 1
        fi
        sleep 0.5
    done
}
alive_count() {
    pl "$1" nodes --json 2>/dev/null | "$PY" -c \
        'import json,sys; print(sum(n["state"] == "alive" for n in json.load(sys.stdin)))'
}
three_alive() { [ "$(alive_count "$1")" = 3 ]; }
app_field() { pl 1 apps show "$APP" --json | "$PY" -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }
healthy_is() { [ "$(app_field healthy)" = "$1" ]; }
answers() { curl -sf -m 3 -H "Host: $HOST" "http://$(node_ip "$1")/" >/dev/null; }

stop  # a previous demo's leftovers
mkdir -p "$WORK"
echo "demo: 1. three nodes from the golden image $IMAGE, configured only by cloud-init-style user data"
docker network create --subnet "$SUBNET.0/24" --gateway "$GATEWAY" \
    -o com.docker.network.bridge.name=br-pleaco-demo "$NET" >/dev/null
for i in "${NODES[@]}"; do
    name=pleaco-demo-$i
    docker volume create "$name-docker" >/dev/null
    docker create --name "$name" --hostname "$name" --network "$NET" --ip "$(node_ip "$i")" \
        --cap-add SYS_ADMIN --cap-add NET_ADMIN --security-opt seccomp=unconfined \
        --tmpfs /run --tmpfs /run/lock -v /sys/fs/cgroup:/sys/fs/cgroup:rw --cgroupns=host \
        --device /dev/net/tun --device /dev/fuse --stop-signal SIGRTMIN+3 \
        -v "$name-docker:/var/lib/docker" "$IMAGE" >/dev/null
    # What cloud-init/mdns-lan.yaml writes on a VM (the demo also polls the git server
    # every 2 s: no webhook reaches this machine's containers from GitHub).
    mkdir -p "$WORK/etc-$i"
    cat >"$WORK/etc-$i/pleaco.toml" <<TOML
name = "node$i"
discovery = "mdns"
bootstrap = "auto"
bootstrap_secret = "pleaco-demo-bootstrap-secret"
[build]
poll_interval = 2.0
TOML
    docker cp "$WORK/etc-$i/." "$name:/etc/pleaco/"
    docker start "$name" >/dev/null
done
started=$SECONDS
wait_until 120 "node 1's agent answering" curl -sf "$(api 1)/healthz"
wait_until 120 "a cluster of three" three_alive 1
echo "demo:    the nodes found each other over mDNS and formed one cluster in $((SECONDS - started)) s:"
pl 1 nodes | sed 's/^/    /'

echo
echo "demo: 2. the app examples/hello pushed to a git server (standing in for GitHub), connected"
mkdir -p "$WORK/git"
git daemon --reuseaddr --export-all --enable=receive-pack --listen="$GATEWAY" --port=$GIT_PORT \
    --base-path="$WORK/git" "$WORK/git" >/dev/null 2>&1 &
echo $! >"$WORK/git.pid"
git init -q --bare "$WORK/git/$APP.git"
cp -r examples/hello "$WORK/work"
(
    cd "$WORK/work"
    export GIT_AUTHOR_NAME=demo GIT_AUTHOR_EMAIL=demo@example.com GIT_COMMITTER_NAME=demo GIT_COMMITTER_EMAIL=demo@example.com
    git init -q -b main && git add -A && git commit -qm "hello"
    git push -q "$WORK/git/$APP.git" HEAD:refs/heads/main
)
pl 2 apps connect "$APP" --repo "git://$GATEWAY:$GIT_PORT/$APP.git" >/dev/null
echo "demo:    pleaco apps connect $APP --repo git://$GATEWAY:$GIT_PORT/$APP.git"
echo "demo:    the cluster fetches it, builds the image, runs its tests, scans it and releases it:"
has_build() { [ -n "$(pl 1 builds ls --app "$APP" --json | "$PY" -c 'import json,sys; b=json.load(sys.stdin); print(b[0]["id"] if b else "")')" ]; }
wait_until 60 "a build of $APP" has_build
build=$(pl 1 builds ls --app "$APP" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
pl 1 builds logs --follow "$build" | sed 's/^/    | /'
pl 1 builds show "$build" | sed 's/^/    /'

echo
echo "demo: 3. the app answering through every node's proxy (Host: $HOST)"
wait_until 120 "$APP healthy" healthy_is 1
for i in "${NODES[@]}"; do
    wait_until 60 "$APP through node $i's proxy" answers "$i"
    printf '    curl -H "Host: %s" http://%s/  ->  %s\n' "$HOST" "$(node_ip "$i")" \
        "$(curl -s -H "Host: $HOST" "http://$(node_ip "$i")/")"
done
echo
echo "demo:    pleaco apps scale $APP 6"
pl 3 apps scale "$APP" 6 >/dev/null
wait_until 120 "six healthy replicas" healthy_is 6
pl 1 apps show "$APP" | sed 's/^/    /'
echo
echo "demo:    six requests through node 1's proxy, spread over the replicas:"
for _ in 1 2 3 4 5 6; do
    printf '    %s\n' "$(curl -s -H "Host: $HOST" "http://$(node_ip 1)/")"
done
echo
echo "demo:    and from inside a replica on node 1, the app's service name covers all six, on every node:"
replica=$(docker exec pleaco-demo-1 docker ps -q --filter label=pleaco.app="$APP" | head -1)
printf '    nslookup %s.internal  ->  %s\n' "$APP" \
    "$(docker exec pleaco-demo-1 docker exec "$replica" nslookup "$APP.internal" | awk '/^Address: /{print $2}' | sort | xargs)"
cat <<TXT

The cluster keeps running. Try:
  export PLEACO_TOKEN=\$(docker exec pleaco-demo-1 cat /var/lib/pleaco/admin.token)
  .venv/bin/pleaco --api $(api 1) nodes
  .venv/bin/pleaco --api $(api 1) apps autoscale $APP --min 1 --max 6
  docker stop pleaco-demo-3          # the app keeps answering through the others
  the dashboard: http://$(node_ip 1):7400/ui/ (log in with the token)
  push a change to $WORK/work (git push $WORK/git/$APP.git HEAD:main): it is built and rolled out
Stop it with: make demo-stop
TXT
