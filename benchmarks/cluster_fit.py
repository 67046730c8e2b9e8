"""Fitting on a Dask cluster against the fit in one process: time, memory, same weights.

Generates (once; cached in ``benchmarks/.cache/``) a copper data set labelled by ASE's EMT:
fcc cells of 32, 48, 72 and 108 atoms, strained by up to 4 % and rattled at random, with
energies, forces and stresses. Then fits the same model three ways, each in its own process
so that peak memories are their own: in one process, on a local Dask cluster of 1 worker, and
of 2 workers. Prints, for each: wall time, the driver's peak resident memory, each worker's,
the time of each step, and the largest relative difference of the weights from the fit in one
process; then an estimate, from the measured per-task costs, of a fit of 100,000 structures on
a 64-worker cluster.

The settings (``--sparse`` per species, ``--nu-max``, ``--cutoff`` A, ``--max-radial``,
``--design-memory`` GB, ``--task-memory`` GB) keep the three fits within minutes each on a 2-core
machine while making the run stream: the tuning sees a sample of the structures, the others' rows
go to the final solve in tasks. They measure the distribution, not the best copper model.

usage: python benchmarks/cluster_fit.py [--structures 3000] [--sparse 100] [--nu-max 2] [--cutoff 4.0]
                                        [--max-radial 6] [--design-memory 0.25] [--task-memory 0.1]
                                        [--modes inprocess,1,2]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULT_MARK = "RESULT "
SIZES = ((2, 2, 2), (2, 2, 3), (2, 3, 3), (3, 3, 3))  # 4-atom cubic cells repeated: 32, 48, 72, 108 atoms


def make_data(n: int, seed: int = 0) -> Path:
    """``n`` EMT copper structures (cached by ``n`` and ``seed``)."""
    import ase.build
    import ase.io
    import numpy as np
    from ase.calculators.emt import EMT

    path = CACHE / f"copper_emt_{n}_{seed}.extxyz"
    if path.exists():
        return path
    CACHE.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat(SIZES[k % len(SIZES)])
        strain = np.eye(3) + 0.04 * (rng.random((3, 3)) - 0.5)
        atoms.set_cell(atoms.cell.array @ (0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.positions += rng.normal(scale=rng.uniform(0.02, 0.15), size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        frames.append(atoms)
    partial = path.with_suffix(".tmp")
    ase.io.write(str(partial), frames, format="extxyz")
    os.replace(partial, path)
    return path


def config_of(args):
    from acdc_potential.config import FitConfig

    return FitConfig.from_dict({
        "density": {"cutoff": args.cutoff, "max_radial": args.max_radial},
        "kernel": {"nu_max": args.nu_max},
        "sparse": {"n": args.sparse},
        "options": {"design_memory": args.design_memory, "tune_sparse": 0},
        "cluster": {"task_memory": args.task_memory},
    })


def run_mode(args) -> dict:
    """One fit (in this process), as ``args.mode`` says; the measurements as a dict."""
    import torch

    from acdc_potential.fit.driver import fit
    from acdc_potential.fit.executors import DaskExecutor, InProcess
    from acdc_potential.fit.report import FitLog
    from acdc_potential.fit.sources import ExtxyzSource

    torch.set_num_threads(1)  # as each worker: the same rounding everywhere
    source = ExtxyzSource(args.data)
    log = FitLog(verbose=False)
    start = time.perf_counter()
    workers = {}
    if args.mode == "inprocess":
        executor = InProcess()
    else:
        executor = DaskExecutor(workers=int(args.mode))
    with executor:
        model = fit(source, config_of(args), log=log, executor=executor)
        seconds = time.perf_counter() - start
        if args.mode != "inprocess":
            peaks = executor.client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
            workers = {address: round(peak, 3) for address, peak in peaks.items()}
    torch.save(model.weights, args.weights)
    groups, rows = plan(source, model, config_of(args))
    return {
        "sample": len(groups[0]), "row_bytes_per_structure": rows,
        "mode": args.mode, "seconds": round(seconds, 1), "driver_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "workers_gb": workers, "stages": {name: round(value, 1) for name, value in log.timings.items()},
        "sparse": int(model.kernel.n_sparse), "structures": len(source),
    }


def plan(source, model, config):
    """The groups of the fit (the first is the tuning sample) and the mean design bytes per structure."""
    from acdc_potential.fit.design import design_bytes, design_groups
    from acdc_potential.fit.driver import survey_source
    from acdc_potential.fit.executors import InProcess

    rows = survey_source(source, InProcess()).row_counts(True, True, True)
    groups = design_groups(rows, model.kernel.n_pieces, model.kernel.n_sparse, config.options.design_memory * 1e9, config.options.seed)
    return groups, design_bytes(rows.mean(), model.kernel.n_pieces, model.kernel.n_sparse)


def merge_seconds(m: int) -> float:
    """Seconds of one merge of two ``[m + 1, m + 1]`` triangles (one thread, best of 3)."""
    import torch

    from acdc_potential.fit.solver import merge_triangles

    torch.set_num_threads(1)
    a = torch.linalg.qr(torch.randn(m + 1, m + 1, dtype=torch.float64), mode="r")[1]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        merge_triangles(a, a)
        best = min(best, time.perf_counter() - start)
    return best


def estimate(results: dict, args) -> str:
    """Hours of a fit of 100,000 structures on 64 workers, from the 1-worker run's per-structure cost."""
    import math

    one = results.get("1") or next(iter(results.values()))
    streamed = one["structures"] - one["sample"]
    per_structure = one["stages"].get("solve", 0.0) / max(streamed, 1)
    fixed = sum(v for k, v in one["stages"].items() if k not in ("solve", "survey"))
    survey = one["stages"].get("survey", 0.0) / one["structures"]
    n, workers = 100_000, 64
    tasks = math.ceil(n * one["row_bytes_per_structure"] / (args.task_memory * 1e9))
    levels = math.ceil(math.log2(max(tasks, 2)))
    merge = merge_seconds(one["sparse"])
    total = fixed + n * survey / workers + n * per_structure / workers + levels * merge
    return (
        f"estimate for {n} structures of the same kind on {workers} workers (one thread each), from the run on "
        f"{'1 worker' if '1' in results else one['mode']}: {fixed:.0f} s on the driver and the sample (radial integrals, "
        f"sparse selection, the tuning sample's rows and the tuning, bounded by design_memory: measured) + {n} x "
        f"{survey * 1e3:.2f} ms of survey / {workers} + {n} x {per_structure:.3f} s of rows / {workers} + {levels} merge levels "
        f"({tasks} tasks) x {merge:.2f} s per merge of [{one['sparse'] + 1}]^2 triangles = {total / 3600:.2f} h "
        "(scheduling overheads and reading from a shared file system not included)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structures", type=int, default=3000)
    parser.add_argument("--sparse", type=int, default=100)
    parser.add_argument("--nu-max", type=int, default=2)
    parser.add_argument("--cutoff", type=float, default=4.0)
    parser.add_argument("--max-radial", type=int, default=6)
    parser.add_argument("--design-memory", type=float, default=0.25)
    parser.add_argument("--task-memory", type=float, default=0.1)
    parser.add_argument("--modes", default="inprocess,1,2")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(RESULT_MARK + json.dumps(run_mode(args)), flush=True)
        return

    import torch

    data = make_data(args.structures)
    print(f"data: {data} ({args.structures} EMT copper structures of 32-108 atoms)")
    results, weights = {}, {}
    for mode in args.modes.split(","):
        out = CACHE / f"weights_{mode}.pt"
        command = [sys.executable, __file__, "--mode", mode, "--data", str(data), "--weights", str(out),
                   "--sparse", str(args.sparse), "--nu-max", str(args.nu_max), "--cutoff", str(args.cutoff),
                   "--max-radial", str(args.max_radial), "--design-memory", str(args.design_memory),
                   "--task-memory", str(args.task_memory)]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
        if done.returncode != 0 or not lines:
            print(done.stdout[-2000:], done.stderr[-4000:])
            raise SystemExit(f"mode {mode} failed")
        results[mode] = json.loads(lines[-1][len(RESULT_MARK):])
        weights[mode] = torch.load(out, weights_only=True)
        print(f"{mode}: {results[mode]}", flush=True)

    reference = weights.get("inprocess")
    print("\n| run | wall (s) | driver peak (GB) | worker peaks (GB) | weights vs one process (max rel.) | steps (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, r in results.items():
        difference = "" if reference is None else f"{float((weights[mode] - reference).abs().max() / reference.abs().max()):.1e}"
        name = "in one process" if mode == "inprocess" else f"Dask, {mode} worker(s)"
        stages = ", ".join(f"{k} {v}" for k, v in r["stages"].items())
        print(f"| {name} | {r['seconds']} | {r['driver_gb']} | {', '.join(map(str, r['workers_gb'].values())) or '-'} | {difference} | {stages} |")
    if "inprocess" in results and "2" in results:
        print(f"\nspeed-up of 2 workers over one process: {results['inprocess']['seconds'] / results['2']['seconds']:.2f}")
    print("\n" + estimate(results, args))


if __name__ == "__main__":
    main()
