#!/usr/bin/env bash
# What BatchNorm groups cost in accuracy. Micro-steps (--gradient-accumulation-steps N) split
# the episode into N BatchNorm batches, which changes the objective (architecture.md, "The
# training step"). This trains the same settings with N = 1 (the official single batch) and
# N = 4, with the same seeds, and reports test accuracy ± 95% CI per run and the mean over
# seeds. Writes bench/results/bn_groups_<date>.md.
#
# Settings (both Conv4, 84 px, built-in dataset, the quickstart schedule: 3 epochs × 50):
#   quickstart  5-way 5-shot 8-query  (65 images: groups 17,16,16,16)
#   1shot16q    5-way 1-shot 16-query (85 images: groups 22,21,21,21)
# Knobs: SEEDS ("1 2 3"), MICRO ("1 4"), SETTINGS ("quickstart 1shot16q"),
#        FSCT (binary; default target/release/fsct-dist).
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=${SEEDS:-"1 2 3"}
micro=${MICRO:-"1 4"}
settings=${SETTINGS:-"quickstart 1shot16q"}
bin=${FSCT:-target/release/fsct-dist}
[ -x "$bin" ] || cargo build --release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
date=$(date -u +%Y%m%d)
result=bench/results/bn_groups_$date.md
start=$(date -u +%FT%TZ)

flags_for() {
  case "$1" in
    quickstart) echo "--k-shot 5 --n-query 8" ;;
    1shot16q) echo "--k-shot 1 --n-query 16" ;;
    *) echo "unknown setting $1" >&2; exit 2 ;;
  esac
}

rows=()
for s in $settings; do
  for n in $micro; do
    for seed in $seeds; do
      out="$work/$s-$n-$seed"
      # shellcheck disable=SC2046
      "$bin" train --config configs/quickstart.toml $(flags_for "$s") --seed "$seed" \
        --gradient-accumulation-steps "$n" --output "$out" >"$work/log" 2>&1 \
        || { cat "$work/log" >&2; exit 1; }
      row=$(python3 - "$out/summary.json" "$s" "$n" "$seed" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
t = m["test"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {t['mean']:.2f} | {t['ci95']:.2f} | "
      f"{m['best_val']['mean']:.2f} | {m['seconds']:.0f} |")
PY
)
      echo "$row"
      rows+=("$row")
    done
  done
done

summary=$(printf '%s\n' "${rows[@]}" | python3 -c '
import sys, statistics as st
rows = [l.strip("|\n ").split("|") for l in sys.stdin if l.strip()]
by = {}
for r in rows:
    s, n, acc = r[0].strip(), r[1].strip(), float(r[3])
    by.setdefault((s, n), []).append(acc)
for (s, n), v in by.items():
    sd = st.stdev(v) if len(v) > 1 else 0.0
    print(f"| {s} | {n} | {len(v)} | {st.mean(v):.2f} | {sd:.2f} |")
')

{
  echo "# BatchNorm groups vs accuracy ($date)"
  echo
  echo "Command: \`bash bench/bn_groups.sh\` (SEEDS=\"$seeds\" MICRO=\"$micro\" SETTINGS=\"$settings\")"
  echo "Started $start; machine: $(nproc) cores, $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "Binary: $bin ($(git rev-parse --short HEAD)); each run: configs/quickstart.toml schedule, test 200 episodes on the novel split."
  echo
  echo "| setting | N (BN groups) | seed | test acc % | ±95% CI | best val % | seconds |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Mean over seeds (sd = standard deviation across seeds):"
  echo
  echo "| setting | N | runs | mean test acc % | sd |"
  echo "|---|---:|---:|---:|---:|"
  echo "$summary"
} >"$result.tmp"
mv "$result.tmp" "$result"
echo "wrote $result"
