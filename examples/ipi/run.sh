#!/usr/bin/env bash
# i-PI with its metatomic driver running an exported acdc-potential model.
# usage: bash examples/ipi/run.sh MODEL.pt   (needs `pip install ipi`; outputs in examples/ipi/run/)
set -euo pipefail
model="$(realpath "$1")"
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$here/run" && cd "$here/run"
cp "$here/input.xml" .
# the first test structure, in i-PI's xyz flavour (a cell is required; pbc is off in input.xml)
python - "$here/../ethanol_test.extxyz" <<'PY'
import sys, ase.io
atoms = ase.io.read(sys.argv[1], 0)
with open("init.xyz", "w") as f:
    f.write(f"{len(atoms)}\n# CELL(abcABC): 30.0 30.0 30.0 90.0 90.0 90.0 cell{{angstrom}} positions{{angstrom}}\n")
    for symbol, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions):
        f.write(f"{symbol} {x:.8f} {y:.8f} {z:.8f}\n")
ase.io.write("template.xyz", atoms)
PY
rm -f /tmp/ipi_acdc-potential-ethanol
i-pi input.xml > ipi.log &
server=$!
sleep 5
OMP_NUM_THREADS=1 i-pi-py_driver -m metatomic -u -a acdc-potential-ethanol -o template=template.xyz,model="$model" > driver.log 2>&1
wait "$server"
tail -n 3 ethanol.out
