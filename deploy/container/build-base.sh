#!/usr/bin/env bash
# Build a Debian bookworm base image with Python 3.11 from Debian's packages (no registry needed),
# the stand-in for python:3.11-slim on machines that can reach Debian's mirror but no registry.
#
#   deploy/container/build-base.sh [IMAGE]     (default localhost/nimbleml-base:bookworm)
#
# mmdebstrap writes a root-filesystem tarball (build/container/base.tar); buildah adds it to an
# empty image and commits it. Bookworm's python3 is 3.11, the version the project requires.
set -euo pipefail
cd "$(dirname "$0")/../.."
image=${1:-localhost/nimbleml-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
out=build/container
mkdir -p "$out"

# minbase (Essential + apt, with libstdc++) is what debian:bookworm-slim, python:3.11-slim's base, holds.
# python3.11-venv: `python3 -m venv` in the builder stage; passwd (useradd), netbase and tzdata as in
# python:3.11-slim.
# Docs, man pages and locales are left out (dpkg path-exclude), apt's lists and caches removed.
mmdebstrap --variant=minbase --quiet \
    --include=python3.11,python3.11-venv,python3-venv,passwd,ca-certificates,netbase,tzdata \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
    bookworm "$out/base.tar" "$mirror"

container=$(buildah from scratch)
trap 'buildah rm "$container" >/dev/null' EXIT
buildah add --quiet "$container" "$out/base.tar" /
buildah config --env LANG=C.UTF-8 --cmd python3 "$container"
buildah commit --quiet --rm "$container" "$image" >/dev/null
trap - EXIT
rm -f "$out/base.tar"
echo "base image: $image"
