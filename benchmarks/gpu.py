"""CUDA checks of exported models and of a fit: the GPU gives the CPU's numbers, and what it costs.

Run on a machine with a GPU (``--device cuda``, the default); ``--device cpu`` runs the same
script against a second CPU calculator, to check the script itself where there is none.

Stages, in this order (each writes ``--json`` when done, so that a run cut short keeps its figures):

1. **Agreement.** For every ``MODEL.pt:DATA.extxyz`` pair, the exported file through
   :class:`~acdc_potential.calculator.ACDCCalculator` (metatomic's ASE calculator: what every
   metatomic engine does) on ``cpu`` and on the device, structure by structure: energy, forces,
   stress (periodic cells), per-atom energy uncertainty and force uncertainty (calibrated models),
   dipole (dipole models). Printed: the largest difference of each, relative to the largest
   value. With ``MODEL.ckpt`` beside the file, the model is also exported in float32 and run on the
   device against the float64 CPU numbers. One structure of each set also runs through
   ``metatomic_ase.MetatomicCalculator(check_consistency=True)`` on the device.
2. **Cost.** Energy + forces of a structure whose positions move a little at every call (an MD
   step's work, ASE's neighbour list on the CPU included): the median of ``--steps`` calls (fewer,
   at least three, after ``--seconds``) after ``--warmup`` calls (TorchScript's profiling runs; on a
   GPU also the compilation of fused kernels for each new shape: their time is printed), on
   the CPU with the calculator's threads (one below 100 atoms, else every core) and on the device;
   then with the per-atom energy uncertainty (what LAMMPS's ``pair_style metatomic`` asks for at
   every step), here a second model call after the energy's (LAMMPS asks for both in one call, so the
   column overstates its cost by about one call's fixed overhead). Structures: the first of each data set, and ``--cells`` fcc Cu supercells
   (``N`` = 5: 500 atoms) for the models whose species are Cu, else a cluster of ``--grid``^3
   copies of the first structure 6 A apart.
3. **Fit.** With ``--fit TRAIN.extxyz``, the same small fit (``--fit-sparse`` sparse environments,
   tuned, for each kernel of ``--fit-kernels``) on the CPU and on the device: time, and the largest
   difference of the predicted energies (relative to their spread) and forces (relative to the largest)
   on ``--fit-test``.

usage: python benchmarks/gpu.py MODEL.pt:DATA.extxyz [...] [--device cuda] [--steps 20]
                                [--cells 5,10] [--fit TRAIN.extxyz --fit-test TEST.extxyz]
                                [--fit-kernels wigner,polynomial,mpacdc] [--fit-sparse 50] [--json OUT.json]
"""

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Tuple

import ase.io
import numpy as np
import torch

from md import copper_cell

from acdc_potential.calculator import ACDCCalculator
from acdc_potential.runtime import default_threads


def relative(a, b) -> float:
    """Largest |a - b| relative to the largest |b| (0 for two empty or zero arrays)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return float(np.max(np.abs(a - b))) / scale if scale > 0 else float(np.max(np.abs(a - b), initial=0.0))


def quantities(calculator: ACDCCalculator, atoms) -> dict:
    """What the file gives for ``atoms``: energy, forces, stress, uncertainties, dipole."""
    atoms = atoms.copy()
    atoms.calc = calculator
    out = {}
    if calculator.has_energy:
        out["energy"] = atoms.get_potential_energy()
        out["forces"] = atoms.get_forces()
        if atoms.pbc.all():
            out["stress"] = atoms.get_stress()
        if "energy_uncertainty" in calculator._model.capabilities().outputs:
            out["energies_uncertainty"] = calculator.get_uncertainty(atoms, per_atom=True)
        if calculator.has_forces_uncertainty:
            out["forces_uncertainty"] = calculator.get_forces_uncertainty(atoms)
    if calculator.has_dipole:
        out["dipole"] = calculator.get_dipole_moment(atoms)
    return out


def agreement(path: Path, structures, device: str, dtype_path: Path = None) -> dict:
    """The largest relative difference of each quantity between the CPU (float64 file) and ``device``
    (``dtype_path`` if given, e.g. the float32 export)."""
    cpu = ACDCCalculator(path, device="cpu", uncertainty_threshold=None)
    other = ACDCCalculator(dtype_path or path, device=device, uncertainty_threshold=None)
    worst = {}
    for atoms in structures:
        reference, result = quantities(cpu, atoms), quantities(other, atoms)
        for name, value in reference.items():
            worst[name] = max(worst.get(name, 0.0), relative(result[name], value))
    return worst


def consistency(path: Path, atoms, device: str) -> str:
    """metatomic's own checks of the model's outputs on ``device``: "passed" or the error."""
    from metatomic_ase import MetatomicCalculator

    try:
        calculator = MetatomicCalculator(str(path), device=device, check_consistency=True, uncertainty_threshold=None)
        outputs = calculator._model.capabilities().outputs
        if "energy" in outputs:
            atoms = atoms.copy()
            atoms.calc = calculator
            atoms.get_forces()
        else:
            calculator.run_model(atoms, {name: outputs[name] for name in outputs})
        return "passed"
    except Exception as error:  # reported, not raised: the other checks still run
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"


def step_times(calculator: ACDCCalculator, atoms, steps: int, seconds: float, warmup: int, per_atom_uncertainty: bool = False) -> Tuple[float, float]:
    """Median seconds per energy+forces call (and the per-atom uncertainty) with moving positions,
    over ``steps`` calls after ``warmup`` calls, or fewer (at least three) once ``seconds`` are spent;
    and the seconds of the warm-up calls together (TorchScript profiles and, on a GPU, compiles its
    fused kernels for the first shapes it sees)."""
    atoms = atoms.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(0)
    times = []
    for step in range(steps + warmup):
        atoms.positions += rng.normal(scale=1e-3, size=atoms.positions.shape)
        start = time.perf_counter()
        atoms.get_forces()
        if per_atom_uncertainty:
            calculator.get_uncertainty(atoms, per_atom=True)
        times.append(time.perf_counter() - start)
        if len(times) >= warmup + 3 and sum(times[warmup:]) > seconds:
            break
    return float(np.median(times[warmup:])), float(sum(times[:warmup]))


def costs(path: Path, systems: dict, device: str, steps: int, seconds: float, warmup: int) -> list:
    """Rows (system, atoms, device, threads, ms per step) on the CPU and on ``device``, with the threads
    the calculator chooses (one below 100 atoms, else every core)."""
    rows = []
    calculator = ACDCCalculator(path, device="cpu", uncertainty_threshold=None)
    if not calculator.has_energy:
        return rows
    with_uncertainty = "energy_uncertainty" in calculator._model.capabilities().outputs
    for name, atoms in systems.items():
        for dev in ("cpu", device):
            calc = ACDCCalculator(path, device=dev, uncertainty_threshold=None)
            step, first = step_times(calc, atoms, steps, seconds, warmup)
            row = {"system": name, "atoms": len(atoms), "device": dev, "threads": default_threads(len(atoms)),
                   "ms_per_step": 1e3 * step, "warmup_s": first}
            if with_uncertainty:
                row["ms_per_step_with_atom_uncertainty"] = 1e3 * step_times(calc, atoms, steps, seconds, warmup, per_atom_uncertainty=True)[0]
            rows.append(row)
            print(f"  {name:12s} {len(atoms):5d} atoms  {dev:5s} {row['threads']:2d} threads  {row['ms_per_step']:9.2f} ms/step"
                  + (f"  {row['ms_per_step_with_atom_uncertainty']:9.2f} with per-atom uncertainty" if with_uncertainty else "")
                  + f"  ({warmup} warm-up calls: {first:.2f} s)", flush=True)
    return rows


def fit_on(device: str, train, kernel_type: str, n_sparse: int):
    """A small tuned fit of ``kernel_type`` on ``device`` (seconds, model)."""
    from acdc_potential.config import DensityHypers, KernelConfig
    from acdc_potential.fit.driver import fit_kernel, make_kernel

    density = DensityHypers()
    kernel = make_kernel(KernelConfig(type=kernel_type, nu_max=3), density)
    start = time.perf_counter()
    model = fit_kernel(train, density, kernel, n_sparse, tune=True, device=device)
    return time.perf_counter() - start, model


def compare_fits(train, test, kernels, n_sparse: int, device: str) -> list:
    rows = []
    for kernel_type in kernels:
        row = {"kernel": kernel_type}
        try:
            seconds_cpu, on_cpu = fit_on("cpu", train, kernel_type, n_sparse)
            seconds_dev, on_dev = fit_on(device, train, kernel_type, n_sparse)
            cpu, dev = (
                {key: value.detach().cpu().numpy() for key, value in model.predict(test, stress=False).items()}
                for model in (on_cpu, on_dev)
            )
            row.update(seconds_cpu=seconds_cpu, seconds_device=seconds_dev,
                       energy=float(np.max(np.abs(dev["energy"] - cpu["energy"])) / np.ptp(cpu["energy"])),
                       forces=relative(dev["forces"], cpu["forces"]))
        except Exception:
            row["error"] = traceback.format_exc().strip().splitlines()[-1]
            traceback.print_exc()
        print(f"  fit {row}", flush=True)
        rows.append(row)
    return rows


def molecule_grid(atoms, n: int, spacing: float = 6.0):
    """``n^3`` copies of the molecule ``atoms`` on a cubic grid ``spacing`` A apart (a cluster)."""
    grid = atoms.copy()
    grid.center()
    copies = [grid.copy() for _ in range(n**3)]
    for k, copy in enumerate(copies):
        copy.translate(spacing * np.array([k // n**2, (k // n) % n, k % n]))
    cluster = copies[0]
    for copy in copies[1:]:
        cluster += copy
    return cluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="MODEL.pt:DATA.extxyz pairs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20, help="timed calls per measurement (at most)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time after which a measurement stops (at least three calls)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each measurement")
    parser.add_argument("--structures", type=int, default=5, help="structures of each data set compared")
    parser.add_argument("--cells", default="5,10", help="fcc Cu supercells N x N x N cubic cells timed with Cu models")
    parser.add_argument("--grid", type=int, default=5, help="molecules are also timed as a cluster of GRID^3 copies")
    parser.add_argument("--fit", help="training structures of the fit comparison")
    parser.add_argument("--fit-test", help="structures predicted by both fits")
    parser.add_argument("--fit-structures", type=int, default=60)
    parser.add_argument("--fit-kernels", default="wigner,polynomial,mpacdc")
    parser.add_argument("--fit-sparse", type=int, default=50)
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "") + f", {os.cpu_count()} cores", flush=True)
    results = {"torch": torch.__version__, "device": args.device, "models": {}, "fits": []}

    def save():  # after every stage: a run cut short keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    models = []
    for pair in args.models:
        path, data = (Path(p) for p in pair.split(":"))
        structures = ase.io.read(str(data), index=f":{args.structures}")
        for atoms in structures:
            atoms.calc = None
        models.append((path, data, structures))
    for path, data, structures in models:
        entry = results["models"].setdefault(path.name, {})
        print(f"{path.name} on {data.name}", flush=True)
        try:
            check_model(entry, path, structures, args.device)
        except Exception:
            entry["error"] = traceback.format_exc().strip().splitlines()[-1]
            traceback.print_exc()
        save()
    if args.fit:
        train = ase.io.read(args.fit, index=f":{args.fit_structures}")
        test = ase.io.read(args.fit_test or args.fit, index=":10")
        print(f"fits on {len(train)} structures of {args.fit}", flush=True)
        results["fits"] = compare_fits(train, test, args.fit_kernels.split(","), args.fit_sparse, args.device)
        save()
    cells = {f"cu{4 * int(n) ** 3}": copper_cell(int(n)) for n in args.cells.split(",") if n}
    for path, data, structures in models:
        print(f"cost of {path.name}", flush=True)
        if set(structures[0].get_chemical_symbols()) == {"Cu"}:
            systems = {data.stem: structures[0], **cells}
        else:
            systems = {data.stem: structures[0], f"{data.stem}x{args.grid**3}": molecule_grid(structures[0], args.grid)}
        try:
            results["models"][path.name]["cost"] = costs(path, systems, args.device, args.steps, args.seconds, args.warmup)
        except Exception:
            results["models"][path.name]["cost_error"] = traceback.format_exc().strip().splitlines()[-1]
            traceback.print_exc()
        save()
    return 0


def check_model(entry: dict, path: Path, structures, device: str) -> None:
    """Agreement of ``path`` (and of its float32 export, when its checkpoint is beside it) on ``device``
    with the CPU, and metatomic's consistency check, into ``entry``."""
    entry["float64"] = agreement(path, structures, device)
    print(f"  float64 {device} against cpu: {entry['float64']}", flush=True)
    entry["metatomic_consistency"] = consistency(path, structures[0], device)
    print(f"  metatomic check_consistency on {device}: {entry['metatomic_consistency']}", flush=True)
    checkpoint = path.with_suffix(".ckpt")
    if checkpoint.exists():
        from acdc_potential.fit.checkpoint import load_checkpoint

        with tempfile.TemporaryDirectory() as folder:
            single = Path(folder) / "float32.pt"
            try:
                load_checkpoint(str(checkpoint)).export(str(single), dtype=torch.float32)
            except ValueError as refused:
                entry["float32"] = f"refused: {refused}"
            else:
                entry["float32"] = agreement(path, structures, device, dtype_path=single)
        print(f"  float32 {device} against float64 cpu: {entry['float32']}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
