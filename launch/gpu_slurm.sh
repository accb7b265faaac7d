#!/usr/bin/env bash
# Submit launch/slurm.sbatch: multi-node GPU training of ctelm_jax, one process per node.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_slurm.sh --nodes N --partition P --workdir W [--gpus-per-node 8] [--time T]
                           [--account A] [--job-name NAME] [--init-timeout S] [--dry-run] [-- TRAIN_ARGS...]
Submits `sbatch ... launch/slurm.sbatch --workdir=W TRAIN_ARGS` from the repo root; --dry-run prints it.
EOF
}
die() { echo "error: $*" >&2; exit 2; }

# shellcheck source=launch/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"

NODES='' GPUS=8 PARTITION='' WORKDIR='' TIME='' ACCOUNT='' JOB=ctelm INIT_TIMEOUT=${CTELM_INIT_TIMEOUT_S:-300}
DRY_RUN=0
TRAIN_ARGS=()
while (($#)); do
  arg=$1
  if [[ $arg == --*=* ]]; then
    key=${arg%%=*} val=${arg#*=} inline=1
  else
    key=$arg val=${2:-} inline=0
  fi
  case $key in
    --nodes | --gpus-per-node | --partition | --workdir | --time | --account | --job-name | --init-timeout)
      if ((!inline)); then
        (($# >= 2)) || die "$key needs a value"
        shift
      fi
      case $key in
        --nodes) NODES=$val ;;
        --gpus-per-node) GPUS=$val ;;
        --partition) PARTITION=$val ;;
        --workdir) WORKDIR=$val ;;
        --time) TIME=$val ;;
        --account) ACCOUNT=$val ;;
        --job-name) JOB=$val ;;
        --init-timeout) INIT_TIMEOUT=$val ;;
      esac
      ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) echo "error: unknown flag '$arg'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

bad=0
for pair in --nodes="$NODES" --partition="$PARTITION" --workdir="$WORKDIR"; do
  [[ -n ${pair#*=} ]] || { echo "error: missing required flag ${pair%%=*}" >&2; bad=1; }
done
((!bad)) || exit 2
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS'"
[[ $INIT_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--init-timeout must be a positive integer, got '$INIT_TIMEOUT'"

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cmd=(sbatch --job-name="$JOB" --nodes="$NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS"
  --partition="$PARTITION")
[[ -z $TIME ]] || cmd+=(--time="$TIME")
[[ -z $ACCOUNT ]] || cmd+=(--account="$ACCOUNT")
cmd+=(--chdir="$REPO_ROOT" --output="$REPO_ROOT/slurm-%x-%j.out"
  --export="ALL,CTELM_GPUS_PER_NODE=$GPUS,CTELM_INIT_TIMEOUT_S=$INIT_TIMEOUT"
  "$REPO_ROOT/launch/slurm.sbatch" --workdir="$WORKDIR" "${TRAIN_ARGS[@]}")

printf '+ %s\n' "$(qjoin "${cmd[@]}")"
((DRY_RUN)) || exec "${cmd[@]}"
