#!/usr/bin/env bash
# An offline stand-in for python:3.11-slim-bookworm, made from Debian's own packages: debootstrap
# (minbase + python3 + venv) into a cached root filesystem, `docker import`ed once. Prints the
# image name (faster-qat-debian-base:<hash of the rootfs tar>). No container registry is
# reachable here, so `images build cpu --base <this>` is how the real images/cpu builds.
#
# Like python:*-slim it has `python` and `pip` on PATH (a venv at /opt/venv: Debian's own python3
# refuses pip installs into the system, PEP 668). The machine's CA bundle is copied in so that
# the image build's `pip install` trusts the same TLS roots as this machine's pip.
set -euo pipefail

SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${FASTER_QAT_CACHE:-/var/cache/faster-qat}/debian-base
TAR=$CACHE/$SUITE-python3.tar
REPOSITORY=faster-qat-debian-base
log() { echo "debian-base.sh: $*" >&2; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [[ ! -s $TAR ]]; then
    command -v debootstrap >/dev/null || { log "needs debootstrap (apt-get install debootstrap)"; exit 1; }
    root=$(mktemp -d "$CACHE/rootfs.XXXX")
    trap 'rm -rf "$root"' EXIT
    started=$(date +%s)
    log "debootstrap $SUITE (minbase + python3) from $MIRROR ..."
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { log "debootstrap failed; see $CACHE/debootstrap.log"; tail -5 "$CACHE/debootstrap.log" >&2; exit 1; }
    chroot "$root" /usr/bin/python3 -m venv /opt/venv
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc \
        "$root"/usr/share/man "$root"/usr/share/locale
    # Same bytes for the same packages: sorted names and fixed owners keep the tar (and so the
    # image name) stable across rebuilds of the cache.
    tar --sort=name --owner=0 --group=0 --numeric-owner -C "$root" -cf "$TAR.new" .
    mv -f "$TAR.new" "$TAR"
    log "root filesystem $(du -m "$TAR" | cut -f1) MiB in $(( $(date +%s) - started )) s"
fi
tag=$(sha256sum "$TAR" | cut -c1-16)
image=$REPOSITORY:$tag
if ! docker image inspect "$image" >/dev/null 2>&1; then
    docker import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' "$TAR" "$image" >/dev/null
fi
echo "$image"
