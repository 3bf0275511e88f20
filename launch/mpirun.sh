#!/usr/bin/env bash
# mpirun with sane defaults for fsct-dist.
#
#   launch/mpirun.sh -n 4 train --config configs/quickstart.toml
#
# The first argument pair is the rank count (-n N, default 2); the rest goes to fsct-dist.
# - root (containers, CI): OpenMPI refuses root unless told; allowed here.
# - more ranks than cores: OpenMPI refuses unless told; oversubscription allowed, and ranks are
#   not pinned to cores (pinning two ranks to one core would serialise them).
# - threads: each rank gets cores / N intra-op threads (OMP_NUM_THREADS) unless already set, so
#   N ranks do not fight over the same cores.
# Knobs: FSCT (binary; default target/release/fsct-dist, else fsct-dist on PATH),
#        MPIRUN (default mpirun), MPIRUN_ARGS (extra mpirun arguments, e.g. a hostfile).
set -euo pipefail

n=2
if [ "${1:-}" = "-n" ] || [ "${1:-}" = "-np" ]; then
  n=$2
  shift 2
fi
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${FSCT:-$here/target/release/fsct-dist}
if [ ! -x "$bin" ]; then
  bin=$(command -v fsct-dist || true)
  [ -n "$bin" ] || { echo "fsct-dist not found: run 'cargo build --release' or set FSCT=/path/to/fsct-dist" >&2; exit 2; }
fi
mpirun=${MPIRUN:-mpirun}
command -v "$mpirun" >/dev/null || { echo "$mpirun not found: install OpenMPI (launch/setup.sh does) or set MPIRUN" >&2; exit 2; }

args=(-n "$n")
if "$mpirun" --version 2>/dev/null | grep -qi "open mpi"; then
  [ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
  cores=$(nproc)
  if [ "$n" -gt "$cores" ]; then
    args+=(--oversubscribe --bind-to none)
  else
    args+=(--bind-to none)
  fi
  threads=$(( cores / n ))
  [ "$threads" -ge 1 ] || threads=1
  args+=(-x "OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}")
fi
# shellcheck disable=SC2086
exec "$mpirun" "${args[@]}" ${MPIRUN_ARGS:-} "$bin" "$@"
