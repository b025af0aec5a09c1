#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine, whatever state it is in.
#
# Why: CI and a new user start from a fresh Debian machine that has the docker
# client but no engine, and a killed earlier run leaves a stale pid file behind
# that makes the next dockerd refuse to start. `make demo`, `make molecule` and
# `.ci/run` all call this one idempotent script; it returns at once when the
# engine already answers.
set -euo pipefail

LOG=${DOCKERD_LOG:-/var/log/rpicluster-dockerd.log}
PIDFILE=/var/run/docker.pid
WAIT_SECONDS=${DOCKERD_WAIT_SECONDS:-60}

log() { echo "docker-engine: $*" >&2; }

if docker info >/dev/null 2>&1; then
    exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
    log "no dockerd on this machine: installing Debian's docker.io"
    export DEBIAN_FRONTEND=noninteractive
    # Other set-up scripts may be running apt at the same time: wait for its lock.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq docker.io >/dev/null
fi
# Debian's package may start the engine by itself (with a service manager).
if docker info >/dev/null 2>&1; then
    exit 0
fi

if ! pgrep -x dockerd >/dev/null 2>&1; then
    if [[ -e $PIDFILE ]]; then
        log "removing stale $PIDFILE (no dockerd is running)"
        rm -f "$PIDFILE"
    fi
    log "starting dockerd in the background, logging to $LOG"
    # Only stdin, stdout and stderr go to dockerd: a descriptor it inherited
    # would stay open as long as the engine runs, and when the caller holds a
    # lock on it (`flock /work/locks/docker.lock make molecule`) the engine
    # would hold that lock for ever and every later flock would wait.
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        exec nohup dockerd >>"$LOG" 2>&1 </dev/null
    ) &
    disown || true
fi

for ((i = 0; i < WAIT_SECONDS * 2; i++)); do
    if docker info >/dev/null 2>&1; then
        log "engine is up"
        exit 0
    fi
    sleep 0.5
done
log "dockerd did not answer within ${WAIT_SECONDS}s; last lines of $LOG:"
tail -n 20 "$LOG" >&2 || true
exit 1
