#!/bin/sh
# Make sure a Docker Engine answers on /var/run/docker.sock. Where nothing answers and
# there is no systemd to ask (CI and development machines), start dockerd in the
# background with its log in /var/log/pleaco-dockerd.log, then wait for it.
set -eu
SOCK=/var/run/docker.sock
answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
answers && exit 0
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl start docker
else
    command -v dockerd >/dev/null || { echo "dockerd not installed (apt-get install docker.io)" >&2; exit 1; }
    # A stale pid file from a killed dockerd stops a new one from starting.
    if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    # setsid: a session of its own, so that whoever ends the job or terminal that started
    # it (a CI step, a shell tool killing its process group) does not take the engine too.
    pgrep -x dockerd >/dev/null || setsid nohup dockerd >/var/log/pleaco-dockerd.log 2>&1 </dev/null &
fi
i=0
until answers; do
    i=$((i + 1))
    if [ $i -gt 60 ]; then
        echo "Docker Engine did not answer on $SOCK within 60 s; see /var/log/pleaco-dockerd.log" >&2
        exit 1
    fi
    sleep 1
done
echo "docker: engine $(docker version --format '{{.Server.Version}}') answers on $SOCK"
