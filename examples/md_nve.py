"""NVE molecular dynamics with an exported model, reporting energy conservation.

usage: python examples/md_nve.py MODEL.pt [--structure examples/ethanol_test.extxyz]
       [--steps 1000] [--timestep 0.5] [--temperature 300]

Velocity Verlet in the microcanonical ensemble: with forces that are the exact
gradient of a smooth energy, the total energy drifts only by the integrator's error.
The drift is the slope of a straight-line fit to the total energy per atom.
"""

import argparse
import time

import ase.io
import numpy as np
import torch
from ase import units
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
from ase.md.verlet import VelocityVerlet

from acdc_potential.calculator import ACDCCalculator


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, help="torch threads (default: 1 below 100 atoms, where threads cost more than they give)")
    parser.add_argument("--structure", default="examples/ethanol_test.extxyz", help="first frame of this file is the start")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K, of the initial velocities")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    atoms = ase.io.read(args.structure, index=0)
    torch.set_num_threads(args.threads or (1 if len(atoms) < 100 else torch.get_num_threads()))
    atoms.calc = ACDCCalculator(args.model, uncertainty_threshold=None)
    thermalize_momenta(atoms, temperature_K=args.temperature, rng=np.random.default_rng(args.seed))
    Stationary(atoms)
    if not any(atoms.pbc):
        ZeroRotation(atoms)

    dynamics = VelocityVerlet(atoms, timestep=args.timestep * units.fs)
    totals, temperatures = [], []

    def record():
        totals.append(atoms.get_total_energy())
        temperatures.append(atoms.get_temperature())

    dynamics.attach(record, interval=1)
    start = time.perf_counter()
    dynamics.run(args.steps)
    elapsed = time.perf_counter() - start

    n = len(atoms)
    totals = np.array(totals) / n
    times_ps = np.arange(len(totals)) * args.timestep / 1000
    slope = np.polyfit(times_ps, totals, 1)[0]
    print(f"NVE: {args.steps} steps of {args.timestep} fs on {atoms.get_chemical_formula()} ({n} atoms), {elapsed:.1f} s "
          f"({1e6 * elapsed / args.steps / n:.0f} us/atom/step)")
    print(f"mean temperature {np.mean(temperatures):.0f} K")
    print(f"total energy: drift {1000 * slope:.4f} meV/atom/ps, "
          f"change over the run {1000 * (totals[-1] - totals[0]):.4f} meV/atom, "
          f"largest excursion {1000 * (totals.max() - totals.min()):.4f} meV/atom")


if __name__ == "__main__":
    main()
