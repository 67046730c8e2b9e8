"""Cost of the message-passing kernel's design rows: every central species in one pass over a batch
against one pass per species (what the other kernels do, and this one did before), same structures,
same sparse set.

For every set NAME in the data directory, the default ``mpacdc`` kernel (``FitConfig`` with
``kernel.type: mpacdc``; its contraction fitted on the candidates) gets ``--sparse`` environments per
species drawn by farthest point sampling from the first ``--candidates`` training structures, and the energy and force rows of the next
``--structures`` ones are built both ways (``build_design_matrix`` with ``rows_by_species`` false and
true). Prints seconds per structure, their ratio, and the largest difference of the rows (the two
must agree to rounding).

usage: python benchmarks/mpacdc_rows.py [--sets ethanol,molecules] [--sparse 100] [--candidates 50] [--structures 20] [--threads 1]
"""

import argparse
import time
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def measure(name: str, args) -> dict:
    from acdc_potential.config import FitConfig
    from acdc_potential.data import read_structures
    from acdc_potential.descriptors.density import DensityExpansion
    from acdc_potential.descriptors.neighbors import batch_from_atoms
    from acdc_potential.fit.baseline import Baseline
    from acdc_potential.fit.design import build_design_matrix
    from acdc_potential.fit.driver import make_kernel
    from acdc_potential.fit.selection import select_sparse
    from acdc_potential.fit.sources import MemorySource
    from acdc_potential.fit.tasks import coefficients

    structures = read_structures(str(Path(args.data) / f"{name}_train.extxyz"))
    candidates, timed = structures[: args.candidates], structures[args.candidates : args.candidates + args.structures]
    species = sorted({int(z) for s in structures[: args.candidates + args.structures] for z in s.atoms.numbers})
    config = FitConfig.from_dict({"kernel": {"type": "mpacdc"}})
    expansion = DensityExpansion(config.density, species)
    kernel = make_kernel(config.kernel, config.density)
    kernel.prepare(expansion, [batch_from_atoms([s.atoms for s in candidates], expansion.cutoff)])
    flat, numbers, layout = coefficients(MemorySource(candidates), expansion, kernel, False, list(range(len(candidates))))
    chosen = select_sparse(kernel.selection_features(flat, layout), numbers, args.sparse)
    kernel.set_sparse(flat[chosen], numbers[chosen], layout)
    baseline = Baseline({z: 0.0 for z in species})
    result = {"set": name, "species": len(species), "sparse": kernel.n_sparse, "features": layout.size}
    rows = {}
    for label, by_species in (("one pass", False), ("per species", True)):
        kernel.rows_by_species = by_species
        start = time.perf_counter()
        rows[label] = build_design_matrix(timed, expansion, kernel, baseline, stress=False).pieces
        result[label] = (time.perf_counter() - start) / len(timed)
    result["difference"] = float((rows["one pass"] - rows["per species"]).abs().max())
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="ethanol,molecules")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--sparse", type=int, default=100, help="sparse environments per species")
    parser.add_argument("--candidates", type=int, default=50, help="structures the sparse set is drawn from")
    parser.add_argument("--structures", type=int, default=20, help="structures whose rows are timed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'set':<10} {'species':>7} {'sparse':>6} {'features':>8} {'one pass (s/str.)':>18} {'per species':>12} {'ratio':>6} {'max diff':>9}")
    for name in args.sets.split(","):
        r = measure(name, args)
        print(
            f"{r['set']:<10} {r['species']:>7d} {r['sparse']:>6d} {r['features']:>8d} {r['one pass']:>18.3f} {r['per species']:>12.3f}"
            f" {r['per species'] / r['one pass']:>6.2f} {r['difference']:>9.1e}"
        )


if __name__ == "__main__":
    main()
