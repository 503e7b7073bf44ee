#!/usr/bin/env bash
# Makes sure wgpu finds an adapter, installing Mesa's software drivers
# (lavapipe for Vulkan, llvmpipe for GL) only when it finds none.
#
# usage: scripts/ensure-driver.sh [cargo profile flags, e.g. --release]
# It builds the CLI with those flags and asks it which adapters exist, so a
# machine with a real GPU (or Metal/DX12) gets nothing installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/wgpu-batchnorm-xdg-$(id -u)"
  mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi

cargo build -q "$@" --bin wgpu-batchnorm
bin="target/$( [[ " $* " == *" --release "* ]] && echo release || echo debug )/wgpu-batchnorm"

have_adapters() {
  local listing
  listing="$("$bin" adapters 2>/dev/null)" || return 1
  # the tests exercise a native backend and, on Linux, the GL backend too
  grep -Eq '\((vulkan|metal|dx12)\)$' <<<"$listing" || return 1
  if [ "$(uname -s)" = Linux ]; then grep -q '(gl)$' <<<"$listing" || return 1; fi
  return 0
}

if have_adapters; then
  exit 0
fi

packages="mesa-vulkan-drivers libegl1 libegl-mesa0 libgl1-mesa-dri"
. scripts/apt-install.sh
apt_install ensure-driver "wgpu finds no Vulkan/Metal/DX12 adapter (and, on Linux, no GL one): install a GPU driver, or Mesa's software drivers" $packages

if ! have_adapters; then
  echo "ensure-driver: still no adapter after installing $packages; '$bin adapters' says:" >&2
  "$bin" adapters >&2 || true
  exit 1
fi
