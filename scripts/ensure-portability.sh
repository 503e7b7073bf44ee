#!/usr/bin/env bash
# Makes sure the portability checks (src/kernels/portability.rs) have what
# they run: Dawn for Node.js (Tint, npm package `webgpu`, pinned in
# scripts/tint/package-lock.json), SwiftShader's Vulkan driver (shipped by
# Debian's chromium package, which the browser tests also use) and
# SPIRV-Tools' spirv-val. Installs what is missing: the Debian packages
# as root (nodejs/npm only where node is absent), the npm package with
# `npm ci`. Otherwise says what to install and fails.
set -euo pipefail
cd "$(dirname "$0")/.."

icd="${WGPU_BATCHNORM_SWIFTSHADER_ICD:-/usr/lib/chromium/vk_swiftshader_icd.json}"
packages=()
command -v node >/dev/null && command -v npm >/dev/null || packages+=(nodejs npm)
command -v spirv-val >/dev/null || packages+=(spirv-tools)
[ -e "$icd" ] || packages+=(chromium)

if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "ensure-portability: installing ${packages[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${packages[@]}" >/dev/null
  else
    echo "ensure-portability: missing ${packages[*]} (Node.js and npm, SPIRV-Tools, chromium for SwiftShader's" >&2
    echo "Vulkan driver at $icd). On Debian/Ubuntu as root: apt-get install -y ${packages[*]}" >&2
    exit 1
  fi
fi

if [ ! -e scripts/tint/node_modules/webgpu/package.json ]; then
  echo "ensure-portability: installing Dawn for Node.js (npm ci in scripts/tint)" >&2
  (cd scripts/tint && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
[ -e "$icd" ] || { echo "ensure-portability: still no SwiftShader driver at $icd" >&2; exit 1; }
