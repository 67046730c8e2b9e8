"""Langevin (NVT) molecular dynamics with an exported model.

usage: python examples/md_nvt.py MODEL.pt [--structure examples/ethanol_test.extxyz]
       [--steps 2000] [--timestep 0.5] [--temperature 500] [--friction 0.01] [--trajectory nvt.traj]
"""

import argparse
import time

import ase.io
import numpy as np
import torch
from ase import units
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

from acdc_potential.calculator import ACDCCalculator


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, help="torch threads (default: 1 below 100 atoms, where threads cost more than they give)")
    parser.add_argument("--structure", default="examples/ethanol_test.extxyz")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--temperature", type=float, default=500.0, help="K")
    parser.add_argument("--friction", type=float, default=0.01, help="1/fs")
    parser.add_argument("--trajectory", default="nvt.traj")
    args = parser.parse_args()

    atoms = ase.io.read(args.structure, index=0)
    torch.set_num_threads(args.threads or (1 if len(atoms) < 100 else torch.get_num_threads()))
    atoms.calc = ACDCCalculator(args.model)
    thermalize_momenta(atoms, temperature_K=args.temperature, rng=np.random.default_rng(0))
    dynamics = Langevin(
        atoms, args.timestep * units.fs, temperature_K=args.temperature, friction=args.friction / units.fs,
        trajectory=args.trajectory, loginterval=10, rng=np.random.default_rng(1),
    )
    temperatures = []
    dynamics.attach(lambda: temperatures.append(atoms.get_temperature()), interval=10)
    start = time.perf_counter()
    dynamics.run(args.steps)
    elapsed = time.perf_counter() - start
    second_half = temperatures[len(temperatures) // 2 :]
    print(f"NVT: {args.steps} steps in {elapsed:.1f} s; temperature over the second half "
          f"{np.mean(second_half):.0f} +- {np.std(second_half):.0f} K (target {args.temperature:.0f} K); "
          f"trajectory in {args.trajectory}")


if __name__ == "__main__":
    main()
