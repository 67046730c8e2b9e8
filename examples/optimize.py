"""Geometry optimisation with an exported model: BFGS on the atoms, or on atoms and cell.

usage: python examples/optimize.py MODEL.pt STRUCTURE [--cell] [--fmax 0.01] [--output relaxed.extxyz]

With ``--cell`` (periodic structures) the cell relaxes too, through ASE's
FrechetCellFilter, using the model's stress.
"""

import argparse

import ase.io
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS

from acdc_potential.calculator import ACDCCalculator


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("structure", help="first frame of this file is relaxed")
    parser.add_argument("--cell", action="store_true", help="relax the cell too (needs a periodic structure)")
    parser.add_argument("--fmax", type=float, default=0.01, help="eV/A")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--output", default="relaxed.extxyz")
    args = parser.parse_args()

    atoms = ase.io.read(args.structure, index=0)
    atoms.calc = ACDCCalculator(args.model, uncertainty_threshold=None)
    energy = atoms.get_potential_energy()
    target = FrechetCellFilter(atoms) if args.cell else atoms
    converged = BFGS(target, logfile=None).run(fmax=args.fmax, steps=args.steps)
    print(f"{atoms.get_chemical_formula()}: energy {energy:.4f} -> {atoms.get_potential_energy():.4f} eV, "
          f"{'converged' if converged else 'NOT converged'} to fmax {args.fmax} eV/A")
    if args.cell:
        stress = atoms.get_stress()
        print(f"cell lengths {atoms.cell.lengths().round(4)} A, angles {atoms.cell.angles().round(2)} deg, "
              f"largest stress component {1000 * abs(stress).max():.3f} meV/A^3")
    ase.io.write(args.output, atoms)
    print(f"relaxed structure written to {args.output}")


if __name__ == "__main__":
    main()
