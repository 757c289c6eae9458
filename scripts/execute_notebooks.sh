#!/usr/bin/env bash
# Re-execute notebooks in the quick profile and store their outputs in place.
# Usage: scripts/execute_notebooks.sh [notebook.ipynb ...]   (default: all chapters)
set -euo pipefail
cd "$(dirname "$0")/.."
# CL_RECORD=1: cl_lib.recorded stores the CPU-dependent numbers the chapters print with
# Recorded.near (notebooks/recorded/*.json); tests then check them within their tolerances.
export CL_QUICK=1 TQDM_DISABLE=1 PYTHONHASHSEED=0 CL_RECORD=1
if [ $# -eq 0 ]; then set -- notebooks/*.ipynb; fi
for nb in "$@"; do
  echo "executing $nb"
  start=$(date +%s)
  jupyter execute --inplace --timeout=600 "$nb"
  echo "  took $(( $(date +%s) - start )) s"
done
