#!/usr/bin/env bash
# The main job: install, fit a potential on the bundled ethanol example (200 training
# structures, 100 test structures), print its errors, then run 500 steps of NVE molecular
# dynamics with the exported file and print the energy drift.
# usage: bash scripts/quickstart.sh [VENV_DIR]   (default: .venv; outputs go to quickstart/)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
if [ ! -x "$venv/bin/acdc-potential" ]; then
    bash scripts/install.sh "$venv"
fi
source "$venv/bin/activate"
mkdir -p quickstart
acdc-potential fit examples/ethanol_train.extxyz -o quickstart/ethanol.pt \
    --test examples/ethanol_test.extxyz --config examples/ethanol.yaml
python examples/md_nve.py quickstart/ethanol.pt --steps 500 --timestep 0.5
