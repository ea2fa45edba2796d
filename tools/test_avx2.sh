#!/usr/bin/env bash
# The test suite as an AVX2-only CPU runs it, on any x86-64 machine: torch, oneDNN, MKL, numpy's SIMD
# loops and OpenBLAS's kernels all forced to AVX2 (their AVX-512 paths round differently in the last
# bit). Run after `bash .ci/run` (it uses .venv); extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
export NPY_DISABLE_CPU_FEATURES="AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL"
export OPENBLAS_CORETYPE=Haswell OMP_WAIT_POLICY=PASSIVE
.venv/bin/python -c "import torch; print('cpu capability', torch.backends.cpu.get_cpu_capability())"
exec .venv/bin/python -m pytest -q -n 2 --timeout 900 "${@:-tests}"
