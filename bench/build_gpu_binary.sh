#!/usr/bin/env bash
# Builds the binary that bench/gpu_check.sh runs on a lent GPU machine, on any machine (a GPU is
# not needed): a release build linked against the full CUDA wheel set, stripped to fsct-dist-gpu.
# A plain build on a machine without a GPU links the CPU-minimal set, and that binary sees no CUDA
# even on a GPU machine; this one links libtorch_cuda.so (build.rs does it when cuBLAS is there).
#
# Steps: (1) torch 2.11.0 with its CUDA wheels in a second venv (launch/setup.sh FSCT_TORCH=full,
# about 3 GB of downloads; .venv and the CPU build are left alone); (2) cargo build --release into
# a separate target folder, seeded from target/release when that exists so only torch-sys and
# fsct-dist recompile; (3) checks: `ldd` lists libtorch_cuda.so, `--version` says "CUDA linked:
# yes", and on a machine without a GPU `train --device cuda --dry-run` fails with the
# "no usable CUDA device … use --device cpu" message; (4) strip to fsct-dist-gpu, at most 64 MiB.
#
# Knobs (environment): FSCT_GPU_VENV (<repo>/.venv-torch), FSCT_GPU_TARGET (<repo>/target/gpu),
# FSCT_GPU_BIN (<repo>/fsct-dist-gpu), FSCT_SKIP_APT=1 (passed to setup.sh).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
venv=${FSCT_GPU_VENV:-$repo/.venv-torch}
target=${FSCT_GPU_TARGET:-$repo/target/gpu}
out=${FSCT_GPU_BIN:-$repo/fsct-dist-gpu}
max_bytes=$((64 * 1024 * 1024)) # what a GPU check may carry
say() { printf 'build_gpu_binary: %s\n' "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }
t0=$(date +%s)

# 1. The full wheel set in its own venv; FSCT_LINK_VENV=0 keeps <repo>/.venv on the CPU set.
FSCT_VENV=$venv FSCT_TORCH=full FSCT_LINK_VENV=0 bash launch/setup.sh
lib=$venv/libtorch
site=$(cd -P "$lib/.." && pwd)
ls "$site"/nvidia/*/lib/libcublas.so* >/dev/null 2>&1 \
  || fail "no cuBLAS under $site/nvidia: the full wheel set did not install; rerun, or remove $venv"
say "wheel set: $(du -sh "$site" | cut -f1) installed in $site"
t1=$(date +%s)

# 2. Release build against that libtorch (LIBTORCH from the environment wins over
#    .cargo/config.toml's .venv/libtorch). Seeding the target folder from the CPU release build
#    reuses every compiled dependency that does not depend on libtorch.
if [ ! -d "$target/release" ] && [ -d "$repo/target/release" ]; then
  say "seeding $target from target/release"
  mkdir -p "$target" && cp -a "$repo/target/release" "$target/"
fi
LIBTORCH=$lib LIBTORCH_CXX11_ABI=1 CARGO_TARGET_DIR=$target cargo build --release --bin fsct-dist
bin=$target/release/fsct-dist
t2=$(date +%s)

# 3. Checks.
libs=$(ldd "$bin") || fail "ldd $bin failed"
grep -q 'libtorch_cuda\.so' <<<"$libs" || fail "ldd $bin does not list libtorch_cuda.so"
if grep -q 'not found' <<<"$libs"; then fail "ldd $bin: $(grep 'not found' <<<"$libs" | head -3)"; fi
say "ldd: $(grep -o 'libtorch_cuda\.so => [^ ]*' <<<"$libs")"
version=$("$bin" --version)
say "$version"
case $version in *"CUDA linked: yes)") ;; *) fail "--version does not say CUDA linked: yes" ;; esac
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  say "a GPU is here: skipping the no-GPU message check (run bench/gpu_check.sh instead)"
else
  set +e
  msg=$(cd "${TMPDIR:-/tmp}" && "$bin" train --device cuda --dry-run 2>&1)
  rc=$?
  set -e
  [ "$rc" = 1 ] && grep -q 'usable CUDA device(s); use --device cpu' <<<"$msg" \
    || fail "train --device cuda on a machine without a GPU (exit $rc): $msg"
  say "no GPU here, as expected: $msg"
fi

# 4. Strip and size.
strip -o "$out.tmp" "$bin" && mv "$out.tmp" "$out"
bytes=$(stat -c %s "$out")
t3=$(date +%s)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
say "$(basename "$out"): $(mib "$bytes") ($bytes bytes; unstripped $(mib "$(stat -c %s "$bin")"))"
say "times: wheels $((t1 - t0)) s, build $((t2 - t1)) s, checks+strip $((t3 - t2)) s"
[ "$bytes" -le "$max_bytes" ] || fail "$out is over the 64 MiB a GPU check may carry"
say "ready: carry $(basename "$out") in the repo root; bench/gpu_check.sh there picks it up"
