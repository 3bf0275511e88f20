#!/usr/bin/env bash
# GPU check for fsct-dist on a lent GPU machine (one GPU, torch 2.11+cu130 for python3, no Rust
# toolchain, maybe no libmpi, no network). Done in under 7 minutes: every step runs under
# `timeout`, capped by what is left of BUDGET.
#
# Prepare (build machine, repo root; a GPU is not needed there):
#   bench/build_gpu_binary.sh   # release build against the full CUDA wheel set -> ./fsct-dist-gpu
#   (a plain `cargo build` on a machine without a GPU links the CPU wheel set: no CUDA anywhere)
#   # only if the GPU machine lacks OpenMPI or libturbojpeg: carry them and their dependencies
#   mkdir -p .gpu-libs && ldd fsct-dist-gpu | grep -E 'mpi|open-pal|open-rte|hwloc|event|pmix|turbojpeg' \
#     | awk '{print $3}' | xargs -I{} cp {} .gpu-libs/
# Run (GPU machine, repo root):
#   bench/gpu_check.sh                  # or FSCT=/path/to/fsct-dist bench/gpu_check.sh
#   OUT=/dir bench/gpu_check.sh         # also copies this run's result files into /dir
#
# Steps: library path (torch/lib, nvidia/*/lib, .gpu-libs) and `ldd` check; a tiny synthetic
# dataset; the memory sweep of the documented case (TvResNet34, 224 px, 5-way 5-shot 16-query,
# VIC 0.5/0.1; amp off/fp16/bf16 × micro-steps 1/4) with episodes/s per row; two 1-epoch Conv4
# runs over NCCL in a world of one (fixed, then dynamic micro-steps + --memory-report); the
# overlapped NCCL all-reduce on its side stream beside matmuls (sums checked, share hidden); the
# documented case in fp16 through `bench step` beside PyTorch eager + autocast + GradScaler (the
# seed fork's way, bench/train_step_pytorch.py) on the same GPU, episodes/s of each.
# Writes bench/results/gpu_check_<date>.log, gpu_memory_<date>.md/.json, gpu_check_<date>_memory.json,
# gpu_allreduce_overlap_<date>.md/.json.
# Knobs: FSCT, BUDGET (s, whole script; 390), SWEEP_S (150), TRAIN_S (40), VS_S (70), WORK.
set -uo pipefail   # no -e: a failed or timed-out step is reported and the next one still runs

cd "$(dirname "$0")/.." || exit 2
start=$(date +%s)
budget=${BUDGET:-390}
vs_s=${VS_S:-70}
sweep_s=${SWEEP_S:-150}
train_s=${TRAIN_S:-40}
day=$(date -u +%Y%m%d)
results=bench/results
mkdir -p "$results" || exit 2
log=$results/gpu_check_$day.log
if [ -z "${WORK:-}" ]; then
  WORK=$(mktemp -d) || exit 2
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK" && touch "$WORK/.stamp"

if [ -z "${FSCT:-}" ]; then
  if [ -e ./fsct-dist-gpu ]; then FSCT=./fsct-dist-gpu; else FSCT=target/release/fsct-dist; fi
fi
if [ -f "$FSCT" ]; then
  [ -x "$FSCT" ] || chmod +x "$FSCT"
  FSCT=$(cd "$(dirname "$FSCT")" && pwd)/$(basename "$FSCT")
fi

# step NAME SECONDS CMD...: runs CMD under timeout (SECONDS, or less if the budget is short).
step() {
  local name=$1 want=$2 left t t0 rc
  shift 2
  left=$(( start + budget - $(date +%s) - 12 ))   # 12 s: timeout's kill grace + the tail
  if [ "$left" -lt 5 ]; then
    echo "== $name: SKIPPED (time budget spent)"; fails=$((fails + 1)); return 124
  fi
  t=$(( want < left ? want : left ))
  echo "== $name (timeout ${t} s): $*"
  t0=$(date +%s)
  timeout -k 5 "$t" "$@"; rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')"
  [ "$rc" = 0 ] || fails=$((fails + 1))
  return "$rc"
}

main() {
  fails=0
  echo "# fsct-dist GPU check, $(date -u '+%Y-%m-%d %H:%M:%S') UTC, $(hostname), binary $FSCT"
  [ -x "$FSCT" ] || { echo "ERROR: $FSCT not found: build it (see the header) or set FSCT"; return 2; }

  # 1. Libraries: torch's, the nvidia wheels' (CUDA runtime, cuDNN, NCCL, ...), carried ones.
  local info torch_dir d libs=()
  info=$(timeout 60 python3 -c 'import torch,os;print(os.path.dirname(torch.__file__));print("torch",torch.__version__,"cuda",torch.version.cuda,"available",torch.cuda.is_available())')
  torch_dir=$(printf '%s\n' "$info" | sed -n 1p)
  printf '%s\n' "$info" | sed -n 2p
  if [ -n "$torch_dir" ] && [ -d "$torch_dir/lib" ]; then
    libs+=("$torch_dir/lib")
    for d in "$(dirname "$torch_dir")"/nvidia/*/lib; do [ -d "$d" ] && libs+=("$d"); done
  else
    echo "WARN: python3 cannot import torch; libtorch may not be found"
  fi
  [ -d "$PWD/.gpu-libs" ] && libs+=("$PWD/.gpu-libs")
  if [ "${#libs[@]}" -gt 0 ]; then
    LD_LIBRARY_PATH=$(IFS=:; echo "${libs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export LD_LIBRARY_PATH
  fi
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  timeout 15 nvidia-smi -L || echo "WARN: nvidia-smi -L failed"
  if timeout 15 ldd "$FSCT" | grep "not found"; then
    echo "WARN: libraries above are missing (MPI ones: carry them in .gpu-libs, see the header)"
  fi
  timeout 15 ldd "$FSCT" | grep -q torch_cuda || echo "WARN: $FSCT does not link libtorch_cuda: CUDA is unavailable (build it with bench/build_gpu_binary.sh)"
  timeout 15 "$FSCT" --version

  # 2. A tiny dataset (6/5/5 classes, 21 images each: exactly 5 support + 16 query).
  step "dataset" 30 "$FSCT" data synth --out "$WORK/ds" --classes 6,5,5 --images-per-class 21 --size 96

  # 3. Memory sweep of the documented case. episodes/s = 1 / (s / episode).
  local md=$results/gpu_memory_$day.md
  step "memory sweep" "$sweep_s" "$FSCT" bench memory --dataset "$WORK/ds" --device cuda \
    --backbone TvResNet34 --image-size 224 --n-way 5 --k-shot 5 --n-query 16 \
    --lambda-v 0.5 --lambda-c 0.1 --workers 4 --sweep-amp off,fp16,bf16 --sweep-micro 1,4 \
    --sweep-ckpt off --steps 3 --out "$md"
  local src=$md
  [ -f "$md" ] || src=$log   # timed out or failed: the rows printed so far are in the log
  echo "episodes/s per setting (from $src):"
  awk -F'|' 'NF >= 9 && $2 ~ /^ *(off|fp16|bf16) *$/ && !seen[$2 $3 $4]++ {
      for (i = 2; i <= 8; i++) gsub(/^ +| +$/, "", $i);
      eps = ($8 + 0 > 0) ? sprintf("%.1f", 1 / $8) : "n/a";
      printf "  amp %s, micro %s, ckpt %s: step %s, peak %s, held %s MiB; %s s/episode, %s episodes/s\n",
             $2, $3, $4, $5, $6, $7, $8, eps }' "$src"

  # 4. NCCL in a world of one (no mpirun): a real communicator with one rank.
  local common=(--dataset "$WORK/ds" --device cuda --comm nccl --backbone Conv4 --image-size 84
                --n-way 5 --k-shot 5 --n-query 16 --epochs 1 --episodes-per-epoch 5
                --val-episodes 5 --test-iter 10 --workers 4)
  step "train nccl" "$train_s" "$FSCT" train "${common[@]}" --output "$WORK/nccl-run"
  step "train nccl dynamic" "$train_s" "$FSCT" train "${common[@]}" \
    --gradient-accumulation-steps dynamic --empty-cache-every 1 --memory-report \
    --output "$WORK/nccl-run-dynamic"
  for d in "$WORK/nccl-run-dynamic" "$WORK/nccl-run"; do
    if [ -f "$d/memory.json" ]; then
      cp "$d/memory.json" "$results/gpu_check_${day}_memory.json" && cat "$d/memory.json"; echo
      break
    fi
  done

  # 4b. The overlapped NCCL all-reduce (train --overlap's path: a side stream ordered by events)
  # beside matmuls on the compute stream: fails on a wrong sum, reports the share hidden.
  step "allreduce overlap nccl" 30 "$FSCT" bench allreduce --device cuda --comm nccl --overlap \
    --min-bytes 1048576 --max-bytes 268435456 --iters 5 --out "$results/gpu_allreduce_overlap_$day.md"

  # 5. The documented case in fp16: fsct-dist's step beside PyTorch eager + autocast/GradScaler.
  step "bench step fp16" "$vs_s" "$FSCT" bench step --dataset "$WORK/ds" --device cuda \
    --backbone TvResNet34 --pretrained none --image-size 224 --n-way 5 --k-shot 5 --n-query 16 \
    --amp fp16 --workers 4 --warmup 2 --steps 5 --json "$WORK/ours.json"
  step "pytorch step fp16" "$vs_s" sh -c "python3 bench/train_step_pytorch.py TvResNet34 224 5 5 16 5 4 cuda fp16 > '$WORK/pytorch.json'"
  python3 - "$WORK/ours.json" "$WORK/pytorch.json" <<'PY' || fails=$((fails + 1))
import json, statistics, sys
ours = json.load(open(sys.argv[1]))
t_ours = statistics.median(sum(p["seconds"] for p in s["phases"]) for s in ours["steps"])
t_py = statistics.median(json.load(open(sys.argv[2]))["step_s"])
print(f"documented case, fp16, one GPU: fsct-dist {1 / t_ours:.2f} episodes/s, PyTorch eager + "
      f"autocast/GradScaler {1 / t_py:.2f} episodes/s, ratio {t_py / t_ours:.2f}")
PY

  echo "# done in $(( $(date +%s) - start )) s; failed or timed-out steps: $fails"
  [ "$fails" = 0 ]
}

main 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && find "$results" -maxdepth 1 -type f -newer "$WORK/.stamp" -exec cp {} "$OUT"/ \;
fi
exit "$rc"
