#!/usr/bin/env bash
# Installs samed2-kit and everything it needs into ./.venv (or the active virtual environment).
#
#   bash scripts/install.sh
#
# - CPU machines get torch==2.13.0 (the CPU build where the registry offers one).
# - A machine that already has torch (e.g. a CUDA build) keeps it: the venv sees it.
# - sam2==1.1.0 is installed without its torchvision requirement and without build isolation
#   (its sdist build would otherwise download a CUDA torch); torchvision is never installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    if "$PY" -c "import torch" >/dev/null 2>&1; then
      echo "[install] torch found in $PY: creating .venv that keeps it (--system-site-packages)"
      "$PY" -m venv --system-site-packages .venv
    else
      "$PY" -m venv .venv
    fi
  fi
  PY=.venv/bin/python
else
  PY=python
fi

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

pip_install --upgrade "pip>=23" "setuptools>=68" wheel
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[install] torch==2.13.0"
  pip_install "torch==2.13.0"
fi
if ! "$PY" -c "import importlib.metadata as m; assert m.version('sam2') == '1.1.0'" >/dev/null 2>&1; then
  echo "[install] sam2==1.1.0 (no deps, no build isolation, no CUDA extension)"
  SAM2_BUILD_CUDA=0 pip_install --no-deps --no-build-isolation "sam2==1.1.0"
fi
echo "[install] samed2-kit[dev,export,app] (editable)"
pip_install -e ".[dev,export,app]"
echo "[install] (a pip note that 'sam2 requires torchvision' is expected: torchvision is left out on purpose)"
if "$PY" -c "import importlib.util as u; raise SystemExit(u.find_spec('torchvision') is None)"; then
  echo "[install] warning: torchvision is installed; on CPU torch it breaks 'import peft'." >&2
  echo "[install]          remove it with: $PY -m pip uninstall -y torchvision" >&2
fi
echo "[install] done: $("$PY" -c 'import torch, sam2, samed2_kit; print("torch", torch.__version__, "| sam2 ok | samed2_kit", samed2_kit.__version__)')"
