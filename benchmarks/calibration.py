"""Calibration of the uncertainties on the reference data sets, extrapolation, and MD.

For every set NAME in the data directory (NAME_train.extxyz / NAME_test.extxyz): fit the
default configuration (on a random ``--structures`` of the training structures, with
``--sparse`` sparse environments per species, so that all sets fit in minutes), export it,
and through the exported file (:class:`~acdc_potential.calculator.ACDCCalculator`):

1. **calibration** on the test structures (:func:`~acdc_potential.evaluation.calibration_table`):
   fractions of energies and force components within 1 and 2 predicted standard deviations,
   the rank correlation of per-atom uncertainties with per-atom force errors; a PNG per set;
2. **extrapolation**: the per-atom energy uncertainty of structures away from the data, as
   a multiple of the median of the test atoms: the first test structure compressed by 10 %
   (every set), an O-H bond of it stretched by 0.5 A (sets with O-H bonds: the H atom), and,
   for copper, the first gold test structure with its atoms made copper;
3. **MD**: the largest per-atom energy uncertainty along NVE MD (``--md-steps`` of 0.5 fs from
   the first test structure, velocities at ``--temperature``), against metatomic's default
   warning threshold of 0.1 eV.

usage: python benchmarks/calibration.py [--sets copper,ethanol] [--structures 200] [--sparse 300]
                                        [--out DIR] [--data DIR] [--md-steps 200] [--temperature 300]
"""

import argparse
import dataclasses
import random
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
SETS = ("copper", "gold", "ethanol", "methane", "molecules")
THRESHOLD = 0.1  # eV, metatomic's default per-atom uncertainty warning


def fit_set(name: str, data: Path, out: Path, structures: int, sparse: int, seed: int = 0):
    """Fit the default configuration on ``structures`` random training structures; the exported path."""
    from acdc_potential.config import FitConfig
    from acdc_potential.data import read_structures
    from acdc_potential.fit.driver import fit

    train = read_structures(str(data / f"{name}_train.extxyz"))
    train = random.Random(seed).sample(train, min(structures, len(train)))
    config = FitConfig()
    config = dataclasses.replace(config, sparse=dataclasses.replace(config.sparse, n=sparse))
    start = time.perf_counter()
    model = fit(train, config)
    seconds = time.perf_counter() - start
    path = out / f"{name}.pt"
    model.export(str(path))
    model.save(str(path.with_suffix(".ckpt")))
    return path, model, seconds


def stretched_oh(atoms, length: float = 0.5):
    """A copy of ``atoms`` with the H nearest to an O moved ``length`` A away from it, and that H's index; None without O-H."""
    symbols = atoms.get_chemical_symbols()
    pairs = [(np.linalg.norm(atoms.positions[h] - atoms.positions[o]), o, h) for o, so in enumerate(symbols) if so == "O" for h, sh in enumerate(symbols) if sh == "H"]
    if not pairs:
        return None
    distance, o, h = min(pairs)
    if distance > 1.2:
        return None
    moved = atoms.copy()
    bond = moved.positions[h] - moved.positions[o]
    moved.positions[h] += length * bond / np.linalg.norm(bond)
    return moved, h


def compressed(atoms, factor: float = 0.9):
    moved = atoms.copy()
    if moved.pbc.all():
        moved.set_cell(moved.cell * factor, scale_atoms=True)
    else:
        centre = moved.positions.mean(axis=0)
        moved.positions = centre + factor * (moved.positions - centre)
    return moved


def extrapolation(name: str, calculator, test, data: Path, reference: float):
    """``{probe: largest per-atom uncertainty / reference}`` (the stretched H's own for O-H)."""
    probes = {"compressed 10 %": (compressed(test[0].atoms), None)}
    stretched = stretched_oh(test[0].atoms)
    if stretched is not None:
        probes["O-H + 0.5 A (that H)"] = stretched
    if name == "copper":
        import ase.io

        gold = ase.io.read(str(data / "gold_test.extxyz"), "0")
        gold.set_chemical_symbols(["Cu"] * len(gold))
        probes["gold test structure as Cu"] = (gold, None)
    result = {}
    for probe, (atoms, atom) in probes.items():
        sigma = np.asarray(calculator.get_uncertainty(atoms.copy(), per_atom=True))
        result[probe] = float((sigma[atom] if atom is not None else sigma.max()) / reference)
    return result


def md_largest_uncertainty(path: Path, atoms, steps: int, temperature: float, every: int = 10):
    """Largest per-atom energy uncertainty (eV) along NVE MD from ``atoms``, checked every ``every`` steps."""
    from ase import units
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    from acdc_potential.calculator import ACDCCalculator

    atoms = atoms.copy()
    atoms.calc = ACDCCalculator(str(path), uncertainty_threshold=None)
    thermalize_momenta(atoms, temperature_K=temperature, rng=np.random.default_rng(0))
    dynamics = VelocityVerlet(atoms, 0.5 * units.fs)
    largest = 0.0
    for _ in range(0, steps, every):
        dynamics.run(every)
        largest = max(largest, float(np.max(atoms.calc.get_uncertainty(atoms, per_atom=True))))
    return largest


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--structures", type=int, default=200, help="training structures per set (random)")
    parser.add_argument("--sparse", type=int, default=300, help="sparse environments per species")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default="calibration-benchmark")
    parser.add_argument("--md-steps", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=300.0)
    args = parser.parse_args()

    from acdc_potential.calculator import ACDCCalculator
    from acdc_potential.data import read_structures
    from acdc_potential.evaluation import calibration_plot, calibration_table, format_calibration, predict_with_file, uncertainties_with_file

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables, lines = {}, []
    for name in args.sets.split(","):
        path, model, seconds = fit_set(name, data, out, args.structures, args.sparse)
        test = read_structures(str(data / f"{name}_test.extxyz"))
        calculator = ACDCCalculator(str(path), uncertainty_threshold=None)
        predictions = predict_with_file(calculator, test, progress=False)
        sigmas = uncertainties_with_file(calculator, test, progress=False)
        tables[name] = calibration_table(test, predictions, sigmas)
        calibration_plot(test, predictions, sigmas, str(out / f"{name}-calibration.png"), title=f"{name}: calibration on the test set")
        reference = float(np.median(np.concatenate(sigmas["atoms"])))
        factors = extrapolation(name, calculator, test, data, reference)
        md = md_largest_uncertainty(path, test[0].atoms, args.md_steps, args.temperature)
        calibration = model.calibration
        lines.append(
            f"{name}: fit {seconds:.0f} s, nu_max {model.kernel.nu_max if model.kernel.kind == 'wigner' else '-'}; "
            f"calibration factors: energy {calibration.energy:.3g} on {calibration.structures} held-out structures, forces "
            + ", ".join(f"Z={z} {b:.3g}/A" for z, b in calibration.forces.items())
            + f"; median test atom uncertainty {reference:.3g} eV; extrapolation (largest atom / median test atom): "
            + ", ".join(f"{probe} {factor:.3g}x" for probe, factor in factors.items())
            + f"; NVE MD ({args.md_steps} x 0.5 fs at {args.temperature:g} K): largest atom uncertainty {md:.3g} eV "
            + ("(silent at 0.1 eV)" if md < THRESHOLD else "(ABOVE 0.1 eV: metatomic would warn)")
        )
        print(format_calibration({name: tables[name]}), "\n" + lines[-1], flush=True)
    report = format_calibration(tables) + "\n\n" + "\n".join(lines)
    (out / "calibration.md").write_text(report + "\n")
    print("\n" + report)


if __name__ == "__main__":
    main()
