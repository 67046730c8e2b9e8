"""MD cost: acdc-potential against GAP, in microseconds per atom per step, through ASE.

Velocity-Verlet steps (one energy + forces evaluation each; the fastest of ``--blocks``
blocks of ``--steps`` steps is reported, and the median) on three systems: an ethanol
molecule (the first structure of the ethanol test set), ``ethanol3``, three copies of it
3.5 A apart (27 atoms, the size of aspirin; each molecule within the others' cutoff) and a
500-atom fcc Cu cell (5x5x5 cubic cells, a = 3.6 A, rattled). Both models run on the same
structures in the same run, for every thread count of ``--threads``; ours through
``acdc_potential.calculator.ACDCCalculator`` (the exported file), with the uncertainty check
off so that only energy and forces are computed, and with ``--uncertainty`` also with the
per-atom ``energy_uncertainty`` requested at every step (as LAMMPS's ``pair_style
metatomic`` does by default), GAP through quippy's ``Potential``. Each (model, system,
threads) triple runs in its own process; the table gives ours / GAP for the same system
and thread count.

Models: ``--model-ethanol`` / ``--model-copper`` exported ``.pt`` files; without them a
model is fitted now with the default configuration on a subset of the training set
(``--fit-structures``) and exported. GAP models come from ``--gap-dir`` (``ethanol.xml``,
``copper.xml``, as written by ``benchmarks/fit.py --gap-dir``); missing ones are fitted
there with the fitting issue's settings on ``--gap-structures`` training structures (default
all, which takes tens of minutes; a GAP's cost per step depends on its descriptor and its
sparse points, 1000 per species, not on the number of structures it was fitted on).

usage: python benchmarks/md.py [--model-ethanol X.pt] [--model-copper Y.pt] [--gap-dir DIR] [--gap-structures N]
                               [--systems ethanol,ethanol3,cu500] [--steps 30] [--blocks 3] [--skip-gap]
                               [--skip-ours] [--threads 1,2] [--uncertainty]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fit import RESULT_MARK, run_result_process

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
SYSTEMS = {"ethanol": "ethanol", "ethanol3": "ethanol", "cu500": "copper"}


def copper_cell(n: int = 5):
    """``n x n x n`` cubic fcc Cu cells (a = 3.6 A, ``4 n^3`` atoms), rattled by 0.05 A (seed 0)."""
    import ase.build

    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True) * (n, n, n)
    atoms.rattle(0.05, seed=0)
    return atoms


def structure(system: str, data: Path):
    """The ``ase.Atoms`` timed for ``system``: one of :data:`SYSTEMS`, or the name of another data set
    in ``data`` (its largest test structure)."""
    import ase.io

    if system == "cu500":
        return copper_cell(5)
    if system not in SYSTEMS:
        # any other data set: its largest test structure
        test = ase.io.read(str(data / f"{system}_test.extxyz"), index=":")
        atoms = max(test, key=len)
        atoms.info = {}
        atoms.calc = None
        return atoms
    molecule = ase.io.read(str(data / "ethanol_test.extxyz"), index=0)
    if system == "ethanol3":
        copies = []
        for k in range(3):
            copy = molecule.copy()
            copy.positions += [3.5 * k, 0.0, 0.0]
            copies.append(copy)
        molecule = copies[0] + copies[1] + copies[2]
    molecule.info = {}
    molecule.calc = None
    return molecule


def fit_and_export(dataset: str, data: Path, n_structures: int, path: Path) -> None:
    """Fit the default configuration on ``n_structures`` training structures of ``dataset`` and export it."""
    from acdc_potential.config import FitConfig
    from acdc_potential.fit.driver import fit
    from acdc_potential.data import read_structures
    from gap import subsample

    train = subsample(read_structures(str(data / f"{dataset}_train.extxyz")), n_structures)
    fit(train, FitConfig()).export(str(path))


def our_model(dataset: str, args) -> str:
    """Path of our exported model for ``dataset``: the one given, or one fitted now."""
    given = getattr(args, f"model_{dataset}")
    if given:
        return given
    path = Path(args.work_dir) / f"{dataset}.pt"
    if not path.is_file():
        print(f"fitting our {dataset} model on {args.fit_structures} structures", file=sys.stderr, flush=True)
        fit_and_export(dataset, Path(args.data), args.fit_structures, path)
    return str(path)


def gap_model(dataset: str, args) -> str:
    """Path of the GAP xml for ``dataset`` in ``--gap-dir``, fitted there if missing."""
    import gap
    from acdc_potential.data import read_structures

    gap_dir = args.gap_dir or args.work_dir
    xml = Path(gap_dir) / f"{dataset}.xml"
    if xml.is_file():
        return str(xml)
    train = gap.subsample(read_structures(str(Path(args.data) / f"{dataset}_train.extxyz")), args.gap_structures)
    print(f"fitting GAP for {dataset} ({len(train)} training structures) in {gap_dir}", file=sys.stderr, flush=True)
    return gap.fit_or_reuse(train, gap_dir, dataset)["xml"]


def worker(args) -> dict:
    """Time one (model, system) pair; the model file is given on the command line."""
    import gap

    atoms = structure(args.system, Path(args.data))
    if args.worker == "gap":
        atoms = gap.boxed(atoms)
        calc = gap.calculator(args.model)
    else:
        from acdc_potential.calculator import ACDCCalculator

        # a threshold makes the calculator request the per-atom uncertainty at every step
        calc = ACDCCalculator(args.model, uncertainty_threshold=1e9 if args.worker == "ours+unc" else None, threads=args.threads)
    return gap.time_md(atoms, calc, steps=args.steps, blocks=args.blocks)


def run_worker(method: str, system: str, model: str, threads: int, args) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", method, "--system", system, "--threads", str(threads),
        "--model", model, "--steps", str(args.steps), "--blocks", str(args.blocks), "--data", str(args.data),
    ]
    return run_result_process(command, threads, f"{system}: {method}, {threads} thread(s)")


def format_table(rows, args) -> str:
    """us/atom/step of the fastest block of steps, the median over blocks, and ours / GAP."""
    gap_cost = {(s, t): r["us_per_atom_step"] for s, m, t, _, r in rows if m == "gap" and "failed" not in r}
    header = f"{'system':<9} {'model':<9} {'threads':>7} {'atoms':>6} {'steps':>9} {'us/atom/step':>13} {'median':>9} {'/ GAP':>6}  file"
    lines = [header, "-" * len(header)]
    for system, method, threads, model, result in rows:
        if "failed" in result:
            lines.append(f"{system:<9} {method:<9} {threads:>7d} failed ({result['failed']}; see the messages above)")
            continue
        ratio = result["us_per_atom_step"] / gap_cost[system, threads] if (system, threads) in gap_cost else float("nan")
        lines.append(
            f"{system:<9} {method:<9} {threads:>7d} {result['n_atoms']:>6d} {args.blocks:>3d}x{result['steps']:<5d}"
            f" {result['us_per_atom_step']:>13.1f} {result['median_us_per_atom_step']:>9.1f} {ratio:>6.2f}  {model}"
        )
    return "\n".join(lines)


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-ethanol", default=None, help="our exported model for ethanol")
    parser.add_argument("--model-copper", default=None, help="our exported model for copper")
    parser.add_argument("--gap-dir", default=None, help="directory of ethanol.xml / copper.xml (fitted there if missing)")
    parser.add_argument("--work-dir", default=None, help="where models fitted on the fly go (default: a temporary directory)")
    parser.add_argument("--fit-structures", type=int, default=200, help="training structures of on-the-fly fits of ours")
    parser.add_argument("--steps", type=int, default=30, help="MD steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per run (the fastest is reported)")
    parser.add_argument("--systems", default="ethanol,ethanol3,cu500", help="comma-separated: ethanol, ethanol3, cu500, or a data set's name (its largest test structure)")
    parser.add_argument("--gap-structures", type=int, default=None, help="training structures of GAP fits made here (default: all)")
    parser.add_argument("--uncertainty", action="store_true", help="also time ours with the per-atom uncertainty requested")
    parser.add_argument("--skip-gap", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="directory of the reference data sets")
    parser.add_argument("--threads", default="1", help="comma-separated thread counts of the runs (default 1)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=["gap", "ours", "ours+unc"], help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser.parse_args()


def main():
    args = parse_arguments()
    sys.path.insert(0, str(HERE))
    if args.worker:
        args.threads = int(args.threads)
        print(RESULT_MARK + json.dumps(worker(args)), flush=True)
        return
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="md_bench_")
    providers = [(m, f) for m, f, skip in (("ours", our_model, args.skip_ours), ("gap", gap_model, args.skip_gap)) if not skip]
    if args.uncertainty and not args.skip_ours:
        providers.insert(1, ("ours+unc", our_model))
    rows = []
    for system in args.systems.split(","):
        for method, provider in providers:
            try:
                model = provider(SYSTEMS.get(system, system), args)
            except Exception as error:
                print(f"{system} {method}: no model ({type(error).__name__}: {error})", file=sys.stderr)
                rows.append((system, method, 0, "-", {"failed": f"no model: {type(error).__name__}"}))
                continue
            for threads in [int(t) for t in args.threads.split(",")]:
                rows.append((system, method, threads, model, run_worker(method, system, model, threads, args)))
    print(format_table(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps([{"system": s, "model": m, "threads": t, "file": f, **r} for s, m, t, f, r in rows], indent=1))


if __name__ == "__main__":
    main()
