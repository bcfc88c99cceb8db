#!/usr/bin/env bash
# The GPU checks of pide_zoo as one prepared call (within 6 minutes: gpu_check.py's budgets): install the
# project without dependency resolution, then tools/gpu_check.py's sections (env; tests: pytest -m cuda;
# cpu_tests: the device-independent tests on the CPU; bench: the benchmarks with --device cuda --quick), one
# summary at the end, JSON results in $OUT.
#
# Planned for the lent GPU machine's own environment: its python3 with torch (2.11 + CUDA 13 when last
# read), triton, timm, pytest and pytest-xdist, but no OpenMMLab packages, no fvcore and no network. What it
# lacks and is pure Python travels as wheels in gpu_wheels/ (ignored by git, named in `carry`):
#
#   1. here, once (needs the package index):
#        bash tools/gpu_check.sh --fetch-wheels    # fvcore (built from its sdist), iopath, yacs, termcolor
#   2. the device call (the `run` tool of the device machine):
#        command:   bash tools/gpu_check.sh
#        carry:     ["gpu_wheels"]
#        timeout_s: 450
#      It writes 5 files to $OUT (the tool returns up to 8): gpu_check.json (every section: status, summary,
#      data: the tests' counts, failures, skip reasons and recorded numbers, the benchmark tables in
#      benchmarks/harness.py's schema), gpu_check.log (all output) and the logs tests.log, cpu_tests.log
#      and bench.log.
#
# Without gpu_wheels/ the run still works: tests/tools/test_flops.py is left out (it needs fvcore).
# mmseg cannot travel: mmcv 2.1 needs its compiled ops (mmcv.ops) built against the machine's torch, and
# nothing can be built or fetched there; tests/seg/test_cuda_seg.py and bench_heads.py are skipped, saying so.
#
# Here, on the CPU:   DRY_RUN=1 bash tools/gpu_check.sh   (or python tools/gpu_check.py --dry-run)
# Options after the command go to gpu_check.py (--sections env,tests  --pytest ARGS  --bench nonlocal  --budget S).
# The exit code is gpu_check.py's: 0 when no section failed, 1 when one did (124 when it ran past
# GPU_CHECK_TIMEOUT, default 390 s, with whatever it had written kept).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="$ROOT/gpu_wheels"

if [ "${1:-}" = "--fetch-wheels" ]; then
  # Pure-Python packages the GPU machine lacks, for its Python 3.12 (no compiled code: any platform).
  set -e
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$WHEELS" "iopath==0.1.9" "yacs==0.1.8" "termcolor==3.3.0"
  # fvcore publishes a source distribution only: build its (pure-Python) wheel here.
  "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "fvcore==0.1.5.post20221221"
  ls -l "$WHEELS"
  exit 0
fi

export PYTHONUNBUFFERED=1
OUT="${OUT:-$ROOT/outputs/gpu_check}"
mkdir -p "$OUT"
SITE="${TMPDIR:-/tmp}/gpu_check_site"
START=$SECONDS

if [ -z "${DRY_RUN:-}" ] || [ "${DRY_RUN}" = "0" ]; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" \
      || echo "[gpu_check] installing gpu_wheels/ failed: going on without them"
  fi
  # The project itself, without dependency resolution (its requirements are there or travelled above).
  if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . >"${TMPDIR:-/tmp}/gpu_check_pip.log" 2>&1; then
    echo "[gpu_check] pip install -e . failed (log: ${TMPDIR:-/tmp}/gpu_check_pip.log): pide_zoo from PYTHONPATH instead"
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout wins, installed or not
echo "[gpu_check] set-up took $((SECONDS - START)) s"

timeout -k 10 "${GPU_CHECK_TIMEOUT:-390}" "$PY" tools/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
