#!/usr/bin/env bash
# Set-up for fsct-dist on a Debian machine: system packages, libtorch from the PyPI wheel in a
# project venv, and the cargo configuration that lets a plain `cargo build` / `cargo test` work.
# Idempotent: every step checks first, so a second run takes a second or two.
#
# Knobs (environment):
#   FSCT_TORCH=cpu|full   which wheel set to install (default: full when nvidia-smi sees a GPU,
#                         otherwise the CPU-minimal set of ~540 MB)
#   FSCT_VENV=DIR         where the venv lives (default: <repo>/.venv)
#   FSCT_SKIP_APT=1       do not touch system packages (when they are managed elsewhere)
#   FSCT_LINK_VENV=0      leave <repo>/.venv as it is (a second venv, e.g. bench/build_gpu_binary.sh's)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FSCT_VENV:-$repo/.venv}
torch_version=2.11.0
# Pinned by torch 2.11.0's metadata (through cuda-toolkit 13.0.2): libtorch_cpu links against them.
cpu_extras=(nvidia-cuda-runtime==13.0.96.* nvidia-cuda-cupti==13.0.85.*)

say() { printf 'setup: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# 1. System packages: OpenMPI (rsmpi), libclang (bindgen needs stddef.h from it) and
#    libjpeg-turbo's TurboJPEG library (JPEG decoding, found with pkg-config).
apt_packages=(libopenmpi-dev openmpi-bin libclang1-14 libclang-common-14-dev pkg-config g++ python3-venv libturbojpeg0-dev)
if [ "${FSCT_SKIP_APT:-0}" != 1 ] && command -v dpkg-query >/dev/null; then
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  # python3-venv is only needed when the machine's python3 lacks the venv module.
  if python3 -c 'import venv, ensurepip' 2>/dev/null; then
    missing=("${missing[@]/python3-venv/}")
  fi
  missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# 2. libtorch from the torch wheel, in a venv inside the repo.
mode=${FSCT_TORCH:-}
if [ -z "$mode" ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then mode=full; else mode=cpu; fi
fi
[ -x "$venv/bin/python" ] || { say "creating venv $venv"; python3 -m venv "$venv"; }
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stamp="$venv/.fsct-torch-$torch_version-$mode"
if [ ! -f "$stamp" ]; then
  say "installing torch $torch_version ($mode) into $venv (a few minutes on first run)"
  if [ "$mode" = full ]; then
    "$venv/bin/pip" install -q "torch==$torch_version"
  else
    "$venv/bin/pip" install -q --no-deps "torch==$torch_version" "${cpu_extras[@]}"
  fi
  touch "$stamp"
fi
[ -f "$site/torch/lib/libtorch_cpu.so" ] || { say "libtorch not found under $site/torch"; exit 1; }

# 3. A stable path for the build: .cargo/config.toml points LIBTORCH at .venv/libtorch.
ln -sfn "$site/torch" "$venv/libtorch"
if [ "$venv" != "$repo/.venv" ] && [ "${FSCT_LINK_VENV:-1}" != 0 ]; then ln -sfn "$venv" "$repo/.venv"; fi
say "ready: libtorch $torch_version ($mode) at $venv/libtorch"
