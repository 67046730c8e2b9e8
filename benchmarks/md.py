"""MD cost: acdc-potential against GAP, in microseconds per atom per step, through ASE.

Velocity-Verlet steps (one energy + forces evaluation each; the fastest of ``--blocks``
blocks of ``--steps`` steps is reported, and the median) on two systems: an ethanol
molecule (the first structure of the ethanol test set) and a 500-atom fcc Cu cell (5x5x5
cubic cells, a = 3.6 A, rattled). Both models run on the same structures in the same
run; ours through ``acdc_potential.calculator.ACDCCalculator`` (the exported file, with
the uncertainty check off so that only energy and forces are computed), GAP through
quippy's ``Potential``. Each (model, system) pair runs in its own process.

Models: ``--model-ethanol`` / ``--model-copper`` exported ``.pt`` files; without them a
model is fitted now with the default configuration on a subset of the training set
(``--fit-structures``) and exported. GAP models come from ``--gap-dir`` (``ethanol.xml``,
``copper.xml``, as written by ``benchmarks/fit.py --gap-dir``); missing ones are fitted
there with the fitting issue's settings on the full training set, which takes minutes.

usage: python benchmarks/md.py [--model-ethanol X.pt] [--model-copper Y.pt] [--gap-dir DIR]
                               [--steps 30] [--blocks 3] [--skip-gap] [--skip-ours] [--threads N]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fit import RESULT_MARK, run_result_process

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
SYSTEMS = {"ethanol": "ethanol", "cu500": "copper"}


def structure(system: str, data: Path):
    """The ``ase.Atoms`` timed for ``system`` (``ethanol`` or ``cu500``)."""
    import ase.build
    import ase.io

    if system == "cu500":
        atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True) * (5, 5, 5)
        atoms.rattle(0.05, seed=0)
        return atoms
    return ase.io.read(str(data / "ethanol_test.extxyz"), index=0)


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
    print(f"fitting GAP for {dataset} (full training set) in {gap_dir}", file=sys.stderr, flush=True)
    train = read_structures(str(Path(args.data) / f"{dataset}_train.extxyz"))
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

        calc = ACDCCalculator(args.model, uncertainty_threshold=None)
    return gap.time_md(atoms, calc, steps=args.steps, blocks=args.blocks)


def run_worker(method: str, system: str, model: str, args) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", method, "--system", system,
        "--model", model, "--steps", str(args.steps), "--blocks", str(args.blocks), "--data", str(args.data),
    ]
    return run_result_process(command, args.threads, f"{system}: {method}")


def format_table(rows, args) -> str:
    """us/atom/step of the fastest block of steps, and the median over blocks."""
    header = f"{'system':<8} {'model':<6} {'atoms':>6} {'steps':>9} {'us/atom/step':>13} {'median':>9}  file"
    lines = [header, "-" * len(header)]
    for system, method, model, result in rows:
        if "failed" in result:
            lines.append(f"{system:<8} {method:<6} failed ({result['failed']}; see the messages above)")
        else:
            lines.append(
                f"{system:<8} {method:<6} {result['n_atoms']:>6d} {args.blocks:>3d}x{result['steps']:<5d}"
                f" {result['us_per_atom_step']:>13.1f} {result['median_us_per_atom_step']:>9.1f}  {model}"
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
    parser.add_argument("--systems", default="ethanol,cu500", help="comma-separated: ethanol, cu500")
    parser.add_argument("--skip-gap", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="directory of the reference data sets")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: inherited)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=["gap", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser.parse_args()


def main():
    args = parse_arguments()
    sys.path.insert(0, str(HERE))
    if args.worker:
        print(RESULT_MARK + json.dumps(worker(args)), flush=True)
        return
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="md_bench_")
    providers = [(m, f) for m, f, skip in (("ours", our_model, args.skip_ours), ("gap", gap_model, args.skip_gap)) if not skip]
    rows = []
    for system in args.systems.split(","):
        for method, provider in providers:
            try:
                model = provider(SYSTEMS[system], args)
            except Exception as error:
                print(f"{system} {method}: no model ({type(error).__name__}: {error})", file=sys.stderr)
                rows.append((system, method, "-", {"failed": f"no model: {type(error).__name__}"}))
                continue
            rows.append((system, method, model, run_worker(method, system, model, args)))
    print(format_table(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps([{"system": s, "model": m, "file": f, **r} for s, m, f, r in rows], indent=1))


if __name__ == "__main__":
    main()
