#!/usr/bin/env bash
# Makes `nvcc` available so the `cuda` feature can be compiled (CI has no GPU; it only compiles).
# Debian ships the CUDA 11.8 toolkit as `nvidia-cuda-toolkit` in the `non-free` component (its driver
# library dependency needs `nvidia-support` from `contrib`), which a stock bookworm image does not
# enable: this adds both components in a sources file of its own (the distribution's file is left as
# it was) and installs the package. Running it twice changes nothing.
set -euo pipefail
if command -v nvcc >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: the cuda build needs the CUDA toolkit (nvcc): install it (Debian: enable the contrib and non-free components, then apt-get install nvidia-cuda-toolkit; or NVIDIA's CUDA >= 11.8)" >&2
    exit 1
fi
list=/etc/apt/sources.list.d/memgen-non-free.sources
# Already installable (the components enabled elsewhere): the sources are left alone.
if [ ! -e "$list" ] && ! apt-cache policy nvidia-cuda-toolkit 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}")
    # Made beside, not inside, sources.list.d: apt never reads a half-written file.
    tmp=$(mktemp /etc/apt/.memgen-sources.XXXXXX)
    cat >"$tmp" <<SOURCES
Types: deb
URIs: http://deb.debian.org/debian
Suites: $codename $codename-updates
Components: contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    chmod 644 "$tmp"
    mv "$tmp" "$list"
fi
echo "installing nvidia-cuda-toolkit for the cuda build" >&2
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit >/dev/null
command -v nvcc >/dev/null 2>&1 || { echo "error: nvidia-cuda-toolkit installed but nvcc is not on PATH" >&2; exit 1; }
