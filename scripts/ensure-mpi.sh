#!/usr/bin/env bash
# Makes sure MPI is there for the `mpi` feature and its tests: MPICH's
# mpiexec and headers (the mpi crate builds against them) and libclang
# (its bindgen needs it). Installs the Debian/Ubuntu packages only when one
# is missing, as root; otherwise says what to install and fails.
set -euo pipefail

have_mpi() {
  command -v mpiexec >/dev/null && command -v mpicc >/dev/null &&
    { ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' || ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; }
}

if have_mpi; then
  exit 0
fi

packages="mpich libmpich-dev libclang-dev pkgconf"
. "$(dirname "$0")/apt-install.sh"
apt_install ensure-mpi "the mpi feature needs MPICH (mpiexec, mpicc) and libclang (or Open MPI and libclang elsewhere)" $packages

if ! have_mpi; then
  echo "ensure-mpi: still no mpiexec, mpicc or libclang after installing $packages" >&2
  exit 1
fi
