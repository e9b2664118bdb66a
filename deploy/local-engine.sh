#!/usr/bin/env bash
# Start or stop a Docker engine for the compose test on a machine where none runs (CI, a fresh
# Debian VM). Needs root. Not for production hosts: use your distribution's docker service there.
#
#   deploy/local-engine.sh start   # installs docker.io, docker-compose and debootstrap if missing,
#                                  # starts dockerd unless an engine already answers, waits for it
#   deploy/local-engine.sh stop    # stops the dockerd that `start` started (by its PID), nothing else
#
# The engine runs with the vfs storage driver and without iptables rules, which works inside VMs
# and containers without overlayfs or netfilter (see docs/docker.md). Its log: $STATE_DIR/dockerd.log.
set -euo pipefail
STATE_DIR=${EDGEHEADS_ENGINE_STATE:-/tmp/edgeheads-engine}
PIDFILE="$STATE_DIR/dockerd.pid"

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

start() {
    missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]} from the distribution's packages"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if engine_answers; then
        echo "a Docker engine already answers; using it"
        return
    fi
    mkdir -p "$STATE_DIR"
    dockerd --storage-driver=vfs --iptables=false --ip-masq=false >"$STATE_DIR/dockerd.log" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 120); do
        if engine_answers; then
            echo "dockerd started (pid $(cat "$PIDFILE"))"
            return
        fi
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
            echo "dockerd exited; its log:" >&2
            tail -20 "$STATE_DIR/dockerd.log" >&2
            exit 1
        fi
        sleep 1
    done
    echo "dockerd did not answer within 120 s; its log:" >&2
    tail -20 "$STATE_DIR/dockerd.log" >&2
    exit 1
}

stop() {
    [ -f "$PIDFILE" ] || { echo "no engine started by this script"; return; }
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "dockerd (pid $pid) ignored SIGTERM for 60 s; killing it" >&2
            kill -KILL "$pid"
        fi
        echo "dockerd (pid $pid) stopped"
    fi
    rm -f "$PIDFILE"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
