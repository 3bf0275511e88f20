#!/usr/bin/env bash
# Memory and time per step on CPU for the documented out-of-memory case: trainable torchvision
# ResNet34 at 224 px, 5-way 5-shot 16-query (105 images), VIC λ_V 0.5 λ_C 0.1, fp32 — with
# micro-steps (1, 4) and activation checkpointing. Each setting trains 2 optimizer steps with
# --memory-report; step 2 is reported (its AdamW state exists). Writes
# bench/results/memory_<date>.md.
#
# Knobs: BACKBONE (TvResNet34), SIZE (224), SETTINGS (space-separated "M:ckpt[:novic]" items;
#        novic sets λ_V = λ_C = 0, to measure what the VIC terms add),
#        TAG (suffix of the result file name),
#        FSCT (the binary; default target/release/fsct-dist, built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

backbone=${BACKBONE:-TvResNet34}
size=${SIZE:-224}
settings=${SETTINGS:-"1:off 4:off 4:on"}
bin=${FSCT:-target/release/fsct-dist}
[ -x "$bin" ] || cargo build --release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" data synth --out "$work/ds" --classes 6,5,5 --images-per-class 21 --size 96 >/dev/null

rows=()
for s in $settings; do
  IFS=: read -r m ckpt vic <<<"$s"
  vic=${vic:-vic}
  flags=(--gradient-accumulation-steps "$m")
  if [ "$vic" = novic ]; then flags+=(--lambda-v 0 --lambda-c 0); else flags+=(--lambda-v 0.5 --lambda-c 0.1); fi
  [ "$ckpt" = on ] && flags+=(--checkpoint-activations)
  common=(--dataset "$work/ds" --backbone "$backbone" --image-size "$size" --n-way 5 --k-shot 5
          --n-query 16 --max-steps 2 --epochs 1 --episodes-per-epoch 2
          --val-episodes 1 --test-iter 1 --workers 2 --pretrained none "${flags[@]}")
  # Whole-process peak: a run without --memory-report (its per-phase peak resets would hide
  # the process maximum from getrusage).
  /usr/bin/time -f '%M' -o "$work/maxrss" "$bin" train "${common[@]}" --output "$work/plain-$m-$ckpt-$vic" >/dev/null 2>"$work/log" \
    || { cat "$work/log" >&2; exit 1; }
  out="$work/run-$m-$ckpt-$vic"
  "$bin" train "${common[@]}" --memory-report --output "$out" >/dev/null 2>"$work/log" || { cat "$work/log" >&2; exit 1; }
  row=$(python3 - "$out/memory.json" "$(cat "$work/maxrss")" "$m" "$ckpt" "$vic" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
mib = lambda b: b / 2**20
secs = sum(p["seconds"] for p in m["phases"])
print(f"| {sys.argv[3]} | {sys.argv[4]} | {sys.argv[5]} | {mib(m['step_bytes']):.0f} | {mib(m['peak_bytes']):.0f} | "
      f"{mib(m['held_bytes']):.0f} | {int(sys.argv[2]) / 1024:.0f} | {secs:.1f} |")
PY
)
  echo "$row"
  rows+=("$row")
done

date=$(date +%Y%m%d)
file=bench/results/memory_${date}${TAG:+_$TAG}.md
{
  echo "# Step memory on CPU: $backbone, ${size} px, 5-way 5-shot 16-query, fp32 (VIC: λ_V 0.5 λ_C 0.1)"
  echo
  echo "Command: \`bash bench/memory.sh\` (SETTINGS=\"$settings\"). Date: $(date -u +%Y-%m-%d)."
  echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB."
  echo "Reported: step 2 of 2 (--memory-report); step MiB = peak − held (the working memory of a step);"
  echo "process peak = whole-process max RSS of the same run without --memory-report (/usr/bin/time; includes weights,"
  echo "gradients, AdamW state and the evaluation episodes); s/step = the reported step's duration."
  echo
  echo "| micro-steps | checkpointing | VIC | step MiB | peak MiB | held MiB | process peak MiB | s/step |"
  echo "|---:|---|---|---:|---:|---:|---:|---:|"
  printf '%s\n' "${rows[@]}"
} > "$file"
echo "written to $file"
