#!/usr/bin/env bash
# i-PI with its metatomic driver running an exported acdc-potential model.
# usage: bash examples/ipi/run.sh MODEL.pt [RESULTS_DIR]
#   (needs `pip install -e .[examples]`, which installs ipi==3.3.1)
# Everything runs in a fresh temporary folder (mktemp -d), whose path is printed at the end;
# with RESULTS_DIR, the outputs (ethanol.out, ethanol.pos_0.xyz, ipi.log, driver.log) are also
# copied there. Nothing is written into the source tree.
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: bash $0 MODEL.pt [RESULTS_DIR]" >&2
    exit 2
fi
model="$(realpath "$1")"
results="${2:-}"
here="$(cd "$(dirname "$0")" && pwd)"
timeout_s="${IPI_SOCKET_TIMEOUT:-120}"   # seconds to wait for i-PI to open its socket
work="$(mktemp -d "${TMPDIR:-/tmp}/acdc-ipi.XXXXXX")"
cd "$work"

# i-PI creates the UNIX socket at sockets_prefix + address; keep it inside the work folder,
# unless that path is too long for a UNIX socket (108 bytes), then use i-PI's default /tmp/ipi_
address="acdc-potential-ethanol"
prefix="$work/"
if [ $(( ${#prefix} + ${#address} )) -gt 100 ]; then
    prefix="/tmp/ipi_"
    address="acdc-potential-$(basename "$work")"
fi
socket="$prefix$address"
sed -e "s|<simulation verbosity='low'>|<simulation verbosity='low' sockets_prefix='$prefix'>|" \
    -e "s|<address>acdc-potential-ethanol</address>|<address>$address</address>|" \
    "$here/input.xml" > input.xml

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

i-pi input.xml > ipi.log 2>&1 &
server=$!
cleanup() {
    if kill -0 "$server" 2>/dev/null; then kill "$server" 2>/dev/null || true; fi
    if [ "$prefix" = "/tmp/ipi_" ]; then rm -f "$socket"; fi
}
trap cleanup EXIT

# wait for the server's socket instead of a fixed sleep
waited=0
until [ -S "$socket" ]; do
    if ! kill -0 "$server" 2>/dev/null; then
        echo "error: i-PI exited before opening its socket $socket; the end of $work/ipi.log:" >&2
        tail -n 20 ipi.log >&2
        exit 1
    fi
    if [ "$waited" -ge $(( timeout_s * 10 )) ]; then
        echo "error: i-PI did not open its socket $socket within ${timeout_s} s (see $work/ipi.log)" >&2
        exit 1
    fi
    sleep 0.1
    waited=$(( waited + 1 ))
done

OMP_NUM_THREADS=1 i-pi-py_driver -m metatomic -u -S "$prefix" -a "$address" \
    -o template=template.xyz,model="$model" > driver.log 2>&1 \
    || { echo "error: the driver failed; the end of $work/driver.log:" >&2; tail -n 20 driver.log >&2; exit 1; }
if ! wait "$server"; then
    echo "error: i-PI failed; the end of $work/ipi.log:" >&2
    tail -n 20 ipi.log >&2
    exit 1
fi

grep '^#' ethanol.out
tail -n 3 ethanol.out
echo "outputs in $work"
if [ -n "$results" ]; then
    mkdir -p "$results"
    cp ethanol.out ethanol.pos_0.xyz ipi.log driver.log "$results/"
    echo "copied ethanol.out, ethanol.pos_0.xyz, ipi.log and driver.log to $(realpath "$results")"
fi
