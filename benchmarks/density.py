"""Density expansion with position gradients: acdc-potential against featomic.

Both sides do what an MD step needs: the coefficients of every atom, then the
gradient of a fixed random projection of them with respect to positions (one
backward pass). featomic runs through featomic-torch, from the same neighbour
data, with the same hyperparameters (constant-width Gaussian, GTO basis, shifted
cosine). Each case runs in its own process so that the peak memory is its own.

usage: python benchmarks/density.py [--repeats 5] [--threads 2]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

HYPERS = dict(cutoff=5.0, smoothing=0.5, max_angular=6, max_radial=7, density="gaussian", width=0.3)


def structure(name):
    import ase.build
    import ase.io

    if name == "cu864":
        atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True) * (6, 6, 6)
        atoms.rattle(0.05, seed=0)
        return atoms
    atoms = ase.build.molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=0)
    return atoms


def run_ours(atoms, repeats):
    import torch

    from acdc_potential.descriptors.density import DensityExpansion
    from acdc_potential.descriptors.neighbors import batch_from_atoms
    from acdc_potential.descriptors.radial import DensityHypers

    hypers = DensityHypers(basis="gto", **HYPERS)
    expansion = DensityExpansion(hypers, sorted(set(atoms.numbers)))
    timings = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        batch = batch_from_atoms([atoms], hypers.cutoff)
        batch.positions.requires_grad_(True)
        coefficients = expansion.compute(batch)
        total = sum((c * torch.cos(torch.arange(c.numel(), dtype=c.dtype)).reshape(c.shape)).sum() for c in coefficients)
        total.backward()
        timings.append(time.perf_counter() - start)
    return timings[1:]


def run_featomic(atoms, repeats):
    import featomic.torch
    import torch

    calculator = featomic.torch.SphericalExpansion(
        cutoff={"radius": HYPERS["cutoff"], "smoothing": {"type": "ShiftedCosine", "width": HYPERS["smoothing"]}},
        density={"type": "Gaussian", "width": HYPERS["width"], "center_atom_weight": 0.0},
        basis={
            "type": "TensorProduct",
            "max_angular": HYPERS["max_angular"],
            "radial": {"type": "Gto", "max_radial": HYPERS["max_radial"]},
        },
    )
    timings = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        system = featomic.torch.systems_to_torch(atoms, positions_requires_grad=True)
        descriptor = calculator(system)
        total = sum(
            (block.values * torch.cos(torch.arange(block.values.numel(), dtype=block.values.dtype)).reshape(block.values.shape)).sum()
            for block in descriptor.blocks()
        )
        total.backward()
        timings.append(time.perf_counter() - start)
    return timings[1:]


def child(name, implementation, repeats, threads):
    import torch

    torch.set_num_threads(threads)
    atoms = structure(name)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timings = (run_ours if implementation == "ours" else run_featomic)(atoms, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"best": min(timings), "atoms": len(atoms), "peak_mb": peak / 1024, "extra_mb": (peak - before) / 1024}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.repeats, args.threads)
        return

    print(f"hyperparameters: {HYPERS}, GTO basis, {args.threads} threads, best of {args.repeats}")
    header = f"{'system':<10} {'atoms':>6} {'ours us/atom':>13} {'featomic us/atom':>17} {'ratio':>6} {'ours peak MB':>13} {'featomic peak MB':>17}"
    print(header)
    print("-" * len(header))
    for name in ["ethanol", "cu864"]:
        results = {}
        for implementation in ["ours", "featomic"]:
            output = subprocess.run(
                [sys.executable, __file__, "--child", name, implementation, "--repeats", str(args.repeats), "--threads", str(args.threads)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[implementation] = json.loads(output.strip().splitlines()[-1])
        ours, theirs = results["ours"], results["featomic"]
        n = ours["atoms"]
        print(
            f"{name:<10} {n:>6} {1e6 * ours['best'] / n:>13.1f} {1e6 * theirs['best'] / n:>17.1f} "
            f"{ours['best'] / theirs['best']:>6.2f} {ours['peak_mb']:>13.0f} {theirs['peak_mb']:>17.0f}"
        )


if __name__ == "__main__":
    main()
