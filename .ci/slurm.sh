#!/usr/bin/env bash
# Slurm in CI: a one-node Slurm cluster on this machine (Debian's slurm-wlm with munge and PMIx,
# no systemd), and the real sbatch templates submitted to it on CPU:
#   a) a 2-rank job completes with exit 0 and the test line; the ranks know rank/size from PMIx;
#   b) a job stopped mid-training (`scancel --signal=TERM --batch`) checkpoints, exits 3, is
#      requeued, resumes and completes, with last.safetensors identical to (a)'s;
#   c) a job with a real time limit (--time, --signal=B:USR1@N) requeues until it is done;
#   d) a rank killed mid-training (kill -9) is named by the surviving rank, and the job fails
#      at once instead of waiting for Slurm's KillWait.
# Skips (exit 0, one line) only where Slurm cannot be installed. Daemons are stopped by PID.
#   bash .ci/slurm.sh            (FSCT=path/to/fsct-dist to test another binary)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
FSCT=${FSCT:-target/debug/fsct-dist}     # what .ci/run's `cargo test` built
[ -x "$FSCT" ] || { echo "slurm.sh: no $FSCT: cargo build first (or set FSCT)" >&2; exit 1; }
FSCT=$(realpath "$FSCT")
t0=$SECONDS
log() { echo "slurm.sh [$((SECONDS - t0)) s] $*"; }

if [ "$(id -u)" != 0 ]; then
  echo "slurm.sh: SKIPPED: the Slurm daemons need root"
  exit 0
fi
if ! command -v slurmctld > /dev/null || ! command -v slurmd > /dev/null || ! command -v munged > /dev/null; then
  if ! command -v apt-get > /dev/null; then
    echo "slurm.sh: SKIPPED: Slurm is not installed and cannot be (no apt-get)"
    exit 0
  fi
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      slurmd slurmctld slurm-client munge > /dev/null; }; then
    echo "slurm.sh: SKIPPED: apt-get could not install slurmd slurmctld slurm-client munge"
    exit 0
  fi
  log "installed slurmd slurmctld slurm-client munge"
fi

state=$(mktemp -d /tmp/fsct-slurm.XXXXXX)
chmod 755 "$state"
pids=()
cleanup() {
  # Jobs first (slurmd waits for their steps), then the daemons; SIGKILL whatever lingers.
  if [ -n "${SLURM_CONF:-}" ] && [ -n "$(squeue -h -o %i 2> /dev/null)" ]; then
    squeue -h -o %i | xargs -r scancel 2> /dev/null || true
    for _ in $(seq 20); do [ -z "$(squeue -h -o %i 2> /dev/null)" ] && break; sleep 0.5; done
  fi
  local p
  [ -f "$state/munge/munged.pid" ] && pids+=("$(cat "$state/munge/munged.pid")")
  for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2> /dev/null || true; done
  for _ in $(seq 20); do
    alive=0
    for p in ${pids[@]+"${pids[@]}"}; do kill -0 "$p" 2> /dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.5
  done
  for p in ${pids[@]+"${pids[@]}"}; do kill -9 "$p" 2> /dev/null || true; done
  # Logs stay for a failed run (the failure message prints them); a passed one leaves nothing.
  if [ "$passed" = 1 ]; then rm -rf "$state"; fi
}
passed=0
trap cleanup EXIT

# munge: our own socket, pid and log files, run as the munge user.
install -d -o munge -g munge -m 0755 "$state/munge"
runuser -u munge -- munged --force --socket="$state/munge/munge.socket" \
  --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" \
  --seed-file="$state/munge/munged.seed"
mkdir -p "$state/ctld" "$state/d"
cat > "$state/slurm.conf" <<CONF
ClusterName=fsctci
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge/munge.socket,cred_expire=10
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
SchedulerParameters=sched_interval=5
ReturnToService=2
MpiDefault=none
$(slurmd -C | head -1) NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$state/slurm.conf
slurmctld -D > "$state/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D > "$state/slurmd.out" 2>&1 &
pids+=($!)
for _ in $(seq 60); do
  sinfo -h -o %T 2> /dev/null | grep -q idle && break
  sleep 1
done
sinfo -h -o %T | grep -q idle || { cat "$state"/*.log >&2; echo "slurm.sh: the node never became idle" >&2; exit 1; }
srun --mpi=list 2>&1 | grep -q pmix || { echo "slurm.sh: this Slurm has no PMIx plugin" >&2; exit 1; }
log "cluster up: $(sinfo -h -o '%N %c CPUs %T')"

# A tiny run: the built-in generator's small dataset, 3-way 2-shot 3-query at 20 px, Conv4,
# 2 epochs of 8 steps, a checkpoint every step.
work=$state/work
mkdir -p "$work"
"$FSCT" data synth --classes 6,5,5 --images-per-class 12 --size 24 --out "$work/ds" > /dev/null
cat > "$work/tiny.toml" <<TOML
[data]
dataset = "$work/ds"
image_size = 20
workers = 1
[episode]
n_way = 3
k_shot = 2
n_query = 3
[train]
epochs = 2
episodes_per_epoch = 8
val_episodes = 6
checkpoint_every = 1
[test]
episodes = 10
[run]
threads = 1
TOML

# Submits the real template on CPU; prints the job id.
submit() {
  local name=$1
  shift
  DEVICE=cpu CONFIG=$work/tiny.toml FSCT=$FSCT OUT=$work/$name \
    sbatch --parsable --job-name="$name" --output="$work/$name.log" \
    --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 "$@" \
    "$repo/launch/slurm/one_node_4gpu.sbatch"
}
field() { scontrol show job "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1; }
# Waits for job $1 to reach a final state (at most $2 s); prints the state.
wait_job() {
  local deadline=$((SECONDS + $2)) s
  while :; do
    s=$(field "$1" JobState)
    case $s in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) break ;; esac
    [ $SECONDS -lt $deadline ] || { s="still $s after $2 s"; break; }
    sleep 1
  done
  echo "$s"
}
fail() {
  echo "slurm.sh: FAILED: $*" >&2
  for f in "$work"/*.log; do echo "--- $f" >&2; cat "$f" >&2; done
  tail -20 "$state/slurmctld.log" >&2
  exit 1
}

# (a) a plain 2-rank job.
a=$(submit a)
state_a=$(wait_job "$a" 120)
[ "$state_a" = COMPLETED ] || fail "job a: $state_a"
[ "$(field "$a" ExitCode)" = 0:0 ] || fail "job a exit code $(field "$a" ExitCode)"
grep -q "10 Test Acc" "$work/a.log" || fail "job a printed no test line"
grep -q "2 rank(s) over mpi" "$work/a.log" || fail "job a did not run as 2 MPI ranks"
grep -q "rank{r=1}" "$work/a.log" || fail "job a has no rank 1"
log "a) 2 ranks over PMIx: COMPLETED 0:0, $(grep -o '10 Test Acc.*' "$work/a.log")"

# (b) stopped mid-training by a signal to the batch script, requeued, resumed.
b=$(submit b)
deadline=$((SECONDS + 60))
# The first checkpoint (one per step): training is under way, well before its 16 steps end.
until compgen -G "$work/b/checkpoints/step-*" > /dev/null; do
  [ $SECONDS -lt $deadline ] || fail "job b wrote no checkpoint in 60 s: $(field "$b" JobState)"
  sleep 0.05
done
stop_at=$SECONDS
scancel --signal=TERM --batch "$b"
log "b) signalled (TERM to the batch script) after its checkpoint $(ls "$work/b/checkpoints" | head -1)"
state_b=$(wait_job "$b" 150)
[ "$state_b" = COMPLETED ] || fail "job b: $state_b"
restarts=$(field "$b" Restarts)
[ "$restarts" -ge 1 ] || fail "job b was not requeued"
grep -q "stopped by a signal; checkpoint" "$work/b.log" || fail "job b wrote no checkpoint on the signal"
grep -q "requeueing job $b (exit 3)" "$work/b.log" || fail "job b's ranks did not exit 3"
grep -q "resuming $work/b" "$work/b.log" || fail "job b did not resume"
cmp "$work/a/last.safetensors" "$work/b/last.safetensors" || fail "job b's weights differ from job a's"
log "b) checkpointed, exit 3, requeued ($restarts restart), resumed, COMPLETED $((SECONDS - stop_at)) s after the signal; last.safetensors identical to a's"

# (d) rank 1 killed with SIGKILL mid-training: rank 0 sees it gone (/proc) while it waits in
# a collective, names it, and ends the job; it is not requeued (a crash is not a preemption).
d=$(FSCT_ARGS="--epochs 32" submit d)
deadline=$((SECONDS + 60))
# Any checkpoint shows training is under way (the oldest are deleted as new ones come).
until compgen -G "$work/d/checkpoints/step-*" > /dev/null; do
  [ $SECONDS -lt $deadline ] || fail "job d wrote no checkpoint in 60 s: $(field "$d" JobState)"
  sleep 0.05
done
victim=""
for p in $(pgrep -f "$FSCT train"); do
  tr '\0' '\n' < "/proc/$p/environ" 2> /dev/null | grep -qx SLURM_PROCID=1 && victim=$p
done
[ -n "$victim" ] || fail "job d: no process of rank 1 found"
kill -9 "$victim"
killed_at=$SECONDS
state_d=$(wait_job "$d" 60)
[ "$state_d" = FAILED ] || fail "job d: $state_d (expected FAILED)"
grep -q "rank 1 (pid $victim) ended while this rank waited" "$work/d.log" || fail "job d: rank 0 did not name the killed rank"
log "d) rank 1 (pid $victim) killed: FAILED $((SECONDS - killed_at)) s later; rank 0 said: $(grep -o "error on rank 0 of 2: rank 1.* of step [0-9]*" "$work/d.log" | head -1)"

# (c) a real time limit: the signal comes N s before it, every start makes progress.
# About 50 s of work (32 epochs). slurmctld checks time limits every 30 s and sends the
# signal at the first check with fewer than 50 s left: 10 to 40 s into the first start (so at
# least one stop), about 13 s into each requeued one (it starts 16 s after the requeue).
c=$(FSCT_ARGS="--epochs 32 --checkpoint-every 0" submit c --time=1 --signal=B:USR1@50)
state_c=$(wait_job "$c" 300)
[ "$state_c" = COMPLETED ] || fail "job c: $state_c"
grep -q "10 Test Acc" "$work/c.log" || fail "job c printed no test line"
restarts=$(field "$c" Restarts)
[ "$restarts" -ge 1 ] || fail "job c was never stopped by its time limit's signal"
log "c) time limit 1 min, signal 50 s before it: COMPLETED after $restarts requeue(s)"
grep -E "stop signal|requeueing|resuming|Test Acc" "$work/c.log" | sed 's/^/    /'
log "done in $((SECONDS - t0)) s"
passed=1
