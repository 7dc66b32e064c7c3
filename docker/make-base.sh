#!/usr/bin/env bash
# Make a Python 3.11 base image from Debian's own packages, for hosts that cannot pull from Docker Hub.
#
#   sudo docker/make-base.sh [TAG]        # default TAG: clipbank-base:bookworm-python3.11
#
# debootstrap builds a minimal Debian bookworm (its python3 is 3.11, the version the stock image has), a venv at
# /opt/python takes the place of the stock image's /usr/local Python, and `docker import` turns the folder into an
# image whose `python` and `pip` are that venv's. Pass the tag to a build as `--build-arg PYTHON_BASE=TAG`
# (docker/smoke.sh does). Needs root, debootstrap and a Docker engine; the mirror is DEBIAN_MIRROR.
set -euo pipefail

tag="${1:-clipbank-base:bookworm-python3.11}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [[ $(id -u) -ne 0 ]]; then
    echo "make-base.sh: debootstrap needs root" >&2
    exit 1
fi
command -v debootstrap >/dev/null || { echo "make-base.sh: install debootstrap (apt-get install debootstrap)" >&2; exit 1; }

root="$(mktemp -d /tmp/clipbank-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$root" "$mirror"
chroot "$root" python3 -m venv /opt/python
chroot "$root" /opt/python/bin/python -m pip --version
# What the image does not need: apt's lists and caches, docs, man pages.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
       "$root"/var/log/*.log

tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python"]' \
    --message "debootstrap $suite minbase + python3 venv (clipbank docker/make-base.sh)" \
    - "$tag"
docker run --rm --network none "$tag" python -c 'import sys, ssl; print(sys.version.split()[0], ssl.OPENSSL_VERSION)'
echo "$tag"
