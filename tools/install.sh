#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with torch, timm, fvcore, the OpenMMLab
# stack (full mmcv with compiled ops, built once from source and cached), the ONNX tools, the docs
# tools (MkDocs, Material, mkdocstrings) and pide_zoo itself, plus the installed timm version's own
# model tests (tests/test_models.py from its source distribution, cached; the project's test suite
# runs them on its models, finding them through $VENV/.pide_zoo_timm_tests).
#
#   bash tools/install.sh            # create or update .venv
#
# Environment: PYTHON (interpreter for the venv, default python3), VENV (default .venv),
# PIDE_ZOO_CACHE (mmcv wheel and timm tests, default ~/.cache/pide_zoo), MAX_JOBS (mmcv build jobs,
# default nproc).
set -euo pipefail

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMENGINE_VERSION=0.10.7
MMSEG_VERSION=1.2.2
MMCV_VERSION=2.1.0

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
CACHE="${PIDE_ZOO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pide_zoo}"
START=$SECONDS

step() { printf '\n[install %4ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '\n[install] FAILED: %s\n' "$*" >&2; exit 1; }
trap 'die "line $LINENO: \"$BASH_COMMAND\" exited with $?"' ERR

command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found; set PYTHON to a Python >= 3.9"

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# timm's own tests/test_models.py for the installed timm version, unpacked from its source
# distribution (the wheel has no tests) into $CACHE/timm-<version>/; tests/timm_suite reads them there.
timm_tests_dir() {
  CACHE="$CACHE" "$PY" -c "import os, timm; print(os.path.abspath(os.path.join(os.environ['CACHE'], 'timm-' + timm.__version__)))" \
    2>/dev/null
}

# The test suite reads where timm's tests are from the venv, whatever PIDE_ZOO_CACHE says when it runs.
TIMM_RECORD="$VENV/.pide_zoo_timm_tests"
record_timm_tests() { timm_tests_dir >"$TIMM_RECORD"; }

# Everything pip would install, as one fingerprint: if it matches the stamp, the imports work and
# timm's tests are cached, the environment is ready and nothing is touched.
STAMP="$VENV/.pide_zoo_install"
FINGERPRINT="$(cat "$0" setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$FINGERPRINT" ] \
   && "$PY" -c "import mmcv.ops, mmseg.models, timm, fvcore, onnxruntime, onnxscript, mkdocs, mkdocstrings_handlers.python, pide_zoo" 2>/dev/null \
   && [ -f "$(timm_tests_dir)/tests/test_models.py" ]; then
  record_timm_tests
  step "environment is up to date (delete $STAMP to force a reinstall)"
  exit 0
fi

step "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION"
"${PIP[@]}" install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

step "installing build tools, timm, fvcore, mmengine $MMENGINE_VERSION, mmsegmentation $MMSEG_VERSION"
"${PIP[@]}" install -q "setuptools>=64,<81" wheel ninja \
  timm fvcore "mmengine==$MMENGINE_VERSION" "mmsegmentation==$MMSEG_VERSION" \
  ftfy regex  # mmseg.utils imports its CLIP tokenizer unconditionally

# mmcv's compiled ops are tied to the torch ABI and the Python version: key the cache on both.
PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
MMCV_CACHE="$CACHE/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$PYTAG-$(uname -m)"
mkdir -p "$MMCV_CACHE"

have_mmcv_ops() {
  "$PY" - <<EOF 2>/dev/null
import importlib.metadata as md, mmcv.ops
assert md.version("mmcv") == "$MMCV_VERSION"
EOF
}

if have_mmcv_ops; then
  step "mmcv $MMCV_VERSION with compiled ops already installed"
else
  WHEEL="$(ls "$MMCV_CACHE"/mmcv-*.whl 2>/dev/null | head -n 1 || true)"
  if [ -z "$WHEEL" ]; then
    BUILD="$(mktemp -d)"
    step "building mmcv $MMCV_VERSION with compiled ops from source (about 11 minutes on 2 cores)"
    "${PIP[@]}" download -q --no-deps --no-binary :all: -d "$BUILD" "mmcv==$MMCV_VERSION"
    tar -xzf "$BUILD"/mmcv-"$MMCV_VERSION".tar.gz -C "$BUILD"
    SRC="$BUILD/mmcv-$MMCV_VERSION"
    # torch >= 2.6 headers need C++20; mmcv 2.1.0 hard-codes C++14/17.
    sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
    grep -q 'c++20' "$SRC/setup.py" || die "mmcv setup.py layout changed: no -std flag to patch"
    LOG="$BUILD/build.log"
    echo "  build log: $LOG"
    (cd "$SRC" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
       "${PIP[@]}" wheel -v --no-build-isolation --no-deps -w "$BUILD/wheel" . >"$LOG" 2>&1) &
    BUILD_PID=$!
    while kill -0 "$BUILD_PID" 2>/dev/null; do
      sleep 30
      LAST="$(grep -o '^ *\[[0-9]*/[0-9]*\]' "$LOG" 2>/dev/null | tail -n 1 | tr -d " " || true)"
      printf '  ... still building mmcv, %ds elapsed, compile step %s\n' \
        "$((SECONDS - START))" "${LAST:-(configuring)}"
    done
    if ! wait "$BUILD_PID"; then
      tail -n 40 "$LOG" >&2
      die "mmcv build failed; the full log is $LOG"
    fi
    cp "$BUILD"/wheel/mmcv-*.whl "$MMCV_CACHE"/
    WHEEL="$(ls "$MMCV_CACHE"/mmcv-*.whl | head -n 1)"
    rm -rf "$BUILD"
    step "cached $WHEEL"
  else
    step "installing cached mmcv wheel $WHEEL"
  fi
  "${PIP[@]}" install -q --no-deps --force-reinstall "$WHEEL"
  "${PIP[@]}" install -q "$WHEEL"  # its pure-Python requirements (addict, yapf, ...)
fi

step "installing pide_zoo (editable) with its extras (seg, cls, export, test, docs)"
"${PIP[@]}" install -q --no-build-isolation -e ".[all]"

TIMM_SRC="$(timm_tests_dir)"
TIMM_VERSION="${TIMM_SRC##*/timm-}"
if [ -f "$TIMM_SRC/tests/test_models.py" ]; then
  step "timm $TIMM_VERSION's own tests already cached in $TIMM_SRC"
else
  step "fetching timm $TIMM_VERSION's own tests from its source distribution into $TIMM_SRC"
  SDIST="$(mktemp -d)"
  "${PIP[@]}" download -q --no-deps --no-binary :all: -d "$SDIST" "timm==$TIMM_VERSION"
  tar -xzf "$SDIST"/timm-"$TIMM_VERSION".tar.gz -C "$SDIST"
  [ -f "$SDIST/timm-$TIMM_VERSION/tests/test_models.py" ] \
    || die "timm $TIMM_VERSION's source distribution has no tests/test_models.py"
  mkdir -p "$SDIST/keep"
  cp -r "$SDIST/timm-$TIMM_VERSION/tests" "$SDIST/timm-$TIMM_VERSION/pyproject.toml" "$SDIST/keep/"
  rm -rf "$TIMM_SRC" && mv "$SDIST/keep" "$TIMM_SRC"  # whole or not at all
  rm -rf "$SDIST"
fi
record_timm_tests
step "recorded timm's tests folder in $TIMM_RECORD"

step "checking imports"
"$PY" -c "import mmcv.ops, mmseg.models, timm, fvcore, onnxruntime, onnxscript, mkdocs, mkdocstrings_handlers.python, pide_zoo; print('  torch', __import__('torch').__version__, '| timm', timm.__version__, '| mmcv', mmcv.__version__, '| mmseg', mmseg.__version__, '| pide_zoo', pide_zoo.__version__)"

echo "$FINGERPRINT" >"$STAMP"
step "done: activate with 'source $VENV/bin/activate' or call $VENV/bin/python"
