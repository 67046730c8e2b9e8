#!/usr/bin/env bash
# Install acdc-potential and its test dependencies into a virtual environment.
# usage: bash scripts/install.sh [VENV_DIR]   (default: .venv)
# torch goes first, as the CPU wheel: a bare `torch` requirement would pull a
# multi-GB CUDA build on a machine without a GPU.
set -euo pipefail
venv="${1:-.venv}"
python3 -m venv "$venv"
source "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
python -c "import acdc_potential, torch; print('acdc-potential', acdc_potential.__version__, 'with torch', torch.__version__)"
