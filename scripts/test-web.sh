#!/usr/bin/env bash
# The browser test suite (web/tests/browser.rs): the library built for
# wasm32 and run by wasm-bindgen-test in headless Chromium, on WebGPU (the
# browser's SwiftShader adapter on a machine without a GPU). Installs what
# is missing: the wasm32 target, the wasm-bindgen CLI of the version in
# Cargo.lock (a plain `cargo install`: `--locked` fails against this
# registry's index), and Debian's chromium and chromium-driver as root.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
if [ "$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{ print $2 }')" != "$version" ]; then
  echo "test-web: installing wasm-bindgen-cli $version (a couple of minutes)" >&2
  cargo install -q wasm-bindgen-cli --version "$version"
fi
packages=()
command -v chromium >/dev/null || packages+=(chromium)
command -v chromedriver >/dev/null || packages+=(chromium-driver)
if [ ${#packages[@]} -gt 0 ]; then
  . scripts/apt-install.sh
  apt_install test-web "the browser tests need Chromium and its WebDriver" "${packages[@]}"
fi

export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
export CHROMEDRIVER="${CHROMEDRIVER:-$(command -v chromedriver)}"
# SwiftShader compiles pipelines slowly: minutes, not the default 20 s
export WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-1200}"
# web/webdriver.json gives Chromium its flags (WebGPU, headless, no sandbox)
cd web
cargo test -p wgpu-batchnorm-web --target wasm32-unknown-unknown --test browser "$@"
