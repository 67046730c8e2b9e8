"""Where the time of an energy-and-forces call goes: density, features, the sum over sparse environments.

For each checkpoint, the deployable head (eager, float64, the exported route) evaluates energy and
autograd forces of one structure three times over: up to the density coefficients, up to the
unit invariant features (polynomial and message-passing heads; a Wigner head has none), and the
whole atomic energy. Each stage's time is the difference of two of these (microseconds per atom,
the fastest of ``--blocks`` blocks of ``--repeats`` calls). The sizes that set the last stage's
cost are printed beside it: for a ``zeta = 2`` polynomial head the per-species tensors ``[S, F, r]``,
an atom costing about ``4 F r`` multiply-adds with its forces.

usage: python benchmarks/step_cost.py MODEL.ckpt:STRUCTURES.extxyz[@INDEX] [...] [--threads 1] [--repeats 5] [--blocks 3]
"""

import argparse
import time

import ase.io
import torch

from acdc_potential.descriptors.density import Pairs
from acdc_potential.descriptors.neighbors import batch_from_atoms
from acdc_potential.fit.checkpoint import SparseKRRModel

STAGES = ("density", "features", "sparse sum")


def staged_energy(head, atoms, stage: int):
    """``(positions, value)``: the sum of what ``head`` computes up to ``stage`` (0: density
    coefficients, 1: unit features, 2: atomic energies) for ``atoms``, differentiable in positions."""
    batch = batch_from_atoms([atoms], head.density.cutoff)
    positions = batch.positions.clone().requires_grad_()
    vectors = positions[batch.neighbors] - positions[batch.centers] + batch.shifts @ batch.cells[0]
    species = head.density.species_lookup[batch.numbers]
    pairs = Pairs(vectors, batch.centers, batch.neighbors, species)
    if stage == 0 or (stage == 1 and not hasattr(head, "features")):
        return positions, sum(c.sum() for c in head.density.from_pairs(pairs))
    # a polynomial or message-passing head's environments are its unit invariants
    environments = head.environments(pairs)
    if stage == 1:
        return positions, environments[0].sum()
    return positions, head(environments, species).sum()


def seconds_per_call(head, atoms, stage: int, repeats: int, blocks: int) -> float:
    """Fastest block's mean seconds of one staged value and its gradient (after two warm-up calls)."""
    times = []
    for block in range(blocks + 1):
        start = time.perf_counter()
        for _ in range(repeats if block else 2):
            positions, value = staged_energy(head, atoms, stage)
            torch.autograd.grad(value, positions)
        if block:
            times.append((time.perf_counter() - start) / repeats)
    return min(times)


def sum_sizes(head) -> str:
    """The tensors that set the cost of the sum over sparse environments."""
    if hasattr(head, "collapsed_shapes"):  # a Wigner head
        return f"collapsed tensors {head.collapsed_shapes}" if head.collapsed else f"{int(head.state.sparse_species.shape[0])} sparse environments"
    if head.collapsed:
        return f"folded {list(head.folded.shape)}, values {list(head.values.shape)}"
    if hasattr(head, "sparse_features"):
        return f"pairs with {list(head.sparse_features.shape)} sparse features"
    return f"{int(head.state.sparse_species.shape[0])} sparse environments"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="CKPT:STRUCTURES.extxyz[@INDEX] (INDEX default 0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | atoms | " + " | ".join(f"{s} (us/atom)" for s in STAGES) + " | total | what the sum holds |")
    print("| --- | --- | " + " | ".join("---" for _ in STAGES) + " | --- | --- |")
    for spec in args.models:
        path, _, where = spec.partition(":")
        if not where:
            raise SystemExit(f"{spec}: give the structure as MODEL.ckpt:STRUCTURES.extxyz[@INDEX]")
        structures, _, index = where.partition("@")
        atoms = ase.io.read(structures, index=int(index or 0))
        head = SparseKRRModel.load(path).potential().head
        cumulative = [seconds_per_call(head, atoms, stage, args.repeats, args.blocks) * 1e6 / len(atoms) for stage in range(3)]
        parts = [cumulative[0], max(0.0, cumulative[1] - cumulative[0]), max(0.0, cumulative[2] - cumulative[1])]
        print(f"| {path} | {len(atoms)} | " + " | ".join(f"{p:.0f}" for p in parts) + f" | {cumulative[2]:.0f} | {sum_sizes(head)} |", flush=True)


if __name__ == "__main__":
    main()
