#!/usr/bin/env bash
# Make a Docker engine and a local Debian base image available on a machine that has neither
# a running engine nor a reachable image registry (Debian packages only). Idempotent.
#   bash deploy/local-docker.sh    then: docker build --build-arg BASE=local/debian-py:bookworm ...
set -euo pipefail
BASE=local/debian-py:bookworm

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    # No bridge rules here: containers use --network host.
    nohup dockerd --iptables=false --storage-driver=vfs >/tmp/dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null
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
echo "docker ready; base image $BASE"
