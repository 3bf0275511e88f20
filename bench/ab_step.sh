#!/usr/bin/env bash
# Two fsct-dist binaries side by side: `bench step` of the same setting, alternating A B A B …
# in one run (this machine is shared and noisy; alternating puts both under the same load), at
# W = 1 and W = 2 (`launch/mpirun.sh`). Prints and writes a table of median step seconds and
# the ratio B/A. For "a change keeps the figures": A = before, B = after.
#
#   bash bench/ab_step.sh OLD_BINARY NEW_BINARY [OUT.md]
# Knobs: ROUNDS (3), STEPS (4 measured after 1 warm-up), FLAGS (the training setting; default
# the quickstart config, one loader worker).
set -euo pipefail
cd "$(dirname "$0")/.."
a=$(realpath "$1") b=$(realpath "$2") out=${3:-}
rounds=${ROUNDS:-3} steps=${STEPS:-4}
flags=${FLAGS:---config configs/quickstart.toml --workers 1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# One measurement: median step seconds of binary $1 at $2 ranks (from its --json).
measure() {
  local bin=$1 w=$2 json=$work/m.json
  # shellcheck disable=SC2086
  FSCT=$bin launch/mpirun.sh -n "$w" bench step $flags --warmup 1 --steps "$steps" --json "$json" > /dev/null 2>&1
  python3 -c 'import json,statistics,sys; m=json.load(open(sys.argv[1])); print("%.3f" % statistics.median(sum(p["seconds"] for p in s["phases"]) for s in m["steps"]))' "$json"
}
declare -A t
for w in 1 2; do
  for r in $(seq "$rounds"); do
    t[a$w]+="$(measure "$a" "$w") "
    t[b$w]+="$(measure "$b" "$w") "
  done
done
median() { printf '%s\n' $1 | sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
{
  echo "# A/B step time: $(basename "$a") (A) vs $(basename "$b") (B)"
  echo
  echo "Command: \`bash bench/ab_step.sh $1 $2${out:+ $out}\` (ROUNDS=$rounds STEPS=$steps, flags \`$flags\`)"
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); date $(date -u +%Y-%m-%d)"
  echo
  echo "| W | A median s/step | B median s/step | B/A | A rounds | B rounds |"
  echo "|---:|---:|---:|---:|---|---|"
  for w in 1 2; do
    ma=$(median "${t[a$w]}") mb=$(median "${t[b$w]}")
    echo "| $w | $ma | $mb | $(python3 -c "print(f'{$mb/$ma:.3f}')") | ${t[a$w]}| ${t[b$w]}|"
  done
} | tee ${out:+"$out"}
