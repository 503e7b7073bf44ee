#!/usr/bin/env bash
# The main job: installs Mesa's software Vulkan/GL drivers if (and only if)
# wgpu finds no adapter, then runs the layer on this machine's adapter.
# Extra arguments go to the CLI, e.g. `scripts/run.sh adapters`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/wgpu-batchnorm-xdg-$(id -u)"
  mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
scripts/ensure-driver.sh --release
cargo run -q --release -- "$@"
