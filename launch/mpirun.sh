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
# - stopping: SIGTERM, SIGINT or SIGUSR1 to this script reaches the ranks as SIGUSR1, which
#   mpirun forwards without ending the job, so the ranks take as long as they need: they finish
#   the step, rank 0 writes a checkpoint, they exit 3, and 3 is this script's exit code. (A
#   SIGTERM to mpirun itself makes it SIGKILL the ranks `odls_base_sigkill_timeout` = 1 s later
#   and exit 1. FSCT_GRACE=N raises that timeout, but OpenMPI then also sleeps about 2N s
#   whenever a job ends abnormally, a rank exiting 3 included: 10 s for N = 5, measured.)
# Knobs: FSCT (binary; default target/release/fsct-dist, else fsct-dist on PATH),
#        MPIRUN (default mpirun), MPIRUN_ARGS (extra mpirun arguments, e.g. a hostfile),
#        FSCT_GRACE (seconds, above).
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
  if [ -n "${FSCT_GRACE:-}" ]; then args+=(--mca odls_base_sigkill_timeout "$FSCT_GRACE"); fi
fi
# shellcheck disable=SC2086
"$mpirun" "${args[@]}" ${MPIRUN_ARGS:-} "$bin" "$@" <&0 &
pid=$!
trap 'kill -USR1 "$pid" 2>/dev/null || true' TERM INT USR1
# `wait` returns early when a trapped signal arrives: wait again until mpirun has ended.
while :; do
  rc=0
  wait "$pid" || rc=$?
  kill -0 "$pid" 2>/dev/null || break
done
exit "$rc"
