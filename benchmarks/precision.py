"""Numerical precision of exported energies: rounding under exact symmetries and finite differences.

For each checkpoint (``.ckpt``) and each route of its head (``pairs``: the reference sum over
sparse environments pair by pair; ``collapsed``: what exported files run, every Wigner order up to 4
and polynomial kernels of ``zeta`` 1 and 2 folded into per-species tensors, larger ``zeta`` summed in
compensated arithmetic), the float64 scripted module, and for each exported file (``.pt``) metatomic's own
ASE calculator, is probed on
the first structure of a test file by
:func:`acdc_potential.evaluation.numerical_precision`: the energy change under a 1e-12 A
translation, a random rotation and a permutation of the atoms (all exact symmetries, so every
change is rounding), and finite-difference against autograd forces at several steps. For
checkpoints, each route's cost: the seconds to build it (the collapse), the size of its
TorchScript file and the time per atom of energy and forces on that structure.

usage: python benchmarks/precision.py MODEL.ckpt|MODEL.pt[:TEST.extxyz] [...] [--threads N]
"""

import argparse
import io
import time
from pathlib import Path

import ase.io
import torch

from acdc_potential.evaluation import numerical_precision
from acdc_potential.fit.checkpoint import SparseKRRModel
from acdc_potential.inference import run_module

STEPS = (1e-2, 1e-3, 1e-4, 1e-5)
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def models(path: str):
    """``(label, model, cost)`` to probe: a checkpoint's scripted potential per route, with what
    that route costs (:func:`route_cost`), or an exported file through metatomic's ASE calculator."""
    if path.endswith(".pt"):
        from metatomic_ase import MetatomicCalculator

        yield "file (metatomic calculator)", MetatomicCalculator(path), None
        return
    model = SparseKRRModel.load(path)
    for route in ("pairs", "collapsed"):
        start = time.perf_counter()
        module = torch.jit.script(model.potential(route).eval())
        seconds = time.perf_counter() - start
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)  # before any call: what an export writes
        yield route, module, (seconds, buffer.tell() / 1e6)


def route_cost(module, atoms, built, repeats: int = 10) -> str:
    """Seconds to build the module (the collapse happens there), the size of its TorchScript
    file (``built``), and microseconds per atom of one energy + forces evaluation (after three
    warm-up calls, which also build the pair route's cache of sparse features)."""
    for _ in range(3):
        run_module(module, [atoms], forces=True, stress=False, uncertainty=False)
    start = time.perf_counter()
    for _ in range(repeats):
        run_module(module, [atoms], forces=True, stress=False, uncertainty=False)
    step = (time.perf_counter() - start) / repeats / len(atoms) * 1e6
    return f"{built[0]:.1f} | {built[1]:.1f} | {step:.0f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="CHECKPOINT[:TEST_FILE] (default test file: ../shared/data/<stem>_test.extxyz)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | route | energy (eV) | translation 1e-12 A (rel.) | rotation (rel.) | permutation (rel.) | "
          + " | ".join(f"FD h={h:g} (eV/A)" for h in STEPS) + " | build (s) | file (MB) | E + F (us/atom) |")
    print("| --- " * (9 + len(STEPS)) + "|")
    for spec in args.models:
        path, _, test = spec.partition(":")
        stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        atoms = ase.io.read(test or str(DATA / f"{stem}_test.extxyz"), 0)
        for chosen, model, build in models(path):
            probes = [numerical_precision(model, atoms, step=h) for h in STEPS]
            first = probes[0]
            cost = route_cost(model, atoms, build) if build is not None else " | | "
            print(f"| {stem} | {chosen} | {first['energy']:.6f} | {first['translation']:.1e} ({first['translation_relative']:.1e}) | "
                  f"{first['rotation']:.1e} ({first['rotation_relative']:.1e}) | {first['permutation']:.1e} ({first['permutation_relative']:.1e}) | "
                  + " | ".join(f"{p['finite_difference']:.1e}" for p in probes) + f" | {cost} |", flush=True)


if __name__ == "__main__":
    main()
