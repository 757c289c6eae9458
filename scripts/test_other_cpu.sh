#!/usr/bin/env bash
# Strict nbval on the chapters under another floating-point configuration than the one that
# made their outputs: ATen's and oneDNN's AVX2 kernels and MKL's AVX2 code path (as on many
# AMD and older Intel CPUs). Numbers that depend on the CPU must stay within their stated
# tolerances (cl_lib.recorded); everything else must match exactly.
# Usage: scripts/test_other_cpu.sh [pytest arguments]   (default: the notebooks)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ $# -eq 0 ]; then set -- notebooks; fi
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2
exec "$PYTHON" -m pytest "$@"
