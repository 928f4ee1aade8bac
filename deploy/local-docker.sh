#!/usr/bin/env bash
# A Docker engine and a local Debian base image, on a machine that has neither a running engine
# nor a reachable image registry (Debian packages only): what `make test-deploy` needs.
#
#   bash deploy/local-docker.sh [start]  install docker.io and debootstrap (apt), start dockerd,
#                                        build the base image local/debian-py:bookworm (idempotent)
#   bash deploy/local-docker.sh stop     stop the dockerd that `start` started
#   bash deploy/local-docker.sh clean    remove the images made here (~1.3 GB in /var/lib/docker),
#                                        stop, and say what `start` installed and how to remove it
#
# Needs root: it installs packages and runs dockerd, which keeps running (log: /tmp/dockerd.log)
# until `stop`. Then: docker build --build-arg BASE=local/debian-py:bookworm ...
set -euo pipefail
BASE=local/debian-py:bookworm
IMAGES=("$BASE" wasisup:test wasisup)
PIDFILE=/run/wasisup-dockerd.pid  # only a dockerd this script started is ever stopped
INSTALLED=/var/lib/wasisup-local-docker.installed  # the packages `start` installed

usage() { sed -n '2,12s/^# \{0,1\}//p' "$0"; }
fail() { echo "local-docker.sh: error: $*" >&2; exit 2; }

start() {
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        local before
        before=$(dpkg-query -W -f '${Package}\n' | sort)
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
        comm -13 <(echo "$before") <(dpkg-query -W -f '${Package}\n' | sort) >>"$INSTALLED"
    fi

    if ! docker info >/dev/null 2>&1; then
        # No bridge rules here: containers use --network host.
        nohup dockerd --iptables=false --storage-driver=vfs --pidfile "$PIDFILE" \
            >/tmp/dockerd.log 2>&1 &
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null || fail "dockerd did not start: see /tmp/dockerd.log"
    fi

    if ! docker image inspect "$BASE" >/dev/null 2>&1; then
        rootfs=$(mktemp -d)
        mirror=$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' \
                 /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true)
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >/dev/null
        # Package downloads pass a TLS proxy that only this machine's CA bundle trusts.
        cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
        chmod 0755 "$rootfs"  # mktemp's 0700 would become the image's / and lock out non-root users
        tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
        rm -rf "$rootfs"
    fi
    echo "docker ready; base image $BASE; stop it with: bash deploy/local-docker.sh stop"
}

stop() {
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null; then
        echo "no dockerd started by local-docker.sh is running"
        return
    fi
    kill -TERM "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && fail "dockerd (pid $pid) did not stop within 30 s"
    echo "dockerd stopped"
}

clean() {
    if docker info >/dev/null 2>&1; then
        docker image rm -f "${IMAGES[@]}" >/dev/null 2>&1 || true
        docker image prune -f >/dev/null  # the Dockerfile's build stages
        echo "removed ${IMAGES[*]}"
    fi
    stop
    if [[ -s "$INSTALLED" ]]; then
        echo "still installed by start: $(sort -u "$INSTALLED" | wc -l) packages ($(sort -u "$INSTALLED" | tr '\n' ' '))"
        echo "  remove them: apt-get purge \$(cat $INSTALLED) && rm $INSTALLED"
    fi
    echo "docker.io also made the docker group (groupdel docker) and, while dockerd ran, the"
    echo "docker0 bridge (ip link delete docker0); /var/lib/docker holds what images remain"
}

command=${1:-start}
case "$command" in
    -h|--help|help) usage; exit 0 ;;
    start|stop|clean) ;;
    *) fail "unknown command '$command': use start, stop or clean (see --help)" ;;
esac
[[ $(id -u) == 0 ]] || fail "needs root: it installs docker.io and debootstrap with apt and runs dockerd; run it with sudo"
"$command"
