#!/usr/bin/env bash
# Re-execute notebooks in the quick profile and store their outputs in place.
# Usage: scripts/execute_notebooks.sh [notebook.ipynb ...]   (default: all chapters)
set -euo pipefail
cd "$(dirname "$0")/.."
export CL_QUICK=1 TQDM_DISABLE=1 PYTHONHASHSEED=0
if [ $# -eq 0 ]; then set -- notebooks/*.ipynb; fi
for nb in "$@"; do
  echo "executing $nb"
  start=$(date +%s)
  jupyter execute --inplace --timeout=600 "$nb"
  echo "  took $(( $(date +%s) - start )) s"
done
