"""Numerical precision of exported energies: rounding under exact symmetries and finite differences.

For each checkpoint (``.ckpt``) and each inference route of its Wigner head (``pairs``: the
sum over sparse environments pair by pair; ``auto``: what an export chooses, the collapsed
per-species tensors where they are cheaper), the float64 scripted module (what the exported
file runs), and for each exported file (``.pt``) metatomic's own ASE calculator, is probed on
the first structure of a test file by
:func:`acdc_potential.evaluation.numerical_precision`: the energy change under a 1e-12 A
translation, a random rotation and a permutation of the atoms (all exact symmetries, so every
change is rounding), and finite-difference against autograd forces at several steps.

usage: python benchmarks/precision.py MODEL.ckpt|MODEL.pt[:TEST.extxyz] [...] [--threads N]
"""

import argparse
from pathlib import Path

import ase.io
import torch

from acdc_potential.evaluation import numerical_precision
from acdc_potential.fit.checkpoint import SparseKRRModel

STEPS = (1e-2, 1e-3, 1e-4, 1e-5)
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def models(path: str):
    """``(label, model)`` to probe: a checkpoint's scripted potential per route, or an exported
    file through metatomic's ASE calculator."""
    if path.endswith(".pt"):
        from metatomic_ase import MetatomicCalculator

        yield "file (metatomic calculator)", MetatomicCalculator(path)
        return
    model = SparseKRRModel.load(path)
    for route in ("pairs", "auto") if model.kernel.kind == "wigner" else ("auto",):
        module = torch.jit.script(model.potential(route).eval())
        yield (route if route == "pairs" else ("collapsed" if module.head.collapsed else "pairs") + " (auto)"), module


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="CHECKPOINT[:TEST_FILE] (default test file: ../shared/data/<stem>_test.extxyz)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | route | energy (eV) | translation 1e-12 A (rel.) | rotation (rel.) | permutation (rel.) | "
          + " | ".join(f"FD h={h:g} (eV/A)" for h in STEPS) + " |")
    print("| --- " * (6 + len(STEPS)) + "|")
    for spec in args.models:
        path, _, test = spec.partition(":")
        stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        atoms = ase.io.read(test or str(DATA / f"{stem}_test.extxyz"), 0)
        for chosen, model in models(path):
            probes = [numerical_precision(model, atoms, step=h) for h in STEPS]
            first = probes[0]
            print(f"| {stem} | {chosen} | {first['energy']:.6f} | {first['translation']:.1e} ({first['translation_relative']:.1e}) | "
                  f"{first['rotation']:.1e} ({first['rotation_relative']:.1e}) | {first['permutation']:.1e} ({first['permutation_relative']:.1e}) | "
                  + " | ".join(f"{p['finite_difference']:.1e}" for p in probes) + " |", flush=True)


if __name__ == "__main__":
    main()
