"""Fitting benchmark: acdc-potential against GAP on the reference data sets.

For every set NAME in the data directory (NAME_train.extxyz / NAME_test.extxyz) both
sides are fitted on the training split and evaluated on the test split: MAE and RMSE of
the energy (meV/atom), forces (meV/A) and stress (meV/A^3, periodic sets), the fit's
wall time and peak memory. Each fit runs in its own process, so that the peak memory is
its own: for GAP the resident set of the ``gap_fit`` process, for acdc-potential that of
the process after the fit (reading the data included, predictions excluded).

acdc-potential uses the default configuration (``FitConfig()``); GAP uses the fitting
issue's settings (see ``gap.py``). With ``--gap-dir`` fitted GAP models are kept and
reused (their fit time and memory are those recorded when they were fitted, marked *).

usage: python benchmarks/fit.py [--sets ethanol,copper] [--quick] [--skip-gap] [--skip-ours] [--config YAML]
                                [--gap-dir DIR] [--export-dir DIR] [--data DIR] [--threads N] [--json FILE]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
QUICK = {"train": 100, "test": 50, "sparse": 100}
RESULT_MARK = "RESULT "


def read_split(data: Path, name: str, quick: bool):
    """Training and test structures of set ``name`` (subsampled with ``quick``)."""
    from acdc_potential.data import read_structures
    from gap import subsample

    train = read_structures(str(data / f"{name}_train.extxyz"))
    test = read_structures(str(data / f"{name}_test.extxyz"))
    if quick:
        train, test = subsample(train, QUICK["train"]), subsample(test, QUICK["test"])
    return train, test


def test_errors(test, predictions):
    """``{quantity: {"mae", "rmse", "count"}}`` in meV units (acdc_potential.evaluation)."""
    from acdc_potential.evaluation import errors, pairs_of

    return errors(pairs_of(test, predictions))



def model_tag(args) -> str:
    """File name stem of the models of one set: quick fits never overwrite full ones."""
    return f"{args.set}_quick" if args.quick else args.set


def worker_gap(args):
    import gap

    train, test = read_split(Path(args.data), args.set, args.quick)
    n_sparse = QUICK["sparse"] if args.quick else gap.N_SPARSE
    with tempfile.TemporaryDirectory(prefix="gap_") as scratch:
        record = gap.fit_or_reuse(train, args.gap_dir or scratch, model_tag(args), n_sparse)
        predictions = gap.predict(record["xml"], test)
    return {
        "fit_time": record["fit_time"],
        "peak_memory": record["peak_memory"],
        "reused": record["reused"],
        "errors": test_errors(test, predictions),
        "command": record["command"],
    }


def worker_ours(args):
    from acdc_potential.config import FitConfig
    from acdc_potential.fit.driver import fit
    from acdc_potential.evaluation import predictions_of

    train, test = read_split(Path(args.data), args.set, args.quick)
    config = FitConfig.from_yaml(args.config)
    if args.quick:
        config.sparse.n = QUICK["sparse"]
    start = time.perf_counter()
    model = fit(train, config)
    fit_time = time.perf_counter() - start
    peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if args.export_dir:
        Path(args.export_dir).mkdir(parents=True, exist_ok=True)
        model.export(str(Path(args.export_dir) / f"{model_tag(args)}.pt"))
        model.save(str(Path(args.export_dir) / f"{model_tag(args)}.ckpt"))
    predictions = predictions_of(model, test)
    chosen = {"kernel": model.kernel.kind, "nu_max": getattr(model.kernel, "nu_max", None), "sparse": int(model.kernel.n_sparse)}
    return {"fit_time": fit_time, "peak_memory": peak_memory, "reused": False, "errors": test_errors(test, predictions), **chosen}


def run_worker(method: str, name: str, args) -> dict:
    """Run one fit in a fresh process; its stderr goes to the terminal."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--sets", name, "--data", str(args.data)]
    for flag, value in (("--gap-dir", args.gap_dir), ("--export-dir", args.export_dir), ("--config", args.config)):
        if value:
            command += [flag, str(value)]
    if args.quick:
        command.append("--quick")
    return run_result_process(command, args.threads, f"{name}: {method}")


def run_result_process(command: List[str], threads: Optional[int], label: str) -> dict:
    """Run a worker ``command`` (``OMP_NUM_THREADS=threads`` if given) and return the JSON of
    its last ``RESULT`` line, or ``{"failed": ...}``; its stderr goes to the terminal."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"--- {label}", file=sys.stderr, flush=True)
    finished = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    results = [line[len(RESULT_MARK) :] for line in finished.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if finished.returncode != 0 or not results:
        return {"failed": f"exit code {finished.returncode}"}
    return json.loads(results[-1])


def format_row(name: str, method: str, result: dict) -> str:
    if "failed" in result:
        return f"{name:<9} {method:<6} failed ({result['failed']}; see the messages above)"
    cells = []
    for quantity in ("energy", "forces", "stress"):
        error = result["errors"].get(quantity)
        cells += [f"{error['mae']:>9.3f}", f"{error['rmse']:>9.3f}"] if error else [f"{'-':>9}", f"{'-':>9}"]
    mark = "*" if result.get("reused") else " "
    return (
        f"{name:<9} {method:<6} " + " ".join(cells)
        + f" {result['fit_time']:>9.1f}{mark} {result['peak_memory'] / 1024.0:>8.2f}"
    )


def format_table(rows) -> str:
    header = (
        f"{'set':<9} {'model':<6} {'E MAE':>9} {'E RMSE':>9} {'F MAE':>9} {'F RMSE':>9} {'S MAE':>9} {'S RMSE':>9}"
        f" {'fit (s)':>10} {'mem (GB)':>8}"
    )
    units = f"{'':<16} {'meV/atom':>19} {'meV/A':>19} {'meV/A^3':>19}"
    lines = [header, units, "-" * len(header)]
    lines += [format_row(name, method, result) for name, method, result in rows]
    return "\n".join(lines)


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="ethanol,methane,gold,copper", help="comma-separated set names")
    parser.add_argument("--quick", action="store_true", help="subsample to 100 train / 50 test structures, 100 sparse points")
    parser.add_argument("--skip-gap", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--gap-dir", default=None, help="keep fitted GAP models here and reuse them")
    parser.add_argument("--export-dir", default=None, help="export our fitted models here as NAME.pt and their checkpoints as NAME.ckpt (NAME_quick.* with --quick)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="directory of NAME_train/NAME_test.extxyz")
    parser.add_argument("--config", default=None, help="our fit configuration (YAML, as acdc-potential fit --config); default: the defaults")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the fits (default: inherited)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=["gap", "ours"], help=argparse.SUPPRESS)
    return parser.parse_args()


def main():
    args = parse_arguments()
    sys.path.insert(0, str(HERE))
    if args.worker:
        args.set = args.sets
        result = {"gap": worker_gap, "ours": worker_ours}[args.worker](args)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return
    methods = [m for m, skip in (("ours", args.skip_ours), ("gap", args.skip_gap)) if not skip]
    rows = [(name, method, run_worker(method, name, args)) for name in args.sets.split(",") for method in methods]
    print(format_table(rows))
    if any(result.get("reused") for _, _, result in rows):
        print("* GAP model reused from --gap-dir: fit time and memory as recorded when it was fitted")
    commands = {name: result["command"] for name, method, result in rows if method == "gap" and "command" in result}
    for name, command in commands.items():
        print(f"gap_fit ({name}): {command}")
    chosen = [f"{name} {result['nu_max']}" for name, method, result in rows if method == "ours" and result.get("nu_max")]
    if chosen:
        print("ours: Wigner kernel nu_max used (chosen on held-out structures under nu_max: auto): " + ", ".join(chosen))
    if args.json:
        Path(args.json).write_text(json.dumps([{"set": n, "model": m, **r} for n, m, r in rows], indent=1))


if __name__ == "__main__":
    main()
