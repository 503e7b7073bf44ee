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
  . scripts/apt-install.sh
  apt_install ensure-portability "missing Node.js and npm, SPIRV-Tools, or chromium (SwiftShader's Vulkan driver at $icd)" "${packages[@]}"
fi

if [ ! -e scripts/tint/node_modules/webgpu/package.json ]; then
  echo "ensure-portability: installing Dawn for Node.js (npm ci in scripts/tint)" >&2
  (cd scripts/tint && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
[ -e "$icd" ] || { echo "ensure-portability: still no SwiftShader driver at $icd" >&2; exit 1; }
