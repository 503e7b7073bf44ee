#!/usr/bin/env bash
# The test command. Installs what the tests need when it is missing: Mesa's
# software Vulkan/GL drivers if wgpu finds no adapter, MPICH with libclang
# (the MPI tests run the `mpi` feature's example under mpiexec), and the
# other implementations the portability checks and GPU tests run on (Dawn
# for Node.js, SwiftShader's Vulkan driver from Debian's chromium package,
# spirv-val). SwiftShader is made visible beside the machine's own Vulkan
# drivers (VK_ADD_DRIVER_FILES): the GPU-vs-reference tests run on each
# Vulkan driver, and most on GL too (those needing what GL lacks, such as
# float16 storage, on Vulkan only).
#
# Then every test runs with `--features mpi` once per kernel family
# (WGPU_BATCHNORM_KERNELS=serial, then coalesced; with
# WGPU_BATCHNORM_KERNELS set, once with that choice). The portability
# checks (src/kernels/portability.rs) do not depend on the family: they
# run in the first pass only. Then the browser: the library built for
# wasm32 and its test suite in headless Chromium (scripts/test-web.sh), and
# the page's end-to-end test (scripts/test-page.sh). Extra arguments go to
# one `cargo test` run (the kernel choice as WGPU_BATCHNORM_KERNELS says,
# else auto) and skip the browser.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/wgpu-batchnorm-xdg-$(id -u)"
  mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
scripts/ensure-mpi.sh
scripts/ensure-driver.sh --features mpi
scripts/ensure-portability.sh
icd="${WGPU_BATCHNORM_SWIFTSHADER_ICD:-/usr/lib/chromium/vk_swiftshader_icd.json}"
export VK_ADD_DRIVER_FILES="${VK_ADD_DRIVER_FILES:+$VK_ADD_DRIVER_FILES:}$icd"
# the tests never read the user's tuning cache (cli/tests/cli.rs makes its own)
if [ -z "${WGPU_BATCHNORM_CACHE_DIR:-}" ]; then
  export WGPU_BATCHNORM_CACHE_DIR="$(mktemp -d)"
  trap 'rm -rf "$WGPU_BATCHNORM_CACHE_DIR"' EXIT
fi
if [ -n "${WGPU_BATCHNORM_KERNELS:-}" ] || [ $# -gt 0 ]; then
  cargo test --features mpi "$@"
else
  first=1
  for kernels in serial coalesced; do
    echo "== every test with WGPU_BATCHNORM_KERNELS=$kernels"
    if [ $first = 1 ]; then
      WGPU_BATCHNORM_KERNELS=$kernels cargo test --features mpi
      first=0
    else
      echo "(the portability checks ran in the first pass)"
      WGPU_BATCHNORM_KERNELS=$kernels cargo test --features mpi -- --skip kernels::portability
    fi
  done
fi
if [ $# -eq 0 ]; then
  echo "== the browser: the test suite and the page"
  scripts/test-web.sh
  scripts/test-page.sh
fi
