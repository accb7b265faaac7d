#!/usr/bin/env bash
# Cloud TPU VM slices for ctelm_jax: create, set up, train, follow logs, resume spot runs, stop, delete.
# Every subcommand takes --dry-run, which prints the commands it would run ("+ " and one per line) instead.
set -Eeuo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh SUBCOMMAND --name NAME --project P --zone Z [flags] [-- TRAIN_ARGS...]

subcommands
  create       make the slice (--accelerator-type v4-N|v5p-N|v5litepod-N|v6e-N [--runtime-version V]
               [--spot] [--mesh data=4,fsdp=2,tensor=1 | --mesh 8] [--no-wait] [--wait-timeout S])
  setup        copy `git archive HEAD` to every worker, make a venv there, pip install -e . 'jax[tpu]'
  train        start `python -m ctelm_jax.train --workdir=gs://... TRAIN_ARGS` on all workers (nohup, logs
               in ~/ctelm_logs/train.log); needs --workdir gs://BUCKET/PATH
  logs         follow the training log of worker 0 (--worker N|all, --lines N)
  resume-loop  spot slices: keep a queued resource alive and training running until the job exits 0;
               takes the create and train flags, plus --poll-interval S, --max-retries N, --delete-when-done
  stop         stop training on all workers (the slice keeps running)
  delete       delete the slice (--spot: delete its queued resource, and with it the slice)

common flags
  --name NAME            TPU node name (spot: the queued resource is NAME-qr)
  --project P, --zone Z  or env CTELM_PROJECT, CTELM_ZONE
  --dry-run              print the commands instead of running them
EOF
}

die() { echo "error: $*" >&2; exit 2; }        # bad input: exit 2
fail() { echo "error: $*" >&2; exit 1; }       # a step failed
note() { echo "[tpu_vm] $*" >&2; }

# shellcheck source=launch/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"

# The printed commands go to fd 3: stdout under --dry-run (also from inside $(...)), else stderr.
# run CMD...: print it; run it unless --dry-run.
run() {
  printf '+ %s\n' "$(qjoin "$@")" >&3
  ((!DRY_RUN)) || return 0
  "$@" || {
    local rc=$?
    FAILED_CMD=$(qjoin "$@")
    return "$rc"
  }
}
# query FAKE CMD...: for commands whose stdout is read (polling, so not echoed when run for real);
# under --dry-run prints the command and answers FAKE.
query() {
  local fake=$1
  shift
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(qjoin "$@")" >&3
    printf '%s\n' "$fake"
  else
    "$@"
  fi
}

# ----------------------------------------------------------------------------------------------- flags
SUB=${1:-}
[[ -n $SUB ]] || { usage >&2; exit 2; }
shift
case $SUB in
  -h | --help | help) usage; exit 0 ;;
  create | setup | train | logs | resume-loop | stop | delete) ;;
  *) echo "error: unknown subcommand '$SUB'" >&2; usage >&2; exit 2 ;;
esac

NAME='' PROJECT=${CTELM_PROJECT:-} ZONE=${CTELM_ZONE:-} DRY_RUN=0
ACCEL='' RUNTIME='' SPOT=0 MESH='' WAIT=1 WAIT_TIMEOUT=0
WORKDIR='' WORKER=0 TAIL_LINES=100 POLL=60 MAX_RETRIES=5 DELETE_WHEN_DONE=0
PY_VERSION=3.12 JAX_SPEC='jax[tpu]'
TRAIN_ARGS=()

while (($#)); do
  arg=$1
  if [[ $arg == --*=* ]]; then
    key=${arg%%=*} val=${arg#*=} inline=1
  else
    key=$arg val=${2:-} inline=0
  fi
  case $key in
    --name | --project | --zone | --accelerator-type | --runtime-version | --mesh | --wait-timeout | \
      --workdir | --worker | --lines | --poll-interval | --max-retries | --python-version | --jax-spec)
      if ((!inline)); then
        (($# >= 2)) || die "$key needs a value"
        shift
      fi
      case $key in
        --name) NAME=$val ;;
        --project) PROJECT=$val ;;
        --zone) ZONE=$val ;;
        --accelerator-type) ACCEL=$val ;;
        --runtime-version) RUNTIME=$val ;;
        --mesh) MESH=$val ;;
        --wait-timeout) WAIT_TIMEOUT=$val ;;
        --workdir) WORKDIR=$val ;;
        --worker) WORKER=$val ;;
        --lines) TAIL_LINES=$val ;;
        --poll-interval) POLL=$val ;;
        --max-retries) MAX_RETRIES=$val ;;
        --python-version) PY_VERSION=$val ;;
        --jax-spec) JAX_SPEC=$val ;;
      esac
      ;;
    --spot) SPOT=1 ;;
    --no-wait) WAIT=0 ;;
    --delete-when-done) DELETE_WHEN_DONE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) echo "error: unknown flag '$arg' for $SUB" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if ((DRY_RUN)); then exec 3>&1; else exec 3>&2; fi
bad=0
[[ -n $PROJECT ]] || { echo "error: missing required flag --project (or env CTELM_PROJECT)" >&2; bad=1; }
[[ -n $ZONE ]] || { echo "error: missing required flag --zone (or env CTELM_ZONE)" >&2; bad=1; }
[[ -n $NAME ]] || { echo "error: missing required flag --name" >&2; bad=1; }
((!bad)) || exit 2
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lowercase letters, digits and '-' only"
for pair in wait-timeout="$WAIT_TIMEOUT" lines="$TAIL_LINES" poll-interval="$POLL" max-retries="$MAX_RETRIES"; do
  [[ ${pair#*=} =~ ^[0-9]+$ ]] || die "--${pair%%=*} must be a non-negative integer, got '${pair#*=}'"
done
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker index or 'all'"
if ((${#TRAIN_ARGS[@]})) && [[ $SUB != train && $SUB != resume-loop ]]; then
  die "arguments after -- are train arguments; only 'train' and 'resume-loop' take them"
fi

QR="$NAME-qr"
LOC=(--zone="$ZONE" --project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
QRS=(gcloud compute tpus queued-resources)
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARBALL="${TMPDIR:-/tmp}/ctelm_jax-$NAME.tar.gz"
# Remote layout (home directory of each worker): code, venv, logs; logs survive a re-setup.
# shellcheck disable=SC2088  # '~' is expanded by the worker's shell, not here
R_CODE='~/ctelm_jax' R_VENV='~/ctelm_venv' R_LOGS='~/ctelm_logs'

# ------------------------------------------------------------------------------------- slice geometry
# chips_of ACCEL: JAX devices of a slice (one per chip; v4 and v5p names count TensorCores, two a chip).
chips_of() {
  [[ $1 =~ ^(v4|v5p|v5litepod|v6e)-([0-9]+)$ ]] ||
    die "--accelerator-type '$1': expected v4-N, v5p-N, v5litepod-N or v6e-N"
  local gen=${BASH_REMATCH[1]} n=${BASH_REMATCH[2]}
  case $gen in
    v4 | v5p) ((n >= 8 && n % 2 == 0)) || die "--accelerator-type '$1': N must be even and >= 8"; echo $((n / 2)) ;;
    *) ((n >= 1)) || die "--accelerator-type '$1': N must be >= 1"; echo "$n" ;;
  esac
}
default_runtime() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
  esac
}
# mesh_check MESH CHIPS: "data=4,fsdp=2,tensor=1" or "8"; at most one axis may be -1 (the rest of the chips).
mesh_check() {
  local mesh=$1 chips=$2 prod=1 fill=0 part size
  local -a parts
  IFS=, read -r -a parts <<<"$mesh"
  ((${#parts[@]})) || die "--mesh is empty"
  for part in "${parts[@]}"; do
    size=${part#*=}
    [[ $part != *=* || ${part%%=*} =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--mesh '$mesh': bad axis name in '$part'"
    if [[ $size == -1 ]]; then
      ((++fill == 1)) || die "--mesh '$mesh': at most one axis may be -1"
    elif [[ $size =~ ^[1-9][0-9]*$ ]]; then
      prod=$((prod * size))
    else
      die "--mesh '$mesh': '$part' is not AXIS=SIZE (SIZE a positive integer or -1)"
    fi
  done
  if ((fill)); then
    ((chips % prod == 0)) ||
      die "--mesh '$mesh' needs a multiple of $prod devices, but $ACCEL has $chips chips"
  else
    ((prod == chips)) ||
      die "--mesh '$mesh' has $prod devices, but $ACCEL has $chips chips (one JAX device each)"
  fi
}

# ---------------------------------------------------------------------------------- failure reporting
SLICE_UP=0 FAILED_CMD=''
delete_cmd() {
  if ((SPOT)); then qjoin "${QRS[@]}" delete "$QR" "${LOC[@]}" --force --quiet
  else qjoin "${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet; fi
}
on_exit() {
  local rc=$?
  if ((rc != 0 && SLICE_UP && !DRY_RUN)); then
    local what="is STILL RUNNING and billing"
    ((SLICE_UP == 1)) || what="is presumably still running and billing"
    {
      echo
      echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
      echo "!!! tpu_vm.sh $SUB failed${FAILED_CMD:+ at: $FAILED_CMD}"
      echo "!!! The TPU slice '$NAME' (zone $ZONE, project $PROJECT) $what."
      echo "!!! Delete it with:"
      echo "!!!   $(delete_cmd)"
      echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    } >&2
  fi
}
trap '[[ -n $FAILED_CMD ]] || FAILED_CMD=$BASH_COMMAND' ERR
trap on_exit EXIT

# ------------------------------------------------------------------------------------------ the steps
qr_state() { # prints the queued resource's state, MISSING when it does not exist, UNKNOWN on other errors
  local out err
  err=$(mktemp)
  if out=$(query "$1" "${QRS[@]}" describe "$QR" "${LOC[@]}" --format='value(state.state)' 2>"$err"); then
    echo "${out:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found' "$err"; then
    echo MISSING
  else
    cat "$err" >&2
    echo UNKNOWN
  fi
  rm -f "$err"
}

do_create() {
  local chips runtime
  chips=$(chips_of "$ACCEL")
  [[ -z $MESH ]] || mesh_check "$MESH" "$chips"
  runtime=${RUNTIME:-$(default_runtime "$ACCEL")}
  if ((SPOT)); then
    run "${QRS[@]}" create "$QR" --node-id="$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" \
      --runtime-version="$runtime" --spot || return
    SLICE_UP=1
    ((!WAIT)) || wait_active || return
  else
    run "${TPU[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$runtime" || return
    SLICE_UP=1
  fi
}

wait_active() { # polls the queued resource until ACTIVE; fails on FAILED/SUSPENDED or after --wait-timeout
  local start=$SECONDS state
  while :; do
    state=$(qr_state ACTIVE)
    case $state in
      ACTIVE) note "queued resource $QR is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | MISSING) echo "error: queued resource $QR is $state" >&2; return 1 ;;
    esac
    if ((WAIT_TIMEOUT && SECONDS - start >= WAIT_TIMEOUT)); then
      echo "error: queued resource $QR still $state after ${WAIT_TIMEOUT}s" >&2
      return 1
    fi
    note "queued resource $QR is $state; waiting ${POLL}s"
    sleep "$POLL"
  done
}

do_setup() {
  if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    note "warning: uncommitted changes are NOT copied; the workers get git HEAD only"
  fi
  local install
  install="set -e; rm -rf $R_CODE && tar -xzf ctelm_jax.tar.gz -C ~ && cd $R_CODE"
  install+=" && if [ ! -x $R_VENV/bin/python ]; then python3 -m pip install -q --user uv"
  install+=" && python3 -m uv venv --seed --python $(q "$PY_VERSION") $R_VENV; fi"
  install+=" && $R_VENV/bin/python -m pip install -q -U pip"
  install+=" && $R_VENV/bin/python -m pip install -q -e . $(q "$JAX_SPEC")"
  install+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
  run git -C "$REPO_ROOT" archive --format=tar.gz --prefix=ctelm_jax/ -o "$TARBALL" HEAD || return
  run "${TPU[@]}" scp "$TARBALL" "$NAME:ctelm_jax.tar.gz" "${LOC[@]}" --worker=all || return
  run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$install" || return
}

do_train() {
  local inner cmd pid="$R_LOGS/train.pid"
  inner="cd $R_CODE && $R_VENV/bin/python -m ctelm_jax.train $(qjoin --workdir="$WORKDIR" "${TRAIN_ARGS[@]}")"
  inner+="; echo \$? > $R_LOGS/train.rc"
  cmd="mkdir -p $R_LOGS"
  cmd+=" && if [ -f $pid ] && [ ! -f $R_LOGS/train.rc ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then"
  cmd+=" echo 'training already running' >&2; exit 1; fi"
  cmd+="; rm -f $R_LOGS/train.rc; setsid nohup bash -c $(q "$inner") >> $R_LOGS/train.log 2>&1 < /dev/null &"
  cmd+=" echo \$! > $pid"
  run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$cmd" || return
}

train_status() { # worker 0: RUNNING, EXITED <rc>, or NONE (never started here)
  local pid="$R_LOGS/train.pid" cmd
  cmd="if [ -f $R_LOGS/train.rc ]; then echo \"EXITED \$(cat $R_LOGS/train.rc)\";"
  cmd+=" elif [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then echo RUNNING; else echo NONE; fi"
  query RUNNING "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="$cmd" | tail -n1
}

do_stop() {
  local pid="$R_LOGS/train.pid"
  run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=all \
    --command="if [ -f $pid ]; then kill -TERM -- -\"\$(cat $pid)\" 2>/dev/null || true; rm -f $pid; fi"
}

do_delete() {
  if ((SPOT)); then run "${QRS[@]}" delete "$QR" "${LOC[@]}" --force --quiet
  else run "${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet; fi
}

need_workdir() {
  [[ -n $WORKDIR ]] || die "missing required flag --workdir (a gs:// path)"
  [[ $WORKDIR == gs://?* ]] ||
    die "--workdir '$WORKDIR' must be a gs:// path: all workers and re-created slices must see the checkpoints"
}

# resume-loop steps; recover STEP...: a failed step is retried at the next poll, up to --max-retries in a row.
FAILURES=0
recover() {
  if "$@"; then
    FAILURES=0
  else
    ((++FAILURES <= MAX_RETRIES)) || fail "'$*' failed $FAILURES times in a row"
    note "'$*' failed ($FAILURES of $MAX_RETRIES retries); retrying at the next poll"
  fi
}
# shellcheck disable=SC2329  # start_training and recreate are called through recover
start_training() { do_setup && do_train; }
recreate() { # STATE: delete the old queued resource unless MISSING, create, wait for ACTIVE, setup, train
  if [[ $1 != MISSING ]]; then do_delete || return; fi
  SLICE_UP=0
  do_create && do_setup && do_train
}

resume_loop() {
  local state status crashed=0
  while :; do
    state=$(qr_state MISSING)  # (MISSING: what a --dry-run round assumes)
    case $state in
      ACTIVE)
        SLICE_UP=1
        status=$(train_status) || status=UNKNOWN
        case $status in
          RUNNING) crashed=0 ;;
          'EXITED 0')
            note "training finished (exit 0)"
            ((!DELETE_WHEN_DONE)) || do_delete
            return 0
            ;;
          EXITED*)
            # A preemption can kill the job just before the slice goes away: look once more before failing.
            ((crashed++ == 0)) ||
              fail "training exited with ${status#EXITED }; see: $0 logs --name $NAME --project $PROJECT --zone $ZONE"
            note "training exited with ${status#EXITED }; checking the slice again before giving up"
            ;;
          NONE)
            note "slice is up but not training: setup + train"
            recover start_training
            ;;
          *) note "cannot read training status from worker 0 ('$status'); retrying" ;;
        esac
        ;;
      MISSING | SUSPENDED | FAILED)
        note "queued resource $QR is $state: (re)creating"
        crashed=0
        recover recreate "$state"
        ;;
      *) note "queued resource $QR is $state; waiting" ;;
    esac
    if ((DRY_RUN)); then
      note "dry run: stopping after one round"
      return 0
    fi
    sleep "$POLL"
  done
}

# ------------------------------------------------------------------------------------------------ main
case $SUB in
  create)
    [[ -n $ACCEL ]] || die "missing required flag --accelerator-type (e.g. v5p-8, v5litepod-16, v4-32)"
    do_create
    ;;
  setup) SLICE_UP=2; do_setup ;;
  train) need_workdir; SLICE_UP=2; do_train ;;
  logs)
    run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker="$WORKER" --command="tail -n $TAIL_LINES -F $R_LOGS/train.log"
    ;;
  resume-loop)
    [[ -n $ACCEL ]] || die "missing required flag --accelerator-type (e.g. v5p-8, v5litepod-16, v4-32)"
    need_workdir
    chips=$(chips_of "$ACCEL")
    [[ -z $MESH ]] || mesh_check "$MESH" "$chips"
    SPOT=1
    resume_loop
    ;;
  stop) do_stop ;;
  delete) do_delete ;;
esac
