"""Feature counts and cost per atom of ACDC and MP-ACDC invariants, with gradients.

For each system and feature type: the number of invariant features per atom, and the
wall time per atom of the features alone (forward) and of the features plus their
gradients with respect to positions (and cell, for periodic systems) through
``features.sum().backward()`` (what a linear model's forces cost). The density
expansion is included in both timings. Best of ``--repeats`` runs.

    OMP_NUM_THREADS=1 python benchmarks/features.py [--frames 10] [--repeats 3] [--max-radial 3] [--max-angular 3]
"""

import argparse
import time

import ase.build
import ase.io
import torch

from acdc_potential.descriptors.acdc import acdc_features, power_spectrum
from acdc_potential.descriptors.density import DensityExpansion
from acdc_potential.descriptors.mpacdc import batch_mp_acdc_features
from acdc_potential.descriptors.neighbors import batch_from_atoms
from acdc_potential.descriptors.radial import DensityHypers

ETHANOL = "/work/shared/data/ethanol_train.extxyz"


def feature_types(expansion):
    """Name -> function of a batch returning invariants ``[n_atoms, n_features]``."""

    def nu_invariants(nu):
        return lambda batch: acdc_features(expansion.compute(batch), nu, 0, invariants_only=True)[(0, 1)][:, 0]

    return {
        "nu=2 power_spectrum": lambda batch: power_spectrum(expansion.compute(batch)),
        "nu=2 cg": nu_invariants(2),
        "nu=3 cg": nu_invariants(3),
        "[1<-1]": lambda batch: batch_mp_acdc_features(batch, expansion, invariants_only=True)[(0, 1)][:, 0],
    }


def best_time(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def measure(name, compute, batch, repeats):
    def forward():
        with torch.no_grad():
            return compute(batch)

    def with_gradients():
        positions = batch.positions.detach().requires_grad_()
        cells = batch.cells.detach().requires_grad_()
        moved = type(batch)(**{**batch.__dict__, "positions": positions, "cells": cells})
        compute(moved).sum().backward()
        return positions.grad

    time_forward, features = best_time(forward, repeats)
    time_backward, _ = best_time(with_gradients, repeats)
    n = batch.n_atoms
    return name, features.shape[1], 1e3 * time_forward / n, 1e3 * time_backward / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10, help="ethanol frames per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cutoff", type=float, default=4.5)
    parser.add_argument("--max-radial", type=int, default=3)
    parser.add_argument("--max-angular", type=int, default=3)
    parser.add_argument("--copper-repeat", type=int, default=6, help="cubic Cu cell repeated n x n x n")
    args = parser.parse_args()
    torch.manual_seed(0)

    hypers = DensityHypers(
        cutoff=args.cutoff,
        smoothing=0.5,
        max_angular=args.max_angular,
        max_radial=args.max_radial,
        basis="le",
        density="gaussian",
        width=0.3,
    )
    copper = ase.build.bulk("Cu", cubic=True) * args.copper_repeat
    copper.rattle(0.05, seed=0)
    systems = {
        f"ethanol x{args.frames}": (ase.io.read(ETHANOL, index=f":{args.frames}"), [1, 6, 8]),
        f"Cu {len(copper)} atoms": ([copper], [29]),
    }
    print(
        f"cutoff {hypers.cutoff} A, n_max {args.max_radial} ({args.max_radial + 1} radial functions), "
        f"l_max {args.max_angular}, LE basis, float64, torch threads {torch.get_num_threads()}"
    )
    header = f"{'system':<16} {'features':<20} {'n_features':>10} {'ms/atom fwd':>12} {'ms/atom fwd+grad':>17}"
    print(header)
    print("-" * len(header))
    for system, (frames, species) in systems.items():
        expansion = DensityExpansion(hypers, species)
        batch = batch_from_atoms(frames, hypers.cutoff)
        for name, compute in feature_types(expansion).items():
            _, n_features, forward, backward = measure(name, compute, batch, args.repeats)
            print(f"{system:<16} {name:<20} {n_features:>10} {forward:>12.3f} {backward:>17.3f}", flush=True)


if __name__ == "__main__":
    main()
