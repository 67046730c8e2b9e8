"""The floors of feature models (``kernel.norm_floor``): test errors against the floor on every set, and a
Cu dimer pulled through the cutoff.

For every set NAME of the data directory and every floor, a feature model (``--kind``: ``polynomial`` or
``mpacdc``, everything else default) is fitted on 100 random training structures with 100 sparse
environments per species, without tuning (the default regularisers) and without stress, and tested
on 50 random test structures (both drawn by one numpy generator of seed 0, training first): energy MAE per atom and force MAE, one JSON line per fit. With ``--dimer``,
the copper model of each floor (40 training structures) is also evaluated on a Cu dimer between
``r_cut - 1`` and ``r_cut + 0.05`` A: the energy difference between ``r_cut -/+ 1e-7`` A (the jump when
each atom loses its last neighbour), the largest force along the scan and the largest difference between
the force and a finite difference of the scan's energies.

usage: python benchmarks/floors.py [--kind polynomial] [--sets copper,gold,methane,ethanol,molecules]
                                   [--floors 0,0.1,0.3,1,2,5] [--dimer] [--data DIR]
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import ase
import ase.io
import numpy as np

from acdc_potential.config import FitConfig
from acdc_potential.data import labels_of
from acdc_potential.fit.driver import fit

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def sample(path: Path, n: int, generator: np.random.Generator) -> list:
    """``n`` random structures of ``path``."""
    frames = ase.io.read(str(path), ":")
    return [frames[i] for i in generator.permutation(len(frames))[:n]]


def quick_fit(structures: list, kind: str, floor: float):
    config = FitConfig.from_dict({"kernel": {"type": kind, "norm_floor": floor}, "sparse": {"n": 100}, "options": {"tune": False, "stress": False}})
    return fit([labels_of(atoms) for atoms in structures], config)


def test_errors(model, test: list) -> dict:
    """Energy MAE per atom (meV/atom) and force MAE (meV/A) on ``test``."""
    predicted = model.predict(test, stress=False)
    n = np.array([len(atoms) for atoms in test])
    energies = np.array([atoms.get_potential_energy() for atoms in test])
    forces = np.concatenate([atoms.get_forces() for atoms in test])
    return {
        "E_mae": float(np.mean(np.abs(predicted["energy"].numpy() - energies) / n) * 1000),
        "F_mae": float(np.mean(np.abs(predicted["forces"].numpy() - forces)) * 1000),
    }


def dimer_scan(model) -> dict:
    """The Cu dimer through the cutoff: the jump there (eV), the largest force (eV/A) and the largest
    difference between forces and finite differences of the energies (eV/A) along the scan."""
    cutoff = model.density_hypers.cutoff

    def dimers(distances):
        return [ase.Atoms("Cu2", positions=[[0.0, 0.0, 0.0], [r, 0.0, 0.0]]) for r in distances]

    sides = model.predict(dimers([cutoff - 1e-7, cutoff + 1e-7]), forces=False, stress=False)["energy"].numpy()
    distances = np.linspace(cutoff - 1.0, cutoff + 0.05, 2101)
    scan = model.predict(dimers(distances), stress=False)
    energies, forces = scan["energy"].numpy(), scan["forces"].numpy().reshape(len(distances), 2, 3)[:, 1, 0]
    differences = -np.gradient(energies, distances)
    return {
        "jump": float(sides[1] - sides[0]),
        "max_force": float(np.abs(forces).max()),
        "at": float(distances[np.argmax(np.abs(forces))]),
        "force_minus_difference": float(np.abs(forces - differences)[2:-2].max()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="polynomial", choices=["polynomial", "mpacdc"])
    parser.add_argument("--sets", default="copper,gold,methane,ethanol,molecules")
    parser.add_argument("--floors", default="0,0.1,0.3,1,2,5")
    parser.add_argument("--dimer", action="store_true", help="also the Cu dimer scan of copper models of 40 structures")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    floors = [float(f) for f in args.floors.split(",")]
    data = Path(args.data)
    for name in args.sets.split(","):
        generator = np.random.default_rng(0)
        train = sample(data / f"{name}_train.extxyz", 100, generator)
        test = sample(data / f"{name}_test.extxyz", 50, generator)
        for floor in floors:
            start = time.perf_counter()
            model = quick_fit(train, args.kind, floor)
            result = {"set": name, "kind": args.kind, "floor": floor, **test_errors(model, test), "seconds": round(time.perf_counter() - start)}
            print(json.dumps(result), flush=True)
    if args.dimer:
        train = ase.io.read(str(data / "copper_train.extxyz"), ":40")
        for floor in floors:
            model = quick_fit(train, args.kind, floor)
            print(json.dumps({"dimer": args.kind, "floor": floor, "floors": model.kernel.floors, **dimer_scan(model)}), flush=True)


if __name__ == "__main__":
    main()
