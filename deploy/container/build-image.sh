#!/usr/bin/env bash
# Build the `nimbleml serve` image with buildah from the Debian base that build-base.sh makes.
#
#   deploy/container/build-image.sh            -> localhost/nimbleml-serve:0.1.0
#   NIMBLEML_REBUILD_BASE=1 deploy/container/build-image.sh   (re-make the base first)
#
# The base is made only when missing: a new base invalidates every cached layer (torch included).
# Local pip sources of this machine (pip's find-links / extra-index-url when they are folders or
# file:// URLs, and pip's CA bundle) are bind-mounted read-only into the build's RUN steps and
# named by build arguments; nothing of them is left in the image. When a local find-links folder
# holds the torch 2.13.0 CPU wheel, torch comes from it instead of download.pytorch.org.
set -euo pipefail
cd "$(dirname "$0")/../.."
base=${NIMBLEML_BASE:-localhost/nimbleml-base:bookworm}
image=${NIMBLEML_IMAGE:-localhost/nimbleml-serve:0.1.0}
pip=${PIP:-pip}

if [[ -n ${NIMBLEML_REBUILD_BASE:-} ]] || ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    deploy/container/build-base.sh "$base"
fi

args=(--build-arg "BASE=$base")
mounts=()
local_dir() {  # a folder or file:// URL on this machine -> its path; anything else -> nothing
    local path=${1#file://}
    path=${path%/simple}
    [[ $path == /* && -d $path ]] && echo "$path"
}
find_links=${PIP_FIND_LINKS:-$("$pip" config get global.find-links 2>/dev/null || true)}
extra_index=${PIP_EXTRA_INDEX_URL:-$("$pip" config get global.extra-index-url 2>/dev/null || true)}
cert=${PIP_CERT:-$("$pip" config get global.cert 2>/dev/null || true)}
local_links=() local_indexes=()
for entry in $find_links; do
    if dir=$(local_dir "$entry"); then local_links+=("$dir"); mounts+=(-v "$dir:$dir:ro"); fi
done
for entry in $extra_index; do
    if dir=$(local_dir "$entry"); then local_indexes+=("$entry"); mounts+=(-v "$dir:$dir:ro"); fi
done
if ((${#local_links[@]})); then
    args+=(--build-arg "PIP_FIND_LINKS=${local_links[*]}")
    if compgen -G "${local_links[0]}/torch-2.13.0+cpu-*.whl" >/dev/null; then
        args+=(--build-arg "TORCH_INDEX_URL=https://pypi.org/simple")  # torch's own dependencies
    fi
fi
((${#local_indexes[@]})) && args+=(--build-arg "PIP_EXTRA_INDEX_URL=${local_indexes[*]}")
if [[ -n $cert && -f $cert ]]; then  # e.g. a TLS-inspecting proxy's CA that the base lacks
    mounts+=(-v "$cert:/run/nimbleml-build/ca.crt:ro")
    args+=(--build-arg "PIP_CERT=/run/nimbleml-build/ca.crt")
fi

# --format docker: the OCI image format has no HEALTHCHECK.
buildah bud --isolation chroot --format docker --layers --pull=never \
    "${args[@]}" "${mounts[@]}" \
    -f deploy/container/Containerfile -t "$image" .
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$image"
