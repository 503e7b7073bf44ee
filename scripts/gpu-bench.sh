#!/usr/bin/env bash
# Benchmarks both kernel families on a machine with a GPU driver and keeps
# everything in OUTDIR: the adapters, a tuning run (its cache in
# OUTDIR/cache), bench JSON and SVG per family and for tuned auto, and
# conform on the Keras fixtures with each family.
#
# usage: scripts/gpu-bench.sh OUTDIR [BENCH FLAGS, e.g. --quick]
# The binary is $WGPU_BATCHNORM_BIN (default target/release/wgpu-batchnorm;
# build it with `cargo build --release`). Every step runs; the exit status
# is 1 if any failed. Each step's output is OUTDIR/<step>.txt.
set -u

if [ $# -lt 1 ] || [ -z "$1" ]; then
  echo "usage: $0 OUTDIR [BENCH FLAGS]" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$1/cache" || exit 2
out="$(cd "$1" && pwd)"
shift
bin="${WGPU_BATCHNORM_BIN:-$root/target/release/wgpu-batchnorm}"
if [ ! -x "$bin" ]; then
  echo "$0: no binary at $bin (cargo build --release, or set WGPU_BATCHNORM_BIN)" >&2
  exit 2
fi
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/wgpu-batchnorm-xdg-$(id -u)"
  mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
export WGPU_BATCHNORM_CACHE_DIR="$out/cache"
unset WGPU_BATCHNORM_KERNELS
fixtures="$root/tests/fixtures/keras"
failed=0

# step NAME ARGS...: runs the binary with ARGS, output in OUTDIR/NAME.txt
step() {
  name=$1
  shift
  start=$(date +%s)
  if "$bin" "$@" >"$out/$name.txt" 2>&1; then
    status=ok
  else
    status="FAILED (exit $?)"
    failed=$((failed + 1))
  fi
  echo "$name: $status in $(($(date +%s) - start)) s ($bin $*)"
}

step adapters adapters
step tune bench --tune "$@"
for k in serial coalesced; do
  step "bench-$k" bench --kernels "$k" --json "$out/bench-$k.json" --svg "$out/bench-$k.svg" "$@"
done
step bench-auto bench --json "$out/bench-auto.json" --svg "$out/bench-auto.svg" "$@"
for k in serial coalesced auto; do
  step "conform-$k" conform --kernels "$k" "$fixtures"
done

echo "results in $out; $failed step(s) failed"
[ "$failed" -eq 0 ]
