#!/bin/sh
# The JAX backend `make setup` installs: cuda13 or cuda12 by the CUDA version of the driver where `nvidia-smi` lists
# a GPU; cpu where there is none, or its driver is older than CUDA 12.
nvidia-smi -L 2>/dev/null | grep -q '^GPU ' || { echo cpu; exit 0; }
cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)
case "$cuda" in
  12) echo cuda12 ;;
  1[3-9]|[2-9][0-9]) echo cuda13 ;;
  *) echo cpu ;;
esac
