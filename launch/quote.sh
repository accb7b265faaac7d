# Sourced by tpu_vm.sh and gpu_slurm.sh (slurm.sbatch keeps a copy): print commands that paste back into a shell.

# Quote one word the way Python's shlex.quote does.
q() {
  local s=$1 sq="'"
  if [[ -z $s ]]; then
    printf "''"
  elif [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//$sq/$sq\"$sq\"$sq}"
  fi
}

# Quote and join words with spaces.
qjoin() {
  local out='' w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}
