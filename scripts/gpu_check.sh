#!/usr/bin/env bash
# GPU readiness check: run the `cuda` tests, measure ResNet-18 SimCLR training throughput on
# synthetic 32x32 data, and write ONE JSON report (provenance, pytest counts, throughput).
#
#   scripts/gpu_check.sh                      # on a CUDA machine -> results/gpu_check.json
#   scripts/gpu_check.sh --out /tmp/r.json -- --batch-sizes 128,256 --steps 10
#   scripts/gpu_check.sh --allow-cpu          # no GPU: tiny CPU smoke run (for testing)
#
# Options:
#   --allow-cpu      also run without a GPU: then the benchmark runs on the CPU, tiny sizes
#   --out PATH       the report (default: results/gpu_check.json, or $GPU_CHECK_OUT)
#   --tests PATH     what pytest collects (default: tests); relative paths start at the repo root
#   --skip-tests     do not run pytest (the report's "pytest" is null)
#   -- ARGS...       passed to `python -m benchmarks.gpu_check` (after the defaults)
# Environment: PYTHON (default: .venv/bin/python, else python3).
#
# Exit status: 0 when the cuda tests passed and every benchmark case ran with a finite loss;
# 1 when a cuda test failed, none passed on the GPU, or a case failed (the report is still
# written); 2 on bad usage or no GPU.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

allow_cpu=0
skip_tests=0
out="${GPU_CHECK_OUT:-results/gpu_check.json}"
tests="tests"
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --allow-cpu) allow_cpu=1 ;;
    --skip-tests) skip_tests=1 ;;
    --out)
      [[ $# -ge 2 ]] || { echo "gpu_check: --out needs a path" >&2; exit 2; }
      out="$2"; shift ;;
    --tests)
      [[ $# -ge 2 ]] || { echo "gpu_check: --tests needs a path" >&2; exit 2; }
      tests="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ "$allow_cpu" == 1 ]]; then
  # CUDA when present (full sizes), else the CPU with tiny sizes (decided in Python)
  bench=(--device auto --cpu-smoke)
else
  if ! has_gpu="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')"; then
    echo "gpu_check: cannot import torch with $PYTHON" >&2
    exit 2
  fi
  if [[ "$has_gpu" != 1 ]]; then
    echo "gpu_check: no CUDA GPU found (torch.cuda.is_available() is False with $PYTHON)." >&2
    echo "gpu_check: run this on a machine with a GPU, or pass --allow-cpu for a CPU smoke run." >&2
    exit 2
  fi
  bench=(--device cuda)
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pytest_rc=0
report_args=()
if [[ "$skip_tests" == 0 ]]; then
  junit="$tmp/cuda_tests.xml"
  cmd=("$PYTHON" -m pytest "$tests" -m cuda -q -p no:cacheprovider --junitxml "$junit")
  echo "gpu_check: ${cmd[*]}"
  "${cmd[@]}" || pytest_rc=$?
  report_args=(--junit-xml "$junit" --pytest-returncode "$pytest_rc"
               --pytest-command "python -m pytest $tests -m cuda -q -p no:cacheprovider")
fi

bench_rc=0
"$PYTHON" -m benchmarks.gpu_check "${bench[@]}" --out "$out" ${report_args[@]+"${report_args[@]}"} ${extra[@]+"${extra[@]}"} \
  || bench_rc=$?

if [[ "$pytest_rc" != 0 ]]; then
  echo "gpu_check: FAILED: pytest -m cuda exited with $pytest_rc (report: $out)" >&2
  exit 1
fi
if [[ "$bench_rc" != 0 ]]; then
  echo "gpu_check: FAILED: the benchmark exited with $bench_rc" >&2
  exit 1
fi
echo "gpu_check: OK (report: $out)"
