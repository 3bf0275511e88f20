#!/usr/bin/env bash
# --memory-report at W = 1, 2, 4, --shard-optimizer off and on: rank 0's report lists every
# rank's held memory and, of it, the optimizer state. Two cases (CASE=small, the default, or
# CASE=resnet34):
# - small: TvResNet18, random weights, 32 px, 3-way 2-shot 3-query, 3 AdamW steps;
# - resnet34: the documented case's network, ResNet34 FS-CT at 224 px (74 M parameters: the
#   head's input is 512·7·7), random weights, with 5-way 1-shot 1-query episodes (10 images)
#   so that 4 ranks fit on a small CPU machine; 2 AdamW steps. The optimizer state does not
#   depend on the episode.
# Run from the repository root after `cargo build`; FSCT names the binary (default
# target/debug/fsct-dist).
set -euo pipefail
FSCT=${FSCT:-$PWD/target/debug/fsct-dist}
work=$(mktemp -d)
common=(--epochs 1 --episodes-per-epoch 4 --val-episodes 2 --test-iter 2 --workers 1 --threads 1
  --pretrained none --memory-report)
case ${CASE:-small} in
  small)
    "$FSCT" data synth --classes 6,5,5 --images-per-class 12 --size 40 --out "$work/ds" >/dev/null
    args=(train --dataset "$work/ds" --backbone TvResNet18 --image-size 32 --n-way 3 --k-shot 2
      --n-query 3 --max-steps 3 "${common[@]}") ;;
  resnet34)
    "$FSCT" data synth --classes 8,5,5 --images-per-class 4 --size 240 --out "$work/ds" >/dev/null
    args=(train --dataset "$work/ds" --backbone ResNet34 --image-size 224 --n-way 5 --k-shot 1
      --n-query 1 --max-steps 2 "${common[@]}") ;;
  *) echo "CASE is small or resnet34" >&2; exit 2 ;;
esac
echo "W=1: $("$FSCT" "${args[@]}" --output "$work/w1" 2>&1 | grep -o 'held per rank.*')"
for w in 2 4; do
  for z in off on; do
    line=$(FSCT=$FSCT OMP_NUM_THREADS=1 bash launch/mpirun.sh -n "$w" "${args[@]}" \
      --shard-optimizer "$z" --output "$work/w$w$z" 2>&1 | grep -o 'held per rank.*')
    echo "W=$w shard-optimizer $z: $line"
  done
done
rm -rf "$work"
