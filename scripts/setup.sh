#!/usr/bin/env bash
# Idempotent set-up: a .venv with torch==2.11.0 (for libtorch), transformers (for the
# Python reference scripts scripts/hf_parity.py etc.) and maturin (the worker's wheel), the Fashion-MNIST, fortunes and chromium
# (dashboard test) packages, and the .venv/torch link that the binaries' run path points at. Each step is skipped
# when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
TRANSFORMERS_VERSION=5.24.0
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
    echo "setup: installing torch==$TORCH_VERSION into .venv (about a minute)"
    .venv/bin/pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi
if ! .venv/bin/python -c "import numpy,safetensors,transformers,sys; sys.exit(0 if transformers.__version__=='$TRANSFORMERS_VERSION' else 1)" 2>/dev/null; then
    echo "setup: installing transformers==$TRANSFORMERS_VERSION, numpy, safetensors into .venv"
    .venv/bin/pip install --quiet --disable-pip-version-check "transformers==$TRANSFORMERS_VERSION" numpy safetensors
fi
MATURIN_VERSION=1.16.0
if ! .venv/bin/python -c "import importlib.metadata as m,sys; sys.exit(0 if m.version('maturin')=='$MATURIN_VERSION' else 1)" 2>/dev/null; then
    echo "setup: installing maturin==$MATURIN_VERSION into .venv (builds the volunteer's wheel)"
    .venv/bin/pip install --quiet --disable-pip-version-check "maturin==$MATURIN_VERSION"
fi
torch_dir=$(.venv/bin/python -c 'import torch,os;print(os.path.dirname(torch.__file__))' 2>/dev/null)
ln -sfn "$torch_dir" .venv/torch

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "setup: installing dataset-fashion-mnist"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
if [ ! -f /usr/share/games/fortunes/fortunes ]; then
    echo "setup: installing fortunes (English text for the language-model demo)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fortunes
fi
if ! command -v chromium >/dev/null 2>&1; then
    echo "setup: installing chromium (the headless browser of the dashboard test)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi
echo "setup: ok (torch $TORCH_VERSION, transformers $TRANSFORMERS_VERSION and maturin $MATURIN_VERSION in .venv, Fashion-MNIST, fortunes, chromium)"
