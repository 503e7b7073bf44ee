#!/usr/bin/env bash
# The test command: installs Mesa's software Vulkan/GL drivers if (and only
# if) wgpu finds no adapter, and MPICH with libclang if missing (the MPI
# tests run the `mpi` feature's example under mpiexec), then runs every
# test with `--features mpi` once per kernel family
# (WGPU_BATCHNORM_KERNELS=serial, then coalesced); with
# WGPU_BATCHNORM_KERNELS set, once with that choice.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/wgpu-batchnorm-xdg-$(id -u)"
  mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
scripts/ensure-mpi.sh
scripts/ensure-driver.sh --features mpi
# the tests never read the user's tuning cache (cli/tests/cli.rs makes its own)
if [ -z "${WGPU_BATCHNORM_CACHE_DIR:-}" ]; then
  export WGPU_BATCHNORM_CACHE_DIR="$(mktemp -d)"
  trap 'rm -rf "$WGPU_BATCHNORM_CACHE_DIR"' EXIT
fi
if [ -n "${WGPU_BATCHNORM_KERNELS:-}" ]; then
  cargo test --features mpi "$@"
else
  for kernels in serial coalesced; do
    echo "== every test with WGPU_BATCHNORM_KERNELS=$kernels"
    WGPU_BATCHNORM_KERNELS=$kernels cargo test --features mpi "$@"
  done
fi
