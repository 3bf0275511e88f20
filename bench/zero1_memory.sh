#!/usr/bin/env bash
# --memory-report of a small CPU case (TvResNet18, random weights, 32 px, 3-way 2-shot
# 3-query, 3 AdamW steps) at W = 1, 2, 4, --shard-optimizer off and on: rank 0's report lists
# every rank's held memory and, of it, the optimizer state. Run from the repository root after
# `cargo build`; FSCT names the binary (default target/debug/fsct-dist).
set -euo pipefail
FSCT=${FSCT:-$PWD/target/debug/fsct-dist}
work=$(mktemp -d)
"$FSCT" data synth --classes 6,5,5 --images-per-class 12 --size 40 --out "$work/ds" >/dev/null
args=(train --dataset "$work/ds" --backbone TvResNet18 --pretrained none --image-size 32
  --n-way 3 --k-shot 2 --n-query 3 --epochs 1 --episodes-per-epoch 4 --val-episodes 2
  --test-iter 2 --workers 1 --threads 1 --max-steps 3 --memory-report)
echo "W=1: $("$FSCT" "${args[@]}" --output "$work/w1" 2>&1 | grep -o 'held per rank.*')"
for w in 2 4; do
  for z in off on; do
    line=$(FSCT=$FSCT OMP_NUM_THREADS=1 bash launch/mpirun.sh -n "$w" "${args[@]}" \
      --shard-optimizer "$z" --output "$work/w$w$z" 2>&1 | grep -o 'held per rank.*')
    echo "W=$w shard-optimizer $z: $line"
  done
done
rm -rf "$work"
