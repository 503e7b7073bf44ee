#!/usr/bin/env bash
# Builds the conformance and benchmark page (web/) and serves it on
# 127.0.0.1, printing the address. Open it in a browser with WebGPU
# (Chrome or Edge 113+, Safari 26, Firefox 141+ on Windows and 145+ on
# Apple-silicon Macs; Linux and the rest in the README).
#
# usage: scripts/web.sh [--build-only] [PORT]   (default port 8080)
# Installs what is missing as scripts/test-web.sh does (the wasm32 target,
# the wasm-bindgen CLI of Cargo.lock's version).
set -euo pipefail
cd "$(dirname "$0")/.."
build_only=0
if [ "${1:-}" = --build-only ]; then build_only=1; shift; fi
port="${1:-8080}"

rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }')" != "$version" ]; then
  echo "web: installing wasm-bindgen-cli $version (a couple of minutes)" >&2
  cargo install -q wasm-bindgen-cli --version "$version"
fi
cargo build -q --release -p wgpu-batchnorm-web --target wasm32-unknown-unknown
wasm-bindgen --target web --no-typescript --out-dir web/pkg \
  target/wasm32-unknown-unknown/release/wgpu_batchnorm_web.wasm
[ "$build_only" = 1 ] && exit 0
echo "web: serving http://127.0.0.1:$port/ (Ctrl-C stops)"
exec python3 -m http.server "$port" --bind 127.0.0.1 --directory web
